#!/usr/bin/env bash
# nat.sh -- what the relay costs (issue 12, "Numbers"), from one run: single-stream TCP a -> c over
# the overlay through a relay as a ratio to the direct path, the relay's CPU per Mbit/s, its memory
# per relayed pair, and the time to the first overlay ping on each path. Part of `make bench`.
#
# The topology is tests/netns/nat.sh's (a behind r1, c behind r2, b public, one core router; see
# the picture there), built fresh per case so no conntrack state carries over:
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
NS_r1=veil-t-$$-r1 NS_r2=veil-t-$$-r2 NS_in=veil-t-$$-in
UL4_a=198.51.100.2 UL4_b=192.0.2.130 UL4_c=203.0.113.2
NS_ALL=()

# ---- the topology, copied from tests/netns/nat.sh (without miniupnpd) -------------------------

ns_add() {
	local n
	n=$(ns "$1")
	NS_ALL+=("$n")
	ip netns add "$n" || die "ip netns add $n"
	ip -n "$n" link set lo up || die "lo up in $1"
}
# link NS1 IF1 NS2 IF2 -- a veth between two namespaces, both ends up
link() {
	ip link add "$2" netns "$(ns "$1")" type veth peer name "$4" netns "$(ns "$3")" || die "veth $1/$2 <-> $3/$4"
	ip -n "$(ns "$1")" link set "$2" up && ip -n "$(ns "$3")" link set "$4" up || die "link up $1 $3"
}
addr() { ip -n "$(ns "$1")" addr add "$3" dev "$2" || die "address $3 on $1"; }

# router NAME cone|random -- masquerade out of wan0 (cone keeps the source port where it can,
# random picks a fresh one per mapping); WAN input no conntrack entry expects is dropped
router() {
	local how='masquerade'
	[[ $2 == random ]] && how='masquerade random,fully-random'
	nsx "$1" nft -f - <<-EOF || die "nft rules on $1"
		table ip nat {
			chain post { type nat hook postrouting priority srcnat; oifname "wan0" $how; }
		}
		table ip filter {
			chain input { type filter hook input priority 0; policy accept
				iifname "wan0" ct state established,related accept
				iifname "wan0" drop
			}
			chain forward { type filter hook forward priority 0; policy accept
				iifname "wan0" ct state established,related accept
				iifname "wan0" drop
			}
		}
	EOF
	nsx "$1" sysctl -qw net.ipv4.ip_forward=1 || die "ip_forward on $1"
}

# topology NAT1 -- every namespace, fresh; r1 NAT1, r2 cone
topology() {
	local n i
	for n in a b c r1 r2 in; do ns_add "$n"; done
	link in i1 r1 wan0; link in i2 r2 wan0; link in i3 b "$VETH"
	link r1 lan0 a "$VETH"; link r2 lan0 c "$VETH"
	addr in i1 192.0.2.1/26; addr in i2 192.0.2.65/26; addr in i3 192.0.2.129/26
	addr r1 wan0 192.0.2.2/26; addr r1 lan0 198.51.100.1/24; addr a "$VETH" "$UL4_a/24"
	addr r2 wan0 192.0.2.66/26; addr r2 lan0 203.0.113.1/24; addr c "$VETH" "$UL4_c/24"
	addr b "$VETH" "$UL4_b/26"
	nsx in sysctl -qw net.ipv4.ip_forward=1 || die "ip_forward on the core"
	ip -n "$NS_r1" route add default via 192.0.2.1 || die "r1 default route"
	ip -n "$NS_r2" route add default via 192.0.2.65 || die "r2 default route"
	ip -n "$NS_b" route add default via 192.0.2.129 || die "b default route"
	ip -n "$NS_a" route add default via 198.51.100.1 || die "a default route"
	ip -n "$NS_c" route add default via 203.0.113.1 || die "c default route"
	router r1 "$1"
	router r2 cone
	for n in a c; do
		for ((i = 0; i < 50; i++)); do
			nsx "$n" timeout --foreground 2 ping -c 1 -W 1 -q "$UL4_b" >/dev/null 2>&1 && break
			sleep 0.1
		done
		((i < 50)) || die "underlay ping $n -> b failed"
	done
}

teardown() {
	local n pid
	for n in a b c; do node_stop "$n" >/dev/null 2>&1; done
	for n in "${NS_ALL[@]}"; do
		for pid in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
		ip netns del "$n" 2>/dev/null
	done
	NS_ALL=()
}

mesh_up() {
	local n=$1; shift
	node_run "$n" up --key "$TMPD/$n.key" --psk "$TMPD/net.psk" --mesh --name "$n" \
		--listen "0.0.0.0:$PORT" --address "$(ol4 "$n")/24" --address "$(ol6 "$n")/64" \
		--tun "$(tun "$n")" --keepalive 1 --control "$(sock "$n")" --mgmt off \
		--log-level "${VEIL_LOG_LEVEL:-info}" "$@"
}
via_b() { echo "$(pub b)@$UL4_b:$PORT"; }
pq() { st "$1" ".peers[] | select(.public_key == \"$(pub "$2")\") | $3"; }
up_path() { [[ $(pq "$1" "$2" '"\(.state) \(.path)"') == "up $3" ]]; }

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
	topology "$nat1"
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
# in the relay table is two flows (one per direction), each a 4-long object (~48 B) plus a
# dictionary slot (~24 B), about 150 B a pair, far below what RSS can resolve
echo "nat-bench b RSS (noisy): relay case $((RSS0 / 1024)) MiB before a and c, $((RSS1 - RSS0)) KiB more with the pair set up," \
	"$((RSS2 - RSS0)) KiB more after ${SECS} s relayed; direct case (pair set up, only the first packets relayed) $((d_rss[1] - d_rss[0])) / $((d_rss[2] - d_rss[0])) KiB;" \
	"the pair's table entry is ~150 B (2 flows x (48 B object + 24 B dictionary slot))"
echo "nat-bench IP fragments during iperf3: direct: $d_frag; relay: $r_frag"
finish
