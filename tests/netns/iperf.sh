#!/usr/bin/env bash
# iperf.sh -- iperf3 TCP through the tunnel, a -> b and b -> a (-R), ~3 s each;
# the receiver must see nonzero throughput.
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

measure "TCP a -> b"
measure "TCP b -> a" -R
finish
