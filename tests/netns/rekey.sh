#!/usr/bin/env bash
# rekey.sh -- with --rekey-after 3 the session keys rotate ~6 times during a 20 s
# iperf3 run; no 1-second interval may stall at 0 bit/s, and the handshake counter
# must grow by at least 4.
#
#   veil-t-$$-a (--rekey-after 3)                veil-t-$$-b (--rekey-after 3)
#   iperf3 -c 100.64.0.2 -t 20 -i 1   ======>   iperf3 -s -B 100.64.0.2
#   veth0 198.51.100.1               <-veth->   veth0 198.51.100.2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

command -v iperf3 >/dev/null || die "missing iperf3 (make deps)"
net_setup
keys_make a b
node_start b --rekey-after 3
node_start a --rekey-after 3
wait_ready a b
ping_ok a "$OL4_b" || die "no ping a -> b before iperf3"
iperf_server b

ha0=$(st a '.counters.handshakes_completed')
hb0=$(st b '.counters.handshakes_completed')
json=$(nsx a timeout --foreground 40 iperf3 -c "$OL4_b" -B "$OL4_a" -t 20 -i 1 -J 2>/dev/null)
ha1=$(st a '.counters.handshakes_completed')
hb1=$(st b '.counters.handshakes_completed')

# per-interval bit/s; a trailing fragment shorter than half a second is not an interval
rates=$(jq -r '.intervals[].sum | select(.seconds >= 0.5) | .bits_per_second' <<<"$json" 2>/dev/null)
n=$(grep -c . <<<"$rates")
zero=$(awk '$1 == 0 { z++ } END { print z + 0 }' <<<"$rates")
note "per-second Mbit/s: $(awk '{ printf "%.0f ", $1 / 1e6 }' <<<"$rates")"
check "iperf3 ran 20 one-second intervals" "got $n intervals" test "$n" -ge 19
check "no 1-second interval at 0 bit/s across rekeys" "$zero intervals at 0 bit/s" test "$zero" -eq 0
da=$((${ha1:-0} - ${ha0:-0})) db=$((${hb1:-0} - ${hb0:-0}))
note "handshakes_completed: a $ha0 -> $ha1, b $hb0 -> $hb1"
check "handshakes_completed on a grew by >= 4" "grew by $da (b: $db)" test "$da" -ge 4
check "node a and b still up" "a or b exited" eval 'node_alive a && node_alive b'
finish
