#!/usr/bin/env bash
# measure.sh IMPL [--seconds N] [--parallel P] [--udp-rate RATE] [--pings N] [--wait S]
#                 [--relay BINARY --relay-args "ARGS" [--relay-name NAME]]
# One measurement of IMPL (impl/IMPL.sh) in fresh namespaces (see common.sh), then everything is
# torn down again. Prints "IMPL<TAB>METRIC<TAB>VALUE<TAB>UNIT" lines on stdout, progress on stderr.
#
# Direct link, in this order (the idle ping comes first, right after the tunnel answers):
#   tunnel_up_s          start of the implementation until the overlay answers ping
#   overlay_mtu, overlay_ipv6, tcp_cc (the namespaces' TCP congestion control: the host's default)
#   ping_*_ms            N pings 10 ms apart over the idle tunnel: min avg max mdev p50 p99, loss
#   tcp_ab_1_*           iperf3 TCP a->b, one stream; pings 10 ms apart run beside it:
#                        ping_loaded_p50_ms, ping_loaded_p99_ms (latency under load)
#   tcp_ab_P<P>_*        the same with P streams       tcp_ba_1_*  one stream b->a (-R)
#                        each TCP test: _mbps (receiver), _retrans, _vpn_cpu_pct (the daemons'
#                        CPU time / wall time, % of one core), _sys_cpu_pct (whole machine, % of
#                        all cores), _mbps_per_vpn_core
#   udp_ab_*             iperf3 UDP a->b at RATE, 1200-byte datagrams: _mbps, _loss_pct, _jitter_ms
# Lossy link (--relay): the peers talk through BINARY (relay.c) in a middle namespace, started with
# ARGS (e.g. "-d 10 -l 2"); every metric is prefixed lossy_ (lossy_NAME_ with --relay-name): tunnel_up_s, tcp_cc, the idle pings
# (which show the delay), the single-stream TCP a->b only, and relay_drop_pct (what the relay
# really dropped). A failed test prints nan.
set -euo pipefail
IMPL=${1:-}
[[ -n $IMPL && $IMPL != -* ]] || { sed -n '2,3p' "$0" >&2; exit 2; }
shift
SECS=5 PAR=4 UDP_RATE=200M PINGS=50 WAIT=30 RELAY='' RELAY_ARGS='' RELAY_NAME=''
while (($#)); do
	case $1 in
	--seconds) SECS=$2 ;;
	--parallel) PAR=$2 ;;
	--udp-rate) UDP_RATE=$2 ;;
	--pings) PINGS=$2 ;;
	--wait) WAIT=$2 ;;
	--relay) RELAY=$2 ;;
	--relay-args) RELAY_ARGS=$2 ;;
	--relay-name) RELAY_NAME=$2 ;;
	*) echo "measure.sh: unknown option $1" >&2; exit 2 ;;
	esac
	shift 2
done
for v in SECS:1:600 PAR:1:64 PINGS:1:5000 WAIT:1:300; do
	IFS=: read -r name lo hi <<<"$v"
	[[ ${!name} =~ ^[0-9]+$ ]] && ((${!name} >= lo && ${!name} <= hi)) || { echo "measure.sh: $name must be $lo..$hi" >&2; exit 2; }
done

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
[[ -f $BENCH_HOME/impl/$IMPL.sh ]] || fail "no implementation $IMPL (impl/$IMPL.sh)"
for c in ip iperf3 ping jq awk timeout; do command -v "$c" >/dev/null || fail "missing $c"; done
LINK=direct PREFIX=''
if [[ -n $RELAY ]]; then LINK=lossy PREFIX=lossy_${RELAY_NAME:+${RELAY_NAME}_}; fi
[[ $RELAY_NAME =~ ^[a-z0-9_]*$ ]] || fail "--relay-name: lower-case letters, digits and _ only"

OWN_ROOT=''
if [[ -z ${BENCH_STATE_ROOT:-} ]]; then BENCH_STATE_ROOT=$(mktemp -d) OWN_ROOT=$BENCH_STATE_ROOT; fi
STATE=$BENCH_STATE_ROOT/$PREFIX$IMPL
TMP=$(mktemp -d)
IPERF_PID='' RELAY_PID=''

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	[[ -n $IPERF_PID ]] && ours "$IPERF_PID" iperf3 && kill -TERM "$IPERF_PID" 2>/dev/null
	[[ -n $RELAY_PID ]] && ours "$RELAY_PID" relay && kill -TERM "$RELAY_PID" 2>/dev/null
	reap
	net_down
	rm -rf "$STATE" "$TMP"
	[[ -n $OWN_ROOT ]] && rm -rf "$OWN_ROOT"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$STATE"
mkdir -p "$STATE"
chmod 700 "$STATE"
# shellcheck source=/dev/null
source "$BENCH_HOME/impl/$IMPL.sh"

emit() { printf '%s\t%s%s\t%s\t%s\n' "$IMPL" "$PREFIX" "$1" "$2" "$3"; }
# quantile Q FILE -- the Q-quantile (nearest rank) of the sorted numbers in FILE, nan if empty
quantile() { awk -v q="$1" '{v[NR] = $1} END {if (!NR) {print "nan"; exit} i = int(q * NR + 0.999999); print v[i < 1 ? 1 : (i > NR ? NR : i)]}' "$2"; }
# rtts PING-OUTPUT FILE -- the per-reply times, sorted
rtts() { sed -n 's/.* time=\([0-9.]*\) ms.*/\1/p' "$1" | sort -g >"$2"; }
sys_busy_total() { awk '$1 == "cpu" {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t; exit}' /proc/stat; }
HZ=$(getconf CLK_TCK)
# aside CMD... -- CMD in the background, waited for: bash runs a trap only between commands, so a
# TERM or INT during a long iperf3 or ping ends the run now, not when that command is done
aside() { "$@" & wait $!; }

# ---- bring up --------------------------------------------------------------------------------
say "$IMPL ($LINK link): seconds=$SECS"
net_up "$LINK"
if [[ $LINK == lossy ]]; then
	# both peers listen on the implementation's UDP_PORT; the relay's sockets use it too
	port=${UDP_PORT:-}
	[[ -n $port ]] || fail "$IMPL has no UDP_PORT for the relay"
	# shellcheck disable=SC2086  # RELAY_ARGS is a list of options
	ip netns exec "$NS_M" "$RELAY" -t $((SECS + WAIT + 120)) -s "$TMP/relay.stats" $RELAY_ARGS \
		"$RELAY_A:$port" "$UL4_A:$port" "$RELAY_B:$port" "$UL4_B:$port" >"$TMP/relay.log" 2>&1 </dev/null &
	RELAY_PID=$!
	until_ok 50 in_ns "$NS_M" ss -Hlun "sport = :$port" || { cat "$TMP/relay.log" >&2; fail "relay did not start"; }
	say "relay in $NS_M: $RELAY_ARGS"
fi
t0=$(date +%s.%N)
impl_up
deadline=$((SECONDS + WAIT))
until in_ns "$NS_A" ping -c1 -W1 -q "$OL4_B" >/dev/null 2>&1; do
	((SECONDS < deadline)) || { show_logs; fail "$IMPL: no overlay ping $OL4_A -> $OL4_B within ${WAIT}s"; }
	sleep 0.2
done
t1=$(date +%s.%N)
emit tunnel_up_s "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')" s

if [[ $LINK == direct ]]; then
	dev=$(ip -n "$NS_A" -o -4 addr show to "$OL4_A/32" | awk '{print $2; exit}')
	emit overlay_mtu "$(ip -n "$NS_A" -o link show dev "$dev" | sed -n 's/.* mtu \([0-9]*\) .*/\1/p')" bytes
	if in_ns "$NS_A" timeout 5 ping -6 -c2 -i0.2 -W1 -q "$OL6_B" >/dev/null 2>&1; then v6=1; else v6=0; fi
	emit overlay_ipv6 "$v6" bool
fi
emit tcp_cc "$(in_ns "$NS_A" sysctl -n net.ipv4.tcp_congestion_control 2>/dev/null || echo unknown)" name

# ---- idle latency (on the lossy link: a check that the relay's delay is there) ---------------
aside in_ns "$NS_A" timeout $((PINGS / 50 + 10)) ping -n -c "$PINGS" -i 0.01 -W 1 "$OL4_B" >"$TMP/ping" 2>&1 || true
rtts "$TMP/ping" "$TMP/rtts"
read -r pmin pavg pmax pmdev < <(sed -n 's|^rtt [^=]*= \([0-9.]*\)/\([0-9.]*\)/\([0-9.]*\)/\([0-9.]*\) ms.*|\1 \2 \3 \4|p' "$TMP/ping") || true
emit ping_min_ms "${pmin:-nan}" ms
emit ping_avg_ms "${pavg:-nan}" ms
emit ping_max_ms "${pmax:-nan}" ms
emit ping_mdev_ms "${pmdev:-nan}" ms
emit ping_p50_ms "$(quantile 0.50 "$TMP/rtts")" ms
emit ping_p99_ms "$(quantile 0.99 "$TMP/rtts")" ms
emit ping_loss_pct "$(awk -v got="$(wc -l <"$TMP/rtts")" -v sent="$PINGS" 'BEGIN {printf "%.1f", 100 * (sent - got) / sent}')" pct

# ---- throughput ------------------------------------------------------------------------------
in_ns "$NS_B" iperf3 -s -B "$OL4_B" -p 5201 >"$TMP/iperf3-server.log" 2>&1 </dev/null &
IPERF_PID=$!
until_ok 50 in_ns "$NS_B" ss -Hltn "sport = :5201" || fail "iperf3 server did not listen"

# iperf NAME ARGS... -- iperf3 client in a against b, JSON to TMP/NAME.json
iperf() {
	local name=$1; shift
	aside in_ns "$NS_A" timeout $((SECS + 20)) iperf3 -c "$OL4_B" -B "$OL4_A" -p 5201 -t "$SECS" \
		--connect-timeout 5000 -J "$@" >"$TMP/$name.json" 2>"$TMP/$name.err"
}

# tcp NAME ARGS... -- one TCP test with CPU accounting (and, for tcp_ab_1, pings beside it)
tcp() {
	local name=$1 rc=0 pinger="" c0 c1 w0 w1 b0 t0 b1 t1; shift
	if [[ $name == tcp_ab_1 && $LINK == direct ]]; then
		in_ns "$NS_A" timeout $((SECS + 5)) ping -n -i 0.01 -w "$SECS" -W 1 "$OL4_B" >"$TMP/ping_loaded" 2>&1 &
		pinger=$!
	fi
	c0=$(cpu_ticks); read -r b0 t0 < <(sys_busy_total); w0=$(date +%s.%N)
	iperf "$name" "$@" || rc=$?
	c1=$(cpu_ticks); read -r b1 t1 < <(sys_busy_total); w1=$(date +%s.%N)
	if [[ -n $pinger ]]; then
		wait "$pinger" 2>/dev/null || true
		rtts "$TMP/ping_loaded" "$TMP/rtts"
		emit ping_loaded_p50_ms "$(quantile 0.50 "$TMP/rtts")" ms
		emit ping_loaded_p99_ms "$(quantile 0.99 "$TMP/rtts")" ms
	fi
	if ((rc)) || ! jq -e '.end.sum_received.bits_per_second' "$TMP/$name.json" >/dev/null 2>&1; then
		say "$name failed (rc $rc): $(jq -r '.error // empty' "$TMP/$name.json" 2>/dev/null) $(head -c 300 "$TMP/$name.err")"
		emit "${name}_mbps" nan Mbit/s
		return 0
	fi
	local mbps vpn
	mbps=$(jq -r '.end.sum_received.bits_per_second / 1e6 * 10 | round / 10' "$TMP/$name.json")
	vpn=$(awk -v d=$((c1 - c0)) -v hz="$HZ" -v a="$w0" -v b="$w1" 'BEGIN {printf "%.0f", 100 * d / hz / (b - a)}')
	emit "${name}_mbps" "$mbps" Mbit/s
	emit "${name}_retrans" "$(jq -r '.end.sum_sent.retransmits // 0' "$TMP/$name.json")" count
	emit "${name}_vpn_cpu_pct" "$vpn" pct_of_1_core
	emit "${name}_sys_cpu_pct" "$(awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) 'BEGIN {printf "%.0f", (t > 0 ? 100 * b / t : 0)}')" pct_of_all_cores
	if ((vpn > 0)); then
		emit "${name}_mbps_per_vpn_core" "$(awk -v m="$mbps" -v c="$vpn" 'BEGIN {printf "%.0f", m * 100 / c}')" Mbit/s
	fi
}

tcp tcp_ab_1
# an implementation may add metrics of its own here (impl_metrics, e.g. veil's parity bytes)
if declare -F impl_metrics >/dev/null; then impl_metrics; fi
if [[ $LINK == direct ]]; then
	tcp "tcp_ab_P$PAR" -P "$PAR"
	tcp tcp_ba_1 -R
	if iperf udp_ab -u -b "$UDP_RATE" -l 1200 && jq -e '.end.sum.lost_percent' "$TMP/udp_ab.json" >/dev/null 2>&1; then
		emit udp_ab_offered "$UDP_RATE" bit/s
		emit udp_ab_mbps "$(jq -r '.end.sum.bits_per_second / 1e6 * (1 - .end.sum.lost_percent / 100) * 10 | round / 10' "$TMP/udp_ab.json")" Mbit/s
		emit udp_ab_loss_pct "$(jq -r '.end.sum.lost_percent * 100 | round / 100' "$TMP/udp_ab.json")" pct
		emit udp_ab_jitter_ms "$(jq -r '.end.sum.jitter_ms * 1000 | round / 1000' "$TMP/udp_ab.json")" ms
	else
		say "udp_ab failed: $(head -c 300 "$TMP/udp_ab.err")"
		emit udp_ab_loss_pct nan pct
	fi
else
	# the relay writes its counters when it ends: stop it (bounded) and read what it dropped
	kill -TERM "$RELAY_PID" 2>/dev/null || true
	wait "$RELAY_PID" 2>/dev/null || true # it ends within one loop turn (<= 100 ms) of the TERM
	RELAY_PID=''
	emit relay_drop_pct "$(awk '{for (i = 1; i <= NF; i++) {split($i, kv, "="); n[kv[1]] += kv[2]}}
		END {printf "%.2f", n["in"] ? 100 * n["dropped"] / n["in"] : 0}' "$TMP/relay.stats" 2>/dev/null || echo nan)" pct
fi
