#!/usr/bin/env bash
# Helpers for measure.sh and the implementations in impl/. Source it; do not run it.
#
# One measurement builds this (names carry measure.sh's PID, so two runs never share a namespace,
# and cleanup only ever touches its own):
#
#   veil-b-PID-a                                     veil-b-PID-b
#   ul0  198.51.100.1/24  2001:db8:1::1/64  <-veth->  ul0  198.51.100.2/24  2001:db8:1::2/64
#   overlay (TUN of the implementation, or ul0 itself for "plain"):
#        100.64.0.1/24    fd00:64::1/64               100.64.0.2/24    fd00:64::2/64
#
# With a lossy link (measure.sh --relay) a third namespace veil-b-PID-m sits in the middle; it does
# not forward IP, so the peers reach each other only through relay.c's two UDP sockets:
#
#   a: ul0 198.51.100.1/25 <-veth-> m: ula 198.51.100.126/25 | relay | m: ulb 198.51.100.129/25 <-veth-> b: ul0 198.51.100.130/25
#
# Each implementation dials its peer at EP_OF_B (a's view) and EP_OF_A (b's view): the peer's own
# address on a direct link, the relay's address on a lossy one. Addresses used: underlay
# 198.51.100.0/24 and 2001:db8::/32, overlays 100.64.0.0/10 and fd00::/8, nothing else.
# shellcheck disable=SC2034  # the variables are read by the files that source this one

BENCH_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUN_ID=${RUN_ID:-$$}
NS_A=veil-b-$RUN_ID-a
NS_B=veil-b-$RUN_ID-b
NS_M=veil-b-$RUN_ID-m
UL_DEV=ul0
UL4_A=198.51.100.1 UL4_B=198.51.100.2
UL6_A=2001:db8:1::1 UL6_B=2001:db8:1::2
UL4_LEN=24
EP_OF_A=$UL4_A EP_OF_B=$UL4_B
RELAY_A=198.51.100.126 RELAY_B=198.51.100.129 # the middle namespace's side towards a, towards b
OL4_A=100.64.0.1 OL4_B=100.64.0.2 OL4_LEN=24
OL6_A=fd00:64::1 OL6_B=fd00:64::2 OL6_LEN=64
NAMESPACES=()

say() { printf 'bench: %s\n' "$*" >&2; }
fail() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# ---- namespaces ------------------------------------------------------------------------------

# link_pair NS1 DEV1 NS2 DEV2 -- a veth between two namespaces, both ends up
link_pair() {
	ip link add "$2" netns "$1" type veth peer name "$4" netns "$3" || fail "veth $1/$2 <-> $3/$4"
	ip -n "$1" link set "$2" up && ip -n "$3" link set "$4" up || fail "veth up"
}

# net_up [direct|lossy] -- build the namespaces and check the underlay answers (bounded, 5 s)
net_up() {
	local mode=${1:-direct} ns i
	NAMESPACES=("$NS_A" "$NS_B")
	[[ $mode == lossy ]] && NAMESPACES+=("$NS_M")
	for ns in "${NAMESPACES[@]}"; do
		ip netns add "$ns" || fail "ip netns add $ns"
		ip -n "$ns" link set lo up
	done
	if [[ $mode == direct ]]; then
		link_pair "$NS_A" "$UL_DEV" "$NS_B" "$UL_DEV"
		ip -n "$NS_A" -6 addr add "$UL6_A/64" dev "$UL_DEV" nodad
		ip -n "$NS_B" -6 addr add "$UL6_B/64" dev "$UL_DEV" nodad
	else
		UL4_B=198.51.100.130 UL4_LEN=25 EP_OF_B=$RELAY_A EP_OF_A=$RELAY_B
		link_pair "$NS_A" "$UL_DEV" "$NS_M" ula
		link_pair "$NS_M" ulb "$NS_B" "$UL_DEV"
		ip -n "$NS_M" addr add "$RELAY_A/25" dev ula
		ip -n "$NS_M" addr add "$RELAY_B/25" dev ulb
	fi
	ip -n "$NS_A" addr add "$UL4_A/$UL4_LEN" dev "$UL_DEV"
	ip -n "$NS_B" addr add "$UL4_B/$UL4_LEN" dev "$UL_DEV"
	for ((i = 0; i < 50; i++)); do
		in_ns "$NS_A" ping -c1 -W1 -q "$EP_OF_B" >/dev/null 2>&1 &&
			in_ns "$NS_B" ping -c1 -W1 -q "$EP_OF_A" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	fail "the underlay does not answer ping ($mode)"
}

# net_down -- stop whatever still runs in our namespaces (TERM, then KILL after 2 s), delete them
net_down() {
	local ns pid i
	for ns in "${NAMESPACES[@]}"; do
		ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF "$ns" || continue
		for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null; done
		for ((i = 0; i < 20; i++)); do
			[[ -z "$(ip netns pids "$ns" 2>/dev/null)" ]] && break
			sleep 0.1
		done
		for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
		ip netns del "$ns" 2>/dev/null || say "could not delete namespace $ns"
	done
	NAMESPACES=()
}

# ---- daemons ---------------------------------------------------------------------------------
# STATE is the implementation's scratch dir ($BENCH_STATE_ROOT/NAME). Every daemon started here
# gets a line "PID TAG COMM" in STATE/pids: CPU accounting and stopping go by it, and bench.sh's
# sampler reads veil's (tags veil-a, veil-b; control sockets STATE/a.sock, STATE/b.sock).

# spawn TAG NS CMD... -- CMD in the background inside NS, output to STATE/TAG.log.
# `ip netns exec` execs the command in place, so $! is the daemon itself.
spawn() {
	local tag=$1 ns=$2; shift 2
	ip netns exec "$ns" "$@" >"$STATE/$tag.log" 2>&1 </dev/null &
	local pid=$! comm
	comm=$(basename "$1")
	printf '%s %s %s\n' "$pid" "$tag" "${comm:0:15}" >>"$STATE/pids"
}

# ours PID COMM -- PID is alive and still runs the program we started
ours() { [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]]; }

# reap -- TERM each recorded daemon, wait for them (bounded, 3 s), KILL what is left
reap() {
	[[ -f "$STATE/pids" ]] || return 0
	local pid tag comm i left
	while read -r pid tag comm; do ours "$pid" "$comm" && kill -TERM "$pid" 2>/dev/null; done <"$STATE/pids"
	for ((i = 0; i < 30; i++)); do
		left=0
		while read -r pid tag comm; do ours "$pid" "$comm" && left=1; done <"$STATE/pids"
		((left)) || break
		sleep 0.1
	done
	while read -r pid tag comm; do
		ours "$pid" "$comm" && { say "$tag (pid $pid) ignored TERM, killing it"; kill -KILL "$pid" 2>/dev/null; }
	done <"$STATE/pids"
	rm -f "$STATE/pids"
}

# cpu_ticks -- user+system clock ticks of all recorded daemons so far (0 without daemons)
cpu_ticks() {
	local pid tag comm sum=0 t
	if [[ -f "$STATE/pids" ]]; then
		while read -r pid tag comm; do
			# /proc/PID/stat: after "(comm) " come state, ppid, ... utime is the 12th, stime the 13th
			t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}')
			sum=$((sum + ${t:-0}))
		done <"$STATE/pids"
	fi
	echo "$sum"
}

# until_ok TRIES CMD... -- retry CMD every 0.1 s, at most TRIES times
until_ok() {
	local tries=$1 i; shift
	for ((i = 0; i < tries; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
	return 1
}

# has_addr NS DEV ADDR -- DEV in NS carries ADDR
has_addr() { ip -n "$1" -o addr show dev "$2" 2>/dev/null | grep -q " ${3}/"; }

# show_logs -- the tail of every daemon log (after a failure)
show_logs() {
	local f
	for f in "$STATE"/*.log; do
		[[ -f $f ]] || continue
		printf -- '--- %s\n' "${f##*/}" >&2
		tail -n 15 "$f" >&2
	done
}
