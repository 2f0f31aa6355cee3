#!/usr/bin/env bash
# flood.sh -- a handshake flood at b. From 64 addresses (4 source ports each) in a third
# namespace, flood.py sends ClientHello-sized datagrams at b's port as fast as it can
# (FLOOD_PPS to cap it) for FLOOD_S seconds, round-robin over:
#   junk    16 03 03 00 95 01 + random bytes (MAC1 wrong: dropped before any Diffie-Hellman)
#   mac1    random bytes with a correct MAC1 for b's key (costly unless admission stops them)
#   replay  real ClientHellos captured on the wire: one of a's (a known peer) and one of x's
#           (a `veil up` in c with a key b does not know), re-sent from every source
# Two seconds in, a (the legitimate peer) restarts and must reach b within 5 s while the
# flood goes on. Throughout, b's VmRSS must stay under 64 MiB; its CPU use is reported;
# its admission/drop counters must grow; it must not send more bytes back than it got
# (no amplification) nor keep sessions for the flood; its log stays rate-limited.
#
#   veil-t-$$-a                      veil-t-$$-b                         veil-t-$$-c
#   veil-a 100.64.0.1  == tunnel ==> veil-b 100.64.0.2                   x: veil up (unknown key)
#   veth0 198.51.100.1 <-- veth -->  veth0 198.51.100.2:51820
#                                    veth1 203.0.113.2    <-- veth -->   veth0 203.0.113.3
#                                                                              203.0.113.10-73 (flood.py)
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

FLOOD_S=${FLOOD_S:-20}       # the flood's upper bound; it is stopped once the checks are done
FLOOD_MIN_S=${FLOOD_MIN_S:-10}
FLOOD_PPS=${FLOOD_PPS:-0}    # 0: as fast as the sender manages
NSRC=64
SRC_BASE=203.0.113.10
RSS_LIMIT_KB=65536

command -v python3 >/dev/null || die "missing python3 (make deps)"
net_setup
net_add_c b
keys_make a b x

# capture NODE IFACE SRC OUT -- start capturing ClientHellos from SRC on NODE's IFACE (background)
capture() {
	rm -f "$TMPD/cap.ready"
	ip netns exec "$(ns "$1")" timeout --foreground 20 python3 "$NETNS_DIR/flood.py" capture-hello "$2" "$3" "$PORT" 15 1 "$4" \
		"$TMPD/cap.ready" >>"$TMPD/capture.out" 2>&1 </dev/null &
	CAP_PID=$!
	local i
	for ((i = 0; i < 50; i++)); do [[ -e "$TMPD/cap.ready" ]] && return 0; sleep 0.1; done
	die "hello capture on $1 $2 did not start"
}

# ---- b, then a (its first ClientHello is captured on b's side)
node_start b --workers 1   # the CPU check below is about one event loop, whatever the core count
capture b "$VETH" "$UL4_a" "$TMPD/hello-a.hex"
node_start a
wait_ready a b
ping_ok a "$OL4_b" || die "no ping a -> b"
wait "$CAP_PID"
# ---- x: a node with a key b does not know; its ClientHello is captured as it arrives at b
capture b "$VETH_C" "$UL4_c" "$TMPD/hello-x.hex"
node_run c up --key "$TMPD/x.key" --listen "$UL4_c:$PORT" --address "$OL4_c/24" --address "$OL6_c/64" \
	--tun "$TUN_c" --peer "$(pub b)@$UL4_b:$PORT" --allow "$OL4_b/32" --control "$(sock c)" \
	--mgmt off --log-level "${VEIL_LOG_LEVEL:-info}"
wait_ready c
nsx c timeout --foreground 3 ping -c 1 -W 1 -q "$OL4_b" >/dev/null 2>&1 # makes x say hello
wait "$CAP_PID"
node_stop c
cat "$TMPD/hello-a.hex" "$TMPD/hello-x.hex" >"$TMPD/hellos.hex" 2>/dev/null
note "captured ClientHellos: $(wc -l <"$TMPD/hellos.hex") ($(tr '\n' ' ' <"$TMPD/capture.out"))"
(($(wc -l <"$TMPD/hellos.hex") >= 1)) || die "no real ClientHello captured"
wait_log b 'unknown_peer' 2 && note "b logged x's hello as unknown_peer"

# ---- the flood's source addresses
for ((i = 0; i < NSRC; i++)); do
	echo "addr add 203.0.113.$((10 + i))/24 dev $VETH"
done | ip -n "$NS_c" -batch - || die "flood source addresses on c"

bpid=${NODE_PID[b]}
[[ $(cat "/proc/$bpid/comm" 2>/dev/null) == veil ]] || die "PID $bpid is not b's veil process"
HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null; }
refused_total() { st b '[.admission.refused[]?] | add // 0'; }
# hellos that got as far as b's Diffie-Hellman: they fail after it (a random body), come from an
# unknown key, or are a's own hello again; each costs b real work, so the admission limiter
# must keep their number near handshake_rate per second
dh_work() { st b '[.drops.handshake_failed, .drops.unknown_peer, .drops.stale_hello] | map(. // 0) | add'; }
ref0=$(refused_total) drops0=$(drops_total b) lines0=$(wc -l <"${NODE_LOG[b]}") dh0=$(dh_work)
rss0=$(awk '/^VmRSS/ { print $2 }' "/proc/$bpid/status")
ticks0=$(cpu_ticks "$bpid") t_start=$(now_ms)
note "b before the flood: VmRSS ${rss0} kB, refused $ref0, drops $drops0"

ip netns exec "$NS_c" timeout --foreground $((FLOOD_S + 10)) python3 "$NETNS_DIR/flood.py" flood "$SRC_BASE" "$NSRC" "$UL4_b" "$PORT" \
	"$(pub b)" "$FLOOD_S" "$FLOOD_PPS" "$TMPD/hellos.hex" >"$TMPD/flood.out" 2>&1 </dev/null &
flood_pid=$!
# b's VmRSS every 0.2 s while the flood runs (bounded by count as well)
(
	for ((i = 0; i < (FLOOD_S + 10) * 5; i++)); do
		kill -0 "$flood_pid" 2>/dev/null || break
		awk '/^VmRSS/ { print $2 }' "/proc/$bpid/status" 2>/dev/null || break
		sleep 0.2
	done
) >"$TMPD/rss.samples" &
sampler_pid=$!

sleep 2
kill -0 "$flood_pid" 2>/dev/null || die "the flood ended early: $(cat "$TMPD/flood.out")"
mid=$(st b '.admission.refused // empty' | tr -d ' \n')
note "2 s into the flood: b's admission.refused ${mid:-unreadable}"

# ---- a restarts during the flood
node_stop a
wait_gone a || die "a's TUN did not go away"
node_start a
wait_ready a
reached=0
ping_within a "$OL4_b" 5 && reached=1
t=$WAITED_MS
flood_running=0
kill -0 "$flood_pid" 2>/dev/null && flood_running=1
check "restarted a reaches b within 5 s during the flood" \
	"no reply after ${t} ms (flood still running: $flood_running)" test "$reached" -eq 1 -a "$flood_running" -eq 1
((reached)) && note "a reached b ${t} ms after its restart"
# A flood that outruns b's single loop (on a slow or busy machine) makes the kernel drop some
# legitimate datagrams at b's socket too: the tunnel must keep carrying traffic, but a lost echo
# is not a failure. Each try sends 5 echoes; any answer passes.
during=0
for ((i = 0; i < 3; i++)); do
	if nsx b timeout --foreground 8 ping -c 5 -i 0.2 -W 2 -q "$OL4_a" >"$TMPD/ping.during" 2>&1; then during=1; break; fi
done
note "ping b -> a during the flood: $(grep -o '[0-9]* received' "$TMPD/ping.during") of 5 (try $((i + 1)))"
check "ping b -> a during the flood (3 tries of 5 echoes)" "no reply in 3 tries" test "$during" -eq 1

# let the flood run at least FLOOD_MIN_S, then stop it
while (($(now_ms) - t_start < FLOOD_MIN_S * 1000)) && kill -0 "$flood_pid" 2>/dev/null; do sleep 0.2; done
ticks1=$(cpu_ticks "$bpid") t_end=$(now_ms)
kill -TERM "$flood_pid" 2>/dev/null
wait "$flood_pid" 2>/dev/null
wait "$sampler_pid" 2>/dev/null
out=$(cat "$TMPD/flood.out")
note "flood.py: $out"
declare -A F=()
read -ra words <<<"$out"
for ((i = 0; i + 1 < ${#words[@]}; i += 2)); do F[${words[i]}]=${words[i + 1]}; done
check "the flood sent something" "flood.py said: $out" test "${F[sent]:-0}" -gt 10000
valid=$((${F[mac1]:-0} + ${F[replay]:-0}))
((valid > 0)) && note "b answered $((100 * ${F[cookie]:-0} / valid))% of the hellos with a valid MAC1 with a cookie reply"
# cookie replies are budgeted: 10 per handshake_rate unit a second, and as many for peer endpoints
secs=${F[secs]%.*}
cookie_max=$(( (2 * 10 * 100) * (${secs:-10} + 1) ))
check "b's cookie replies stayed within their budget (<= $cookie_max in ${F[secs]:-?} s)" "cookie replies: ${F[cookie]:-?}" \
	test "${F[cookie]:-0}" -le "$cookie_max"

# ---- b afterwards
check "b is alive" "b exited" node_alive b
rss_max=$(sort -n "$TMPD/rss.samples" | tail -n 1)
note "b's VmRSS: ${rss0} kB before, max ${rss_max:-?} kB over $(wc -l <"$TMPD/rss.samples") samples"
check "b's VmRSS stayed under 64 MiB" "max ${rss_max:-unknown} kB" test "${rss_max:-999999}" -lt "$RSS_LIMIT_KB"
secs=$(awk -v a="$t_start" -v b="$t_end" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
cpu=$(awk -v d=$((ticks1 - ticks0)) -v hz="$HZ" -v s="$secs" 'BEGIN { printf "%.0f", 100 * d / hz / s }')
note "b's CPU during the flood: ${cpu}% of one core over ${secs} s ($(nproc) cores)"
check "b's CPU stayed within one core (single event loop: <= 110%)" "${cpu}%" test "${cpu:-999}" -le 110
for ((i = 0; i < 20; i++)); do # counters settle once the socket buffer is drained
	ref1=$(refused_total)
	[[ -n "$ref1" ]] && ((ref1 > ref0)) && break
	sleep 0.1
done
ref1=$(refused_total) drops1=$(drops_total b)
note "b's admission: $(st b '.admission' | tr -d ' \n')"
note "b's drops: $(st b '.drops | to_entries | map(select(.value > 0) | "\(.key)=\(.value)") | join(" ")')"
dh1=$(dh_work) rate=$(st b '.admission.handshake_rate // 100')
dh_max=$(awk -v r="$rate" -v s="$secs" 'BEGIN { printf "%d", r * s * 1.5 + 200 }')
note "hellos that reached b's Diffie-Hellman: $((dh1 - dh0)) in ${secs} s (handshake_rate $rate)"
check "b's Diffie-Hellman work stayed near handshake_rate ($rate/s): <= $dh_max" \
	"$((dh1 - dh0)) hellos reached the DH (handshake_failed + unknown_peer + stale_hello)" \
	test $((dh1 - dh0)) -le "$dh_max"
check "b's admission.refused counters increased" "refused total $ref0 -> ${ref1:-unreadable}" \
	test "${ref1:-0}" -gt "${ref0:-0}"
check "b's drop counters increased" "drops total $drops0 -> ${drops1:-unreadable}" test "${drops1:-0}" -gt "${drops0:-0}"
# The flood fills b's handshake queue (a socket of its own on the port), never the workers' one:
# per socket on b's port, the kernel's drop count (/proc/net/udp*, last column).
port_hex=$(printf '%04X' "$PORT")
sock_drops=$(nsx b cat /proc/net/udp /proc/net/udp6 | awk -v p=":$port_hex" '$2 ~ p"$" { print $NF }' | sort -n | tr '\n' ' ')
check "b read the flood from its handshake queue" "handshake_datagrams $(st b '.workers[0].handshake_datagrams')" \
	test "$(st b '.workers[0].handshake_datagrams // 0')" -gt 1000
check "the flood overflowed no socket but the handshake queue (kernel drops per socket: $sock_drops)" "$sock_drops" \
	bash -c "set -- $sock_drops; (( \$# >= 2 && \$1 == 0 ))"
check "no amplification: b sent back fewer bytes than the flood sent" \
	"bytes_in ${F[bytes_in]:-?} vs bytes_out ${F[bytes_out]:-?}" test "${F[bytes_in]:-1}" -lt "${F[bytes_out]:-0}"
check "b answered no flood ClientHello with a ServerHello" "server_hello replies: ${F[server_hello]:-?}" \
	test "${F[server_hello]:-1}" -eq 0
check "b sent cookie replies under load" "cookie replies: ${F[cookie]:-?}" test "${F[cookie]:-0}" -gt 0
if [[ $(http_code b GET 127.0.0.1 "$MGMT_PORT" /metrics "$TMPD/metrics.txt") == 200 ]]; then
	note "b's metrics: cookies_sent $(metric "$TMPD/metrics.txt" veil_cookies_sent_total)," \
		"refused $(grep '^veil_admission_refused_total' "$TMPD/metrics.txt" | tr '\n' ' ')"
fi
ns_b=$(st b '.admission.sessions // (.sessions | length)')
check "b keeps no sessions for the flood (<= 3)" "sessions $ns_b" test "${ns_b:-99}" -le 3
lines1=$(wc -l <"${NODE_LOG[b]}")
check "b's log stays rate-limited (< 300 lines for the flood)" "log grew by $((lines1 - lines0)) lines" \
	test $((lines1 - lines0)) -lt 300
check "ping a -> b after the flood" "no reply within 5 s" ping_ok a "$OL4_b"
hs_a=$(st b ".peers[] | select(.public_key == \"$(pub a)\") | .state")
check "b sees a up" "state '$hs_a'" test "$hs_a" = up
finish
