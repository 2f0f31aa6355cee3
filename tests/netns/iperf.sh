#!/usr/bin/env bash
# iperf.sh -- iperf3 TCP through the tunnel, a -> b and b -> a (-R), ~3 s each;
# the receiver must see nonzero throughput. Then UDP super-datagrams (UDP_SEGMENT) a -> b over
# IPv4 and IPv6: cut by veil when the TUN offers USO, every datagram intact at b. Then all of it
# again with the offloads off (VEIL_OFFLOADS=off), as on a kernel without them.
#
#   veil-t-$$-a                            veil-t-$$-b
#   iperf3 -c 100.64.0.2 (veil-a)  ====>  iperf3 -s -B 100.64.0.2 (veil-b)
#   veth0 198.51.100.1            <-veth-> veth0 198.51.100.2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

command -v iperf3 >/dev/null || die "missing iperf3 (make deps)"
net_setup
keys_make a b
node_start b
node_start a
wait_ready a b
ping_ok a "$OL4_b" || die "no ping a -> b before iperf3"
iperf_server b

# measure LABEL [-R] -- 3 s of TCP; prints the receiver's Mbit/s
measure() {
	local label=$1; shift
	local json bps
	json=$(nsx a timeout --foreground 20 iperf3 -c "$OL4_b" -B "$OL4_a" -t 3 -J "$@" 2>/dev/null)
	bps=$(jq -r '.end.sum_received.bits_per_second // 0' <<<"$json" 2>/dev/null)
	note "$label: $(awk -v b="${bps:-0}" 'BEGIN { printf "%.1f Mbit/s", b / 1e6 }')"
	check "$label: nonzero throughput" "iperf3 measured ${bps:-nothing} bit/s" \
		awk -v b="${bps:-0}" 'BEGIN { exit !(b > 0) }'
}

# datapath_says NODE -- the offloads status reports, as the start-up log line words them
datapath_says() {
	st "$1" '.node.datapath | "tun_tso=\(.tun_tso) tun_uso=\(.tun_uso) udp_gso=\(.udp_gso) udp_gro=\(.udp_gro) aead_backend=\(.aead_backend)"' |
		sed 's/=true/=on/g; s/=false/=off/g'
}
for n in a b; do
	says=$(datapath_says "$n")
	check "status of $n reports the offloads its start-up line logged" "status: '$says'; log: $(grep -o 'event=offloads.*' "${NODE_LOG[$n]}")" \
		grep -qF "event=offloads $says" "${NODE_LOG[$n]}"
done

measure "TCP a -> b"
measure "TCP b -> a" -R

# udp_gso LABEL SRC DST -- 50 sends of 20 × 1200-byte datagrams with UDP_SEGMENT from a to b: with
# USO a's TUN hands each send over whole and veil cuts it, b merges what arrives together back into
# super-packets for its TUN; every datagram must arrive intact
SENDS=50 PER=20
udp_gso() {
	local label=$1 src=$2 dst=$3 sink out sup0 sup1 co0 co1 got bad
	rm -f "$TMPD/sink.ready"
	nsx b timeout --foreground 25 python3 "$NETNS_DIR/pkt.py" udpsink "$dst" 5300 15 $((SENDS * PER)) "$TMPD/sink.ready" \
		>"$TMPD/sink.out" 2>&1 </dev/null &
	sink=$!
	for ((i = 0; i < 50; i++)); do [[ -e "$TMPD/sink.ready" ]] && break; sleep 0.1; done
	sup0=$(st a '.counters.tun_super_packets') co0=$(st b '.counters.tun_coalesced')
	out=$(nsx a timeout --foreground 20 python3 "$NETNS_DIR/pkt.py" udpgso "$src" "$dst" 5300 "$SENDS" 1200 "$PER" 2>&1)
	wait "$sink"
	sup1=$(st a '.counters.tun_super_packets') co1=$(st b '.counters.tun_coalesced')
	read -r _ got _ bad _ < <(cat "$TMPD/sink.out")
	note "$label: $out; b's sink: $(cat "$TMPD/sink.out"); a's tun_super_packets $sup0 -> $sup1, b's tun_coalesced $co0 -> $co1"
	check "$label: the datagrams arrived intact (>= 98 %, none altered)" "$(cat "$TMPD/sink.out")" \
		test "${got:-0}" -ge $((SENDS * PER * 98 / 100)) -a "${bad:-1}" -eq 0
	if grep -q 'tun_uso=on' "${NODE_LOG[a]}"; then
		check "$label: a's TUN handed over super-packets (USO)" "tun_super_packets $sup0 -> $sup1" \
			test "$((sup1 - sup0))" -ge "$SENDS"
		check "$label: b wrote datagrams of the flow into its TUN as super-packets" "tun_coalesced $co0 -> $co1" \
			test "$((co1 - co0))" -gt 0
	else
		note "$label: a's TUN runs without USO (a logged tun_uso=off): the kernel cut the sends itself"
	fi
}
udp_gso "UDP_SEGMENT a -> b IPv4" "$OL4_a" "$OL4_b"
udp_gso "UDP_SEGMENT a -> b IPv6" "$OL6_a" "$OL6_b"

# The same traffic on the path of a kernel or device without the offloads: VEIL_OFFLOADS=off gives
# a plain TUN (a packet per read and write) and a datagram per UDP send and receive.
node_stop a
node_stop b
VEIL_OFFLOADS=off node_start b
VEIL_OFFLOADS=off node_start a
wait_ready a b
ping_ok a "$OL4_b" || die "no ping a -> b with the offloads off"
for n in a b; do
	check "offloads off: $n logged each of them off" "$(grep 'event=offloads' "${NODE_LOG[$n]}")" \
		grep -q 'event=offloads tun_tso=off tun_uso=off udp_gso=off udp_gro=off .*disabled_by=VEIL_OFFLOADS' "${NODE_LOG[$n]}"
done
measure "TCP a -> b, offloads off"
measure "TCP b -> a, offloads off" -R
udp_gso "UDP_SEGMENT a -> b IPv4, offloads off" "$OL4_a" "$OL4_b"
for n in a b; do
	says=$(datapath_says "$n")
	check "offloads off: status of $n reports them off" "status: '$says'" grep -q '^tun_tso=off tun_uso=off udp_gso=off udp_gro=off ' <<<"$says"
	sc=$(st "$n" '"\(.counters.tun_super_packets) \(.counters.tun_coalesced)"')
	check "offloads off: $n neither split nor merged a packet" "tun_super_packets, tun_coalesced: $sc" test "$sc" = "0 0"
done
finish
