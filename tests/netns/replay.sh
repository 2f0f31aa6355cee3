#!/usr/bin/env bash
# replay.sh -- records from a to b are captured on b's veth while a pings, then the very
# same Ethernet frames are sent again from a's veth, three times over. b must reject
# every one as a replay: nothing reaches b's TUN (kernel rx/tx counters and status
# tun_* counters stay put) and drops.replayed grows.
#
#   veil-t-$$-a                                   veil-t-$$-b
#   veil-a 100.64.0.1  ping ==== tunnel ====>     veil-b 100.64.0.2
#   veth0 198.51.100.1 --records--> pkt.py capture on veth0 198.51.100.2
#   pkt.py replay on veth0 --same frames again-->
# IPv6 is switched off on both TUNs after start-up so that no kernel chatter
# (MLD, router solicitations) moves the TUN counters during the measurement.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

command -v python3 >/dev/null || die "missing python3 (make deps)"
net_setup
keys_make a b
node_start b
node_start a
wait_ready a b
for n in a b; do
	nsx "$n" sysctl -qw "net.ipv6.conf.$(tun "$n").disable_ipv6=1" || die "disable IPv6 on $(tun "$n")"
done
ping_ok a "$OL4_b" || die "no ping a -> b before the capture"

cap="$TMPD/records.hex" ready="$TMPD/capture.ready"
nsx b timeout --foreground 15 python3 "$NETNS_DIR/pkt.py" capture "$VETH" "$UL4_a" "$PORT" 4 200 "$cap" "$ready" \
	>"$TMPD/capture.out" 2>&1 &
cap_pid=$!
for ((i = 0; i < 50; i++)); do [[ -e $ready ]] && break; sleep 0.1; done
[[ -e $ready ]] || die "capture did not start"
nsx a timeout --foreground 10 ping -c 10 -i 0.2 -W 2 -q "$OL4_b" >/dev/null 2>&1 || die "pings during the capture failed"
wait "$cap_pid"
frames=$(grep -c . "$cap" 2>/dev/null)
note "$(cat "$TMPD/capture.out")"
((${frames:-0} >= 10)) || die "captured only ${frames:-0} records (want >= 10)"
sleep 1 # let stragglers settle before taking the baseline

rx0=$(tun_packets b rx) tx0=$(tun_packets b tx)
srx0=$(st b '.counters.tun_rx_packets') stx0=$(st b '.counters.tun_tx_packets')
rep0=$(st b '.drops.replayed')
out=$(nsx a timeout --foreground 30 python3 "$NETNS_DIR/pkt.py" replay "$VETH" "$cap" 3)
note "pkt.py: $out"
for ((i = 0; i < 30; i++)); do # bounded wait for b to process them
	rep1=$(st b '.drops.replayed')
	[[ -n "$rep1" ]] && ((rep1 >= rep0 + 3 * frames)) && break
	sleep 0.1
done
sleep 0.5
rx1=$(tun_packets b rx) tx1=$(tun_packets b tx)
srx1=$(st b '.counters.tun_rx_packets') stx1=$(st b '.counters.tun_tx_packets')
rep1=$(st b '.drops.replayed')

check "b is alive" "b exited" node_alive b
check "b's TUN counters (ip -s link) unchanged by replays" "rx $rx0 -> $rx1, tx $tx0 -> $tx1" \
	test "$rx0/$tx0" = "$rx1/$tx1"
check "b's status tun_rx/tun_tx_packets unchanged by replays" \
	"tun_rx_packets $srx0 -> $srx1, tun_tx_packets $stx0 -> $stx1" test "$srx0/$stx0" = "$srx1/$stx1"
check "b's drops.replayed increased" "replayed $rep0 -> ${rep1:-unreachable} after $((3 * frames)) replays" \
	test "${rep1:-0}" -gt "${rep0:-0}"
note "drops.replayed $rep0 -> $rep1 for $((3 * frames)) replayed records"
check "ping a -> b still works" "no reply within 5 s" ping_ok a "$OL4_b"
finish
