#!/usr/bin/env bash
# nat.sh -- what the relay costs (issue 12, "Numbers"), from one run: single-stream TCP a -> c over
# the overlay through a relay as a ratio to the direct path, the relay's CPU per Mbit/s, its memory
# per relayed pair, and the time to the first overlay ping on each path. Part of `make bench`.
#
# The topology is tests/netns/nat-topology.sh (a behind r1, c behind r2, b public, one core router;
# the picture is there), built fresh per case so no conntrack state carries over:
#   direct  both routers port-preserving, WAN input dropped (nat.sh's cone-drop): a <-> c direct
#   relay   r1 fully random instead (sym1-drop): a <-> c through b
# b relays with --relay-rate 10000 so its per-pair budget (default 20 Mbit/s) is not what we measure.
#   NAT_BENCH_SECONDS  iperf3 seconds per case (default 8)
# Numbers are only comparable within one run: the machine is busy and noisy.
# shellcheck disable=SC2034  # NS_*, UL4_*, OL4_* are read through ns, ul4, ol4
# shellcheck disable=SC2154  # NS_a, NS_b, NS_c and OL4_c come from lib.sh
# shellcheck source=../netns/lib.sh
source "$(dirname "$0")/../netns/lib.sh"

SECS=${NAT_BENCH_SECONDS:-8}
# shellcheck source=../netns/nat-topology.sh
source "$(dirname "$0")/../netns/nat-topology.sh"

# ---- what is measured -------------------------------------------------------------------------

# cpu_ticks NODE -- user+system clock ticks of NODE's daemon so far (/proc/PID/stat: after
# "(comm) " come state, ppid, ...; utime is the 12th field from there, stime the 13th)
cpu_ticks() { sed 's/^.*) //' "/proc/${NODE_PID[$1]}/stat" | awk '{ print $12 + $13 }'; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/${NODE_PID[$1]}/status"; }
# ipstat NODE FIELD -- a counter of the Ip: lines of /proc/net/snmp in NODE's namespace
# (ReasmReqds: fragments that arrived to be reassembled; FragCreates: fragments sent)
ipstat() {
	nsx "$1" cat /proc/net/snmp | awk -v f="$2" '$1 == "Ip:" { if (!h) { for (i = 2; i <= NF; i++) col[$i] = i; h = 1 } else print $col[f] }'
}
# idle_ticks -- idle+iowait ticks of all CPUs so far (the cpu line of /proc/stat, host-wide)
idle_ticks() { awk '$1 == "cpu" { print $5 + $6 }' /proc/stat; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }

# bench_case NAME NAT1 PATH -- one path: sets MBIT, MBITS (megabits received), FIRST_MS, CPU_S and
# WALL_S (b, during iperf3), RSS0/RSS1/RSS2 (b before a and c start, with the pair set up, after
# iperf3), FRAG (fragment counters during iperf3)
bench_case() {
	local name=$1 nat1=$2 want=$3 t0 ticks0 ticks1 w0 w1 ac0 ac1 idle0 idle1 j k v
	topology "$nat1" cone drop
	mesh_up b --relay-rate 10000
	wait_ready b
	sleep 1 # let b's start-up allocations settle before the baseline
	RSS0=$(rss_kb b)
	t0=$(now_ms)
	mesh_up a --peer "$(via_b)"
	mesh_up c --peer "$(via_b)"
	wait_ready a c
	# -c 1 -w 15: one echo request every 0.1 s until the first reply (or 15 s)
	nsx a timeout --foreground 20 ping -c 1 -i 0.1 -w 15 -q "$OL4_c" >/dev/null 2>&1 || die "$name: no overlay ping a -> c within 15 s"
	FIRST_MS=$(($(now_ms) - t0))
	wait_until 15 up_path a c "$want" || die "$name: a sees c as $(pq a c '"\(.state) \(.path)"'), not up $want"
	wait_until 10 up_path c a "$want" || die "$name: c sees a as $(pq c a '"\(.state) \(.path)"'), not up $want"
	note "$name: a -> c up by $want after $(($(now_ms) - t0)) ms; b relays $(st b '.relay | tojson')"
	RSS1=$(rss_kb b)
	nsx c iperf3 -s -1 -D -B "$OL4_c" >/dev/null 2>&1 || die "$name: iperf3 server in c"
	wait_until 5 quiet nsx c ss -Htln "sport = :5201" || die "$name: iperf3 server does not listen"
	for k in a:FragCreates b:ReasmReqds b:FragCreates c:ReasmReqds; do v=$(ipstat "${k%:*}" "${k#*:}"); FRAG[$k]=$v; done
	ticks0=$(cpu_ticks b) w0=$(now_ms) ac0=$(($(cpu_ticks a) + $(cpu_ticks c))) idle0=$(idle_ticks)
	j=$(nsx a timeout --foreground $((SECS + 20)) iperf3 -c "$OL4_c" -t "$SECS" -J 2>/dev/null)
	ticks1=$(cpu_ticks b) w1=$(now_ms) ac1=$(($(cpu_ticks a) + $(cpu_ticks c))) idle1=$(idle_ticks)
	for k in "${!FRAG[@]}"; do v=$(ipstat "${k%:*}" "${k#*:}"); FRAG[$k]=$((v - FRAG[$k])); done
	MBIT=$(jq -r '.end.sum_received.bits_per_second / 1e6' <<<"$j" 2>/dev/null)
	MBITS=$(jq -r '.end.sum_received.bytes * 8 / 1e6' <<<"$j" 2>/dev/null)
	if ! [[ $MBIT =~ ^[0-9.e+]+$ ]] || (($(calc %d "$MBIT") == 0)); then
		die "$name: iperf3 a -> c gave no result: $(jq -r '.error // empty' <<<"$j" 2>/dev/null)"
	fi
	CPU_S=$(calc %.3f "($ticks1 - $ticks0) / $CLK")
	WALL_S=$(calc %.3f "($w1 - $w0) / 1000")
	RSS2=$(rss_kb b)
	pq a c '"\(.state) \(.path)"' | grep -qx "up $want" || die "$name: a's path to c changed during the run: $(pq a c .path)"
	note "$name: $(calc %.0f "$MBIT") Mbit/s, $(jq -r '.end.sum_sent.retransmits' <<<"$j") TCP retransmits; b CPU ${CPU_S} s in ${WALL_S} s; b relays $(st b '.relay | tojson')," \
		"b's GC collections (gen0,1,2) since start $(st b '.counters.gc_collections | tojson')"
	# the whole machine too: a and c seal and open each datagram twice when relayed (their pair's
	# record inside one for b), so on a box with few cores the members may be what limits the rate
	note "$name: during iperf3 a+c used $(calc %.0f "100 * ($ac1 - $ac0) / $CLK / $WALL_S") % of one core," \
		"the machine was $(calc %.0f "100 - 100 * ($idle1 - $idle0) / $CLK / $WALL_S / $NCPU") % busy ($NCPU cores)"
	note "$name: fragments during iperf3: $(for k in a:FragCreates b:ReasmReqds b:FragCreates c:ReasmReqds; do printf '%s %s ' "$k" "${FRAG[$k]}"; done)"
	teardown
}

net_begin
for c in nft iperf3 ss getconf; do command -v "$c" >/dev/null || die "missing command $c (make deps)"; done
CLK=$(getconf CLK_TCK) NCPU=$(nproc)
keys_make a b c
psk_make net
declare -A FRAG=()

bench_case direct cone direct
d_mbit=$MBIT d_first=$FIRST_MS d_rss=("$RSS0" "$RSS1" "$RSS2") d_frag="a sent ${FRAG[a:FragCreates]}, c reassembled ${FRAG[c:ReasmReqds]}"
bench_case relay random relay:b
r_mbit=$MBIT r_first=$FIRST_MS
r_frag="a sent ${FRAG[a:FragCreates]}, b reassembled ${FRAG[b:ReasmReqds]} and sent ${FRAG[b:FragCreates]}, c reassembled ${FRAG[c:ReasmReqds]}"

printf 'nat-bench direct  tcp a->c 1 stream %8.1f Mbit/s   first overlay ping %5d ms after a and c started\n' "$d_mbit" "$d_first"
printf 'nat-bench relay   tcp a->c 1 stream %8.1f Mbit/s   first overlay ping %5d ms after a and c started\n' "$r_mbit" "$r_first"
echo "nat-bench ratio relay/direct $(calc %.2f "$r_mbit / $d_mbit")x"
# CPU seconds per megabit relayed: b seals and opens every datagram once more, so this is the
# relay's whole cost (its other work, keepalives to a and c, is noise at this rate)
echo "nat-bench relay CPU: $(calc %.0f "100 * $CPU_S / $WALL_S") % of one core at $(calc %.0f "$r_mbit") Mbit/s" \
	"= $(calc %.3f "1000 * $CPU_S / $MBITS") ms CPU per Mbit relayed"
# b's RSS is noisy (GC heap growth, socket buffers, the members' own sessions): the pair's entry
# in the relay table is two flows (one per direction), each a 2-long object (~32 B) plus a
# dictionary entry (~32 B), about 130 B a pair, far below what RSS can resolve
echo "nat-bench b RSS (noisy): relay case $((RSS0 / 1024)) MiB before a and c, $((RSS1 - RSS0)) KiB more with the pair set up," \
	"$((RSS2 - RSS0)) KiB more after ${SECS} s relayed; direct case (pair set up, only the first packets relayed) $((d_rss[1] - d_rss[0])) / $((d_rss[2] - d_rss[0])) KiB;" \
	"the pair's table entry is ~130 B (2 flows x (32 B object + 32 B dictionary entry))"
echo "nat-bench IP fragments during iperf3: direct: $d_frag; relay: $r_frag"
finish
