#!/usr/bin/env bash
# Shared helpers for the namespace tests in this folder. Source it; do not run it.
#
# Every scenario builds this pair of hosts (veil up adds the TUN side):
#
#   namespace veil-t-$$-a                            namespace veil-t-$$-b
#   +--------------------------------+              +--------------------------------+
#   | veil-a  100.64.0.1/24 (TUN)    |              | veil-b  100.64.0.2/24 (TUN)    |
#   |         fd00:64::1/64          |              |         fd00:64::2/64          |
#   |   veil up, UDP port 51820      |              |   veil up, UDP port 51820      |
#   | veth0   198.51.100.1/24        |<--- veth --->| veth0   198.51.100.2/24        |
#   |         2001:db8:1::1/64       |              |         2001:db8:1::2/64       |
#   +--------------------------------+              +--------------------------------+
#
# Only the DESIGN.md test ranges are used: underlay 198.51.100.0/24 and
# 2001:db8:1::/64 (192.0.2.0/24 as a never-assigned address in badflags.sh),
# overlay 100.64.0.0/24 and fd00:64::/64. Nothing leaves the two namespaces.
#
# A node is named a or b; its namespace, TUN, key, control socket and log
# follow from the name. Scripts print "ok - NAME" / "not ok - NAME: REASON"
# and exit 0 only if nothing failed. Every wait is bounded in count and time.
# Commands are bounded with `timeout --foreground` so they stay in the script's process
# group: when run-all.sh's own timeout fires, its SIGTERM reaches them too, they end at
# once, and the EXIT trap gets to clean up.
# shellcheck disable=SC2034  # constants are used by the scripts that source this

set -uo pipefail

NETNS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$NETNS_DIR/../.." && pwd)
VEIL=${VEIL_BIN:-$REPO_ROOT/out/veil}
if [[ "$VEIL" != /* ]]; then VEIL="$PWD/$VEIL"; fi
T_NAME=$(basename "$0" .sh)

PORT=51820
NS_a=veil-t-$$-a  NS_b=veil-t-$$-b
TUN_a=veil-a      TUN_b=veil-b
UL4_a=198.51.100.1 UL4_b=198.51.100.2
UL6_a=2001:db8:1::1 UL6_b=2001:db8:1::2
OL4_a=100.64.0.1  OL4_b=100.64.0.2
OL6_a=fd00:64::1  OL6_b=fd00:64::2
VETH=veth0
UL=4               # underlay family node_start uses for --listen and --peer
# an optional third node c (net_add_c): its own namespace, joined to a or b by a second veth
NS_c=veil-t-$$-c  TUN_c=veil-c
UL4_c=203.0.113.3 UL6_c=2001:db8:3::3
OL4_c=100.64.0.3  OL6_c=fd00:64::3
VETH_C=veth1       # the name of c's link on the node it hangs off (c's own end is veth0)
UL4_VIA_c=''       # that node's address on the c link (set by net_add_c)
UL6_VIA_c=''
NS_ALL=("$NS_a" "$NS_b") # every namespace cleanup removes
MGMT_PORT=7777

FAILS=0
TMPD=''
declare -A NODE_PID=() NODE_LOG=()
NODE_RUNS=0

# ---- reporting ------------------------------------------------------------------------------

ok() { printf 'ok - %s\n' "$1"; }
not_ok() { printf 'not ok - %s: %s\n' "$1" "$2"; FAILS=$((FAILS + 1)); }
# check NAME REASON CMD... -- ok if CMD succeeds, else not ok with REASON
check() {
	local name=$1 reason=$2; shift 2
	if "$@"; then ok "$name"; else not_ok "$name" "$reason"; fi
}
# die REASON -- a setup step failed: report it and stop (cleanup runs from the trap)
die() { not_ok "$T_NAME setup" "$1"; exit 1; }
note() { printf '# %s\n' "$*"; }
# quiet CMD... -- CMD with its output thrown away (for `check ... quiet jq -e ...`)
quiet() { "$@" >/dev/null 2>&1; }
finish() { if ((FAILS == 0)); then exit 0; else exit 1; fi; }

other() { if [[ $1 == a ]]; then echo b; else echo a; fi; }
ns() { local v="NS_$1"; echo "${!v}"; }
tun() { local v="TUN_$1"; echo "${!v}"; }
ul4() { local v="UL4_$1"; echo "${!v}"; }
ul6() { local v="UL6_$1"; echo "${!v}"; }
ol4() { local v="OL4_$1"; echo "${!v}"; }
ol6() { local v="OL6_$1"; echo "${!v}"; }
sock() { echo "$TMPD/$1.sock"; }
# nsx NODE CMD... -- run CMD in NODE's namespace
nsx() { local n; n=$(ns "$1"); shift; ip netns exec "$n" "$@"; }

# ns_add NAME -- a fresh namespace for NAME with lo up, remembered in NS_ALL for teardown
ns_add() {
	local n
	n=$(ns "$1")
	NS_ALL+=("$n")
	ip netns add "$n" || die "ip netns add $n"
	ip -n "$n" link set lo up || die "lo up in $1"
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# ---- setup and teardown ---------------------------------------------------------------------

# net_begin -- what every scenario needs before its first namespace: root, the binary and the
# tools, the temp dir, and the EXIT trap (cleanup). net_setup calls it; a scenario that builds
# its own topology (mesh.sh) calls it instead of net_setup and appends its namespaces to NS_ALL.
net_begin() {
	[[ $EUID -eq 0 ]] || die "must run as root (network namespaces, TUN)"
	[[ -x "$VEIL" ]] || die "veil binary not found or not executable: $VEIL (make build, or set VEIL_BIN)"
	local c
	for c in ip ping jq timeout; do command -v "$c" >/dev/null || die "missing command $c (make deps)"; done
	umask 077
	TMPD=$(mktemp -d "/tmp/veil-t-$$.XXXXXX") || die "mktemp failed"
	chmod 700 "$TMPD"
	# keep the script's stdout/stderr: a signal may arrive inside a function call whose
	# output is redirected (nsx ... >/dev/null), and cleanup must still be heard
	exec 8>&1 9>&2
	trap cleanup EXIT
	trap 'exit 143' TERM INT
}

# net_setup -- temp dir, two namespaces joined by a veth, v4+v6 underlay, lo up,
# and an underlay ping in both families (bounded)
net_setup() {
	net_begin
	ip netns add "$NS_a" || die "ip netns add $NS_a"
	ip netns add "$NS_b" || die "ip netns add $NS_b"
	ip link add "$VETH" netns "$NS_a" type veth peer name "$VETH" netns "$NS_b" || die "veth"
	local n
	for n in a b; do
		ip -n "$(ns $n)" link set lo up || die "lo up in $n"
		ip -n "$(ns $n)" addr add "$(ul4 $n)/24" dev "$VETH" || die "v4 underlay on $n"
		ip -n "$(ns $n)" -6 addr add "$(ul6 $n)/64" dev "$VETH" nodad || die "v6 underlay on $n"
		ip -n "$(ns $n)" link set "$VETH" up || die "veth up in $n"
	done
	local i
	for ((i = 0; i < 50; i++)); do
		if nsx a timeout --foreground 2 ping -c 1 -W 1 -q "$UL4_b" >/dev/null 2>&1 &&
			nsx a timeout --foreground 2 ping -c 1 -W 1 -q "$UL6_b" >/dev/null 2>&1; then
			return 0
		fi
		sleep 0.1
	done
	die "underlay ping a -> b (v4 and v6) failed"
}

# net_add_c VIA -- a third namespace for node c, joined to node VIA (a or b) by a veth:
# veth1 in VIA (203.0.113.1 for a, .2 for b; 2001:db8:3::1 or ::2) <-> veth0 in c
# (203.0.113.3, 2001:db8:3::3). c gets a route to 198.51.100.0/24 and 2001:db8:1::/64
# through VIA, so it can reach VIA's first-link addresses too (no forwarding is needed:
# they are VIA's own). Waits (bounded) for an underlay ping c -> VIA.
net_add_c() {
	local via=$1 idx
	if [[ $via == a ]]; then idx=1; else idx=2; fi
	UL4_VIA_c=203.0.113.$idx UL6_VIA_c=2001:db8:3::$idx
	NS_ALL+=("$NS_c")
	ip netns add "$NS_c" || die "ip netns add $NS_c"
	ip link add "$VETH_C" netns "$(ns "$via")" type veth peer name "$VETH" netns "$NS_c" || die "veth to c"
	ip -n "$NS_c" link set lo up || die "lo up in c"
	ip -n "$NS_c" addr add "$UL4_c/24" dev "$VETH" || die "v4 underlay on c"
	ip -n "$NS_c" -6 addr add "$UL6_c/64" dev "$VETH" nodad || die "v6 underlay on c"
	ip -n "$NS_c" link set "$VETH" up || die "veth up in c"
	ip -n "$(ns "$via")" addr add "$UL4_VIA_c/24" dev "$VETH_C" || die "v4 c-link on $via"
	ip -n "$(ns "$via")" -6 addr add "$UL6_VIA_c/64" dev "$VETH_C" nodad || die "v6 c-link on $via"
	ip -n "$(ns "$via")" link set "$VETH_C" up || die "c-link up on $via"
	ip -n "$NS_c" route add 198.51.100.0/24 via "$UL4_VIA_c" || die "route c -> 198.51.100.0/24"
	ip -n "$NS_c" -6 route add 2001:db8:1::/64 via "$UL6_VIA_c" || die "route c -> 2001:db8:1::/64"
	local i
	for ((i = 0; i < 50; i++)); do
		nsx c timeout --foreground 2 ping -c 1 -W 1 -q "$UL4_VIA_c" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	die "underlay ping c -> $via failed"
}

cleanup() {
	local rc=$? n pid i
	trap - EXIT TERM INT
	exec 1>&8 2>&9
	for n in "${!NODE_PID[@]}"; do node_stop "$n" >/dev/null 2>&1; done
	# anything else still inside our own namespaces (iperf3, sniffers) was started by this script
	for n in "${NS_ALL[@]}"; do
		for pid in $(ip netns pids "$n" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null; done
	done
	local left
	for ((i = 0; i < 20; i++)); do
		left=''
		for n in "${NS_ALL[@]}"; do left+=$(ip netns pids "$n" 2>/dev/null); done
		[[ -z "$left" ]] && break
		sleep 0.1
	done
	for n in "${NS_ALL[@]}"; do
		for pid in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
		ip netns del "$n" 2>/dev/null
	done
	if ((rc != 0 || FAILS != 0)); then dump_logs; fi
	[[ -n "$TMPD" ]] && rm -rf "$TMPD"
	exit "$rc"
}

dump_logs() {
	local f
	[[ -n "$TMPD" ]] || return 0
	for f in "$TMPD"/*.log; do
		[[ -f "$f" ]] || continue
		printf '# ---- %s (last 40 lines)\n' "$(basename "$f")"
		tail -n 40 "$f" | sed 's/^/#   /'
	done
}

# ---- keys -----------------------------------------------------------------------------------

# keys_make NAME... -- $TMPD/NAME.key (mode 0600) and NAME.pub via veil genkey/pubkey
keys_make() {
	local k
	for k in "$@"; do
		"$VEIL" genkey >"$TMPD/$k.key" || die "veil genkey failed"
		chmod 600 "$TMPD/$k.key"
		"$VEIL" pubkey <"$TMPD/$k.key" >"$TMPD/$k.pub" || die "veil pubkey failed"
		[[ -s "$TMPD/$k.key" && -s "$TMPD/$k.pub" ]] || die "veil genkey/pubkey printed nothing"
	done
}
# psk_make NAME -- $TMPD/NAME.psk (mode 0600) via veil genpsk
psk_make() {
	"$VEIL" genpsk >"$TMPD/$1.psk" || die "veil genpsk failed"
	chmod 600 "$TMPD/$1.psk"
	[[ -s "$TMPD/$1.psk" ]] || die "veil genpsk printed nothing"
}
pub() { tr -d '\n' <"$TMPD/$1.pub"; }

# ---- nodes ----------------------------------------------------------------------------------

# node_start NODE [EXTRA-UP-FLAGS...] -- veil up in NODE's namespace with the standard
# flags and the other node as its one peer; stderr+stdout go to a fresh log file.
# Knobs: UL=6 uses the IPv6 underlay; PEER_PUB=KEY overrides the peer's public key.
# Must not run in a subshell: the daemon stays a child of the test script.
node_start() {
	local n=$1 o; shift
	o=$(other "$n")
	local listen ep peer
	listen="$(ul4 "$n"):$PORT" ep="$(ul4 "$o"):$PORT"
	if [[ $UL == 6 ]]; then listen="[$(ul6 "$n")]:$PORT" ep="[$(ul6 "$o")]:$PORT"; fi
	peer=${PEER_PUB:-$(pub "$o")}
	NODE_RUNS=$((NODE_RUNS + 1))
	NODE_LOG[$n]="$TMPD/$NODE_RUNS-$n.log"
	ip netns exec "$(ns "$n")" "$VEIL" up --key "$TMPD/$n.key" --listen "$listen" \
		--address "$(ol4 "$n")/24" --address "$(ol6 "$n")/64" --tun "$(tun "$n")" \
		--peer "$peer@$ep" --allow "$(ol4 "$o")/32" --allow "$(ol6 "$o")/128" \
		--control "$(sock "$n")" --log-level "${VEIL_LOG_LEVEL:-info}" "$@" \
		>"${NODE_LOG[$n]}" 2>&1 </dev/null &
	NODE_PID[$n]=$!
}

# node_run NODE ARGS... -- `veil ARGS...` in NODE's namespace, tracked like node_start
# (NODE_PID, NODE_LOG, stopped by cleanup) but with every flag given by the caller.
# Must not run in a subshell. `ip netns exec` execs, so NODE_PID is veil's own PID.
node_run() {
	local n=$1; shift
	NODE_RUNS=$((NODE_RUNS + 1))
	NODE_LOG[$n]="$TMPD/$NODE_RUNS-$n.log"
	ip netns exec "$(ns "$n")" "$VEIL" "$@" >"${NODE_LOG[$n]}" 2>&1 </dev/null &
	NODE_PID[$n]=$!
}

node_alive() { [[ -n "${NODE_PID[$1]:-}" ]] && kill -0 "${NODE_PID[$1]}" 2>/dev/null; }

# tun_ready NODE -- the TUN exists, is UP and carries both overlay addresses
tun_ready() {
	local n=$1 link addrs
	link=$(ip -n "$(ns "$n")" -o link show dev "$(tun "$n")" 2>/dev/null) || return 1
	[[ $link =~ [\<,]UP[,\>] ]] || return 1
	addrs=$(ip -n "$(ns "$n")" -o addr show dev "$(tun "$n")" 2>/dev/null) || return 1
	grep -q " $(ol4 "$n")/24 " <<<"$addrs" && grep " $(ol6 "$n")/64 " <<<"$addrs" | grep -vq tentative
}

# wait_ready NODE... -- bounded (10 s) wait until every NODE's TUN is ready
wait_ready() {
	local n i
	for n in "$@"; do
		for ((i = 0; i < 100; i++)); do
			tun_ready "$n" && break
			node_alive "$n" || die "node $n exited during start-up"
			sleep 0.1
		done
		tun_ready "$n" || die "node $n: TUN $(tun "$n") not up with its addresses within 10 s"
	done
}

tun_gone() { ! ip -n "$(ns "$1")" link show dev "$(tun "$1")" >/dev/null 2>&1; }

# wait_gone NODE [TENTHS] -- bounded wait until NODE's TUN has disappeared
wait_gone() {
	local i
	for ((i = 0; i < ${2:-20}; i++)); do
		tun_gone "$1" && return 0
		sleep 0.1
	done
	tun_gone "$1"
}

# node_stop NODE -- SIGTERM, wait up to 3 s, then SIGKILL; sets NODE_RC to the exit status
node_stop() {
	local n=$1 pid=${NODE_PID[$1]:-} i
	NODE_RC=''
	[[ -n "$pid" ]] || return 0
	kill -TERM "$pid" 2>/dev/null
	for ((i = 0; i < 30; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null
	wait "$pid" 2>/dev/null
	NODE_RC=$?
	unset "NODE_PID[$n]"
}

# node_exited NODE T0 LIMIT_MS -- wait until NODE's daemon (already signalled at T0 ms) exits, at
# most until T0 + LIMIT_MS. Sets EXIT_MS (ms since T0). Exited: reaps it, sets NODE_RC, returns 0.
node_exited() {
	local n=$1 t0=$2 limit=$3 pid=${NODE_PID[$1]:-}
	while (($(now_ms) - t0 < limit)) && kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
	EXIT_MS=$(($(now_ms) - t0))
	kill -0 "$pid" 2>/dev/null && return 1
	wait "$pid"
	NODE_RC=$?
	unset "NODE_PID[$n]"
}

# ---- observing ------------------------------------------------------------------------------

# st NODE JQ-FILTER -- one value from `veil status --json` of NODE (empty if unreachable)
st() {
	nsx "$1" timeout --foreground 5 "$VEIL" status --json --control "$(sock "$1")" 2>/dev/null | jq -r "$2" 2>/dev/null
}
drops_total() { st "$1" '[.drops[]] | add // 0'; }

# wait_log NODE REGEX [SECONDS] -- bounded wait until NODE's current log matches
wait_log() {
	local i
	for ((i = 0; i < ${3:-5} * 10; i++)); do
		grep -Eq -- "$2" "${NODE_LOG[$1]}" 2>/dev/null && return 0
		sleep 0.1
	done
	return 1
}

# ping_ok FROM DST [WAIT-S] -- one echo request from FROM's namespace, one reply within WAIT-S
ping_ok() {
	nsx "$1" timeout --foreground $((${3:-5} + 3)) ping -c 1 -W "${3:-5}" -q "$2" >/dev/null 2>&1
}

# ping_within NODE ADDR SECONDS -- one-second pings until one is answered or SECONDS pass;
# sets WAITED_MS to the time it took (or waited), returns 0 when answered
ping_within() {
	local t0 i
	t0=$(now_ms)
	for ((i = 0; i < $3; i++)); do
		if ping_ok "$1" "$2" 1; then WAITED_MS=$(($(now_ms) - t0)); return 0; fi
		(($(now_ms) - t0 < $3 * 1000)) || break
	done
	WAITED_MS=$(($(now_ms) - t0))
	return 1
}

# wait_until SECONDS CMD... -- run CMD every 0.2 s until it succeeds or SECONDS pass; sets
# WAITED_MS to the time it took (or waited), returns 0 when CMD succeeded
wait_until() {
	local secs=$1 t0 i; shift
	t0=$(now_ms)
	for ((i = 0; i < secs * 5 + 1; i++)); do
		if "$@"; then WAITED_MS=$(($(now_ms) - t0)); return 0; fi
		(($(now_ms) - t0 < secs * 1000)) || break
		sleep 0.2
	done
	WAITED_MS=$(($(now_ms) - t0))
	return 1
}

# tun_packets NODE rx|tx -- the kernel's packet counter for NODE's TUN
tun_packets() {
	ip -n "$(ns "$1")" -s -j link show dev "$(tun "$1")" 2>/dev/null | jq -r ".[0].stats64.$2.packets"
}

# ---- management HTTP ------------------------------------------------------------------------

# http NODE METHOD HOST PORT PATH [BODY-FILE] -- one request from NODE's namespace (mgmt.py get);
# prints "STATUS CONTENT-TYPE MS", or "refused|reset|closed|timeout - MS"
http() {
	nsx "$1" timeout --foreground 10 python3 "$NETNS_DIR/mgmt.py" get "$2" "$3" "$4" "$5" "${6:-/dev/null}" 2>&1
}
# http_code NODE METHOD HOST PORT PATH [BODY-FILE] -- only the first word of http's line
http_code() { local r; r=$(http "$@"); echo "${r%% *}"; }

# wait_mgmt NODE [HOST] [PORT] -- bounded (10 s) wait until GET /healthz answers 200
wait_mgmt() {
	local i t0
	t0=$(now_ms)
	for ((i = 0; i < 50; i++)); do
		[[ $(http_code "$1" GET "${2:-127.0.0.1}" "${3:-$MGMT_PORT}" /healthz) == 200 ]] && return 0
		node_alive "$1" || return 1
		(($(now_ms) - t0 < 10000)) || return 1
		sleep 0.1
	done
	return 1
}

# metric FILE NAME [LABEL-SUBSTRING] -- the value of the first sample of NAME in a /metrics
# body (optionally the first whose label set contains LABEL-SUBSTRING); empty if none
metric() {
	awk -v name="$2" -v lab="${3:-}" '
		/^#/ { next }
		{ n = $0; sub(/[{ ].*/, "", n) }
		n == name && (lab == "" || index($0, lab)) {
			rest = $0; sub(/^[^{ ]*(\{.*\})? */, "", rest); split(rest, f, " "); print f[1]; exit
		}' "$1"
}

# iperf_server NODE -- iperf3 server on NODE's overlay IPv4 address; waits (bounded) until it listens
iperf_server() {
	nsx "$1" timeout --foreground 120 iperf3 -s -B "$(ol4 "$1")" >"$TMPD/iperf-server.out" 2>&1 </dev/null &
	local i
	for ((i = 0; i < 50; i++)); do
		nsx "$1" ss -Hltn "sport = :5201" 2>/dev/null | grep -q 5201 && return 0
		sleep 0.1
	done
	die "iperf3 server on $1 did not start"
}
