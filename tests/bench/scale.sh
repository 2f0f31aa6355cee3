#!/usr/bin/env bash
# scale.sh -- a real mesh of SCALE_NODES (default 100) veil processes, one network namespace each,
# all on one bridge; every node knows only node 1 and learns the others from it (--mesh, one
# network secret). Reports: the time from the last node's start until every node has all the
# others up, then (SCALE_SETTLE_S later, default 5) over SCALE_STEADY_S (default 60; 240 holds one
# refresh of every member list) seconds of no data: bytes each node sends per
# second (control traffic: exchange, keepalives, rekeys), CPU per node and per idle peer, and RSS
# per node. Run by `make scale` (root; a few minutes); not part of make test.
#
#   veil-s-PID-br: bridge br0 ---- veth ---- veil-s-PID-N: ul0 198.51.100.N/24, veil-s 100.64.0.N/24
set -uo pipefail
N=${SCALE_NODES:-100}
STEADY_S=${SCALE_STEADY_S:-60}
LIMIT_S=${SCALE_LIMIT_S:-120}                # give up on the full mesh after this long
VEIL=${VEIL:-$(cd "$(dirname "$0")/../.." && pwd)/out/veil}
((N >= 2 && N <= 200)) || { echo "scale: SCALE_NODES must be 2..200" >&2; exit 2; }
[[ -x $VEIL ]] || { echo "scale: no $VEIL (make build)" >&2; exit 2; }
command -v jq >/dev/null || { echo "scale: needs jq" >&2; exit 2; }
ID=$$
BR=veil-s-$ID-br
TMPD=$(mktemp -d /tmp/veil-scale.XXXXXX)
PIDS=()
cleanup() {
	local p i
	for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
	for ((i = 0; i < 30; i++)); do
		kill -0 "${PIDS[@]}" 2>/dev/null || break
		sleep 0.2
	done
	for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
	for ((i = 1; i <= N; i++)); do ip netns del "veil-s-$ID-$i" 2>/dev/null; done
	ip netns del "$BR" 2>/dev/null
	rm -rf "$TMPD"
}
trap cleanup EXIT
now_ms() { echo $(($(date +%s%N) / 1000000)); }
mac() { printf '02:00:00:00:%02x:%02x' $(($1 / 256)) $(($1 % 256)); }

ip netns add "$BR" || exit 1
ip -n "$BR" link add br0 type bridge && ip -n "$BR" link set br0 up && ip -n "$BR" link set lo up || exit 1
(umask 077 && "$VEIL" genpsk >"$TMPD/net.psk")
for ((i = 1; i <= N; i++)); do
	ns=veil-s-$ID-$i
	ip netns add "$ns" || exit 1
	ip -n "$ns" link set lo up
	ip link add "p$ID-$i" netns "$BR" type veth peer name ul0 netns "$ns" || exit 1
	ip -n "$BR" link set "p$ID-$i" master br0 up
	ip -n "$ns" link set ul0 address "$(mac "$i")"
	ip -n "$ns" addr add "198.51.100.$i/24" dev ul0 && ip -n "$ns" link set ul0 up
	(umask 077 && "$VEIL" genkey >"$TMPD/$i.key")
	"$VEIL" pubkey <"$TMPD/$i.key" >"$TMPD/$i.pub"
done
# Static neighbours: N nodes each asking ARP for N-1 others at once is N*(N-1) broadcasts that a
# software bridge on a small machine floods to every port and drops (softnet backlog); measure the
# mesh, not that storm.
for ((i = 1; i <= N; i++)); do
	for ((j = 1; j <= N; j++)); do ((i == j)) || echo "neigh replace 198.51.100.$j lladdr $(mac "$j") dev ul0 nud permanent"; done |
		ip -n "veil-s-$ID-$i" -batch - || exit 1
done
echo "scale: $N namespaces on one bridge" >&2
pub1=$(cat "$TMPD/1.pub")
for ((i = 1; i <= N; i++)); do
	peer=()
	((i > 1)) && peer=(--peer "$pub1@198.51.100.1:51820")
	ip netns exec "veil-s-$ID-$i" "$VEIL" up --key "$TMPD/$i.key" --psk "$TMPD/net.psk" --mesh --name "n$i" \
		--listen "198.51.100.$i:51820" --address "100.64.0.$i/24" --network 100.64.0.0/24 --tun veil-s \
		--control "$TMPD/$i.sock" --mgmt off --log-level "${SCALE_LOG_LEVEL:-warn}" "${peer[@]}" >"$TMPD/$i.log" 2>&1 &
	PIDS+=($!)
done
t0=$(now_ms)
echo "scale: $N nodes started" >&2

# status of node I, over its control socket (a path: reachable from this namespace)
st() { timeout 5 "$VEIL" status --json --control "$TMPD/$1.sock" 2>/dev/null; }
# Peers up (the same count as status's "up" state), from the one-line health answer: polling the
# full status JSON through jq for every node took a quarter of both cores while the mesh formed.
ups() { timeout 5 "$VEIL" health --control "$TMPD/$1.sock" 2>/dev/null | sed -n 's/^ok: \([0-9]*\) of .*/\1/p'; }
# One node at a time, each until it has all the others up: while the mesh forms, one poll per
# 0.1 s (a sweep of all nodes per round took the cores the mesh needs). The time itself comes
# from the nodes afterwards: when each one's last peer came up (now - the smallest peers[].up_s).
pending=()
for ((i = 1; i <= N; i++)); do pending+=("$i"); done
full_ms=-1
while ((${#pending[@]} > 0)) && (($(now_ms) - t0 < LIMIT_S * 1000)); do
	if [[ $(ups "${pending[0]}") == $((N - 1)) ]]; then pending=("${pending[@]:1}"); else sleep 0.1; fi
done
if ((${#pending[@]} == 0)); then
	for ((i = 1; i <= N; i++)); do
		at=$(now_ms)
		youngest_ms=$(st "$i" | jq '[.peers[].up_s] | min * 1000 | floor')
		[[ $youngest_ms =~ ^[0-9]+$ ]] || { echo "scale: n$i lost a peer before it was read" >&2; exit 1; }
		((at - youngest_ms - t0 > full_ms)) && full_ms=$((at - youngest_ms - t0))
	done
fi
if ((full_ms < 0)); then
	echo "scale: no full mesh within ${LIMIT_S} s: ${#pending[@]} nodes short (e.g. n${pending[0]}: $(ups "${pending[0]}") up)" >&2
	if [[ -n ${SCALE_KEEP:-} ]]; then
		mkdir -p "$SCALE_KEEP"
		for ((i = 1; i <= N; i++)); do
			st "$i" >"$SCALE_KEEP/$i.json"
			cp "$TMPD/$i.log" "$SCALE_KEEP/"
			ip netns exec "veil-s-$ID-$i" cat /proc/net/snmp >"$SCALE_KEEP/$i.snmp"
		done
		echo "$ID" >"$SCALE_KEEP/id"
		[[ -z ${SCALE_HOLD_S:-} ]] || sleep "$SCALE_HOLD_S"
	fi
	exit 1
fi

# steady state: no data, only what the mesh itself sends
sample() { # I -> "tx_bytes cpu_ticks rss_kb exchange_bytes relayed_bytes handshakes": wire bytes include IP and UDP headers
	local pid=${PIDS[$(($1 - 1))]} tx
	tx=$(ip netns exec "veil-s-$ID-$1" cat /sys/class/net/ul0/statistics/tx_bytes)
	echo "$tx $(awk '{print $14 + $15}' "/proc/$pid/stat") $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")" \
		"$(st "$1" | jq -r '[.mesh.exchange_sent_bytes, .relay.bytes, ([.peers[].handshakes] | add)] | map(tostring) | join(" ")')"
}
sleep "${SCALE_SETTLE_S:-5}"
declare -a before after
for ((i = 1; i <= N; i++)); do before[i]=$(sample "$i"); done
sleep "$STEADY_S"
for ((i = 1; i <= N; i++)); do after[i]=$(sample "$i"); done
still=0
for ((i = 1; i <= N; i++)); do [[ $(ups "$i") == $((N - 1)) ]] && still=$((still + 1)); done
hz=$(getconf CLK_TCK)
for ((i = 1; i <= N; i++)); do
	read -r tx1 c1 _ ex1 rl1 hs1 <<<"${before[i]}"
	read -r tx2 c2 rss ex2 rl2 hs2 <<<"${after[i]}"
	echo "$(((tx2 - tx1) / STEADY_S)) $(((c2 - c1) * 1000000 / hz / STEADY_S)) $rss $(((ex2 - ex1) / STEADY_S)) $(((rl2 - rl1) / STEADY_S)) $((hs2 - hs1))"
done >"$TMPD/steady"
stats() { # COLUMN -> "mean max"
	awk -v c="$1" '{ s += $c; if ($c > m) m = $c } END { printf "%d %d", s / NR, m }' "$TMPD/steady"
}
read -r bps_mean bps_max <<<"$(stats 1)"
read -r cpu_mean cpu_max <<<"$(stats 2)"
read -r rss_mean rss_max <<<"$(stats 3)"
read -r ex_mean ex_max <<<"$(stats 4)"
read -r rl_mean rl_max <<<"$(stats 5)"
read -r hs_mean hs_max <<<"$(stats 6)"
peers=$((N - 1))
printf 'scale: nodes=%d full_mesh_ms=%d (after the last start) still_full_after_%ds=%d/%d\n' "$N" "$full_ms" "$STEADY_S" "$still" "$N"
printf 'scale: steady control bytes/s per node: mean %d, max %d\n' "$bps_mean" "$bps_max"
printf 'scale: of which exchange messages %d B/s (max %d), relayed for others %d B/s (max %d); handshakes in %d s: mean %d, max %d\n' \
	"$ex_mean" "$ex_max" "$rl_mean" "$rl_max" "$STEADY_S" "$hs_mean" "$hs_max"
printf 'scale: CPU per node: mean %d us/s (%d us/s per idle peer), max %d us/s\n' "$cpu_mean" "$((cpu_mean / peers))" "$cpu_max"
printf 'scale: RSS per node: mean %d KB, max %d KB (%d peers each)\n' "$rss_mean" "$rss_max" "$peers"
[[ $still == "$N" ]]
