#!/usr/bin/env bash
# flood.sh -- what a ClientHello flood costs the tunnel (issue 11's target: goodput >= 50 % of the
# unflooded figure, pings >= 99 %). a -> b: a TCP stream (iperf3, FLOOD_GOODPUT_S s) and pings every
# 10 ms, first quiet, then while tests/netns/flood.py floods b from 64 addresses in a third
# namespace with hellos (junk, valid MAC1 from unknown keys, replayed captures) as fast as it can.
# Prints one line per phase and the ratios; exits 1 if the target is missed. Part of `make bench`.
#
#   veil-t-$$-a  ==== tunnel (iperf3, ping) ====>  veil-t-$$-b  <==== flood ====  veil-t-$$-c
# shellcheck source=../netns/lib.sh
source "$(dirname "$0")/../netns/lib.sh"

SECS=${FLOOD_GOODPUT_S:-8}
NSRC=64
net_setup
net_add_c b
keys_make a b
for ((i = 0; i < NSRC; i++)); do echo "addr add 203.0.113.$((10 + i))/24 dev $VETH"; done | ip -n "$NS_c" -batch - || die "flood sources"
node_start b
node_start a
wait_ready a b
ping_within a "$OL4_b" 10 || die "no tunnel"
nsx b iperf3 -s -D -B "$OL4_b" >/dev/null 2>&1 || die "iperf3 server"
sleep 0.5

# phase NAME -- iperf3 and pings at once; sets MBIT and PINGS (received of sent)
phase() {
	local sent=$((SECS * 100))
	nsx a timeout --foreground $((SECS + 20)) ping -c "$sent" -i 0.01 -W 1 -q "$OL4_b" >"$TMPD/ping.$1" 2>&1 &
	local pp=$!
	MBIT=$(nsx a timeout --foreground $((SECS + 20)) iperf3 -c "$OL4_b" -t "$SECS" -J 2>/dev/null | jq '.end.sum_received.bits_per_second / 1e6 | floor')
	wait "$pp"
	PINGS="$(sed -n 's/.* \([0-9]*\) received.*/\1/p' "$TMPD/ping.$1")/$sent"
	printf 'flood-bench %-8s goodput %6s Mbit/s  pings %s\n' "$1" "${MBIT:-0}" "$PINGS"
}
udp_drops() { nsx b nstat -az UdpRcvbufErrors Udp6RcvbufErrors 2>/dev/null | awk '/RcvbufErrors/ {n += $2} END {print n + 0}'; }
phase quiet
quiet=$MBIT quiet_pings=$PINGS
drops0=$(udp_drops)

nsx c timeout --foreground $((SECS + 30)) python3 "$NETNS_DIR/flood.py" flood 203.0.113.10 "$NSRC" "$UL4_b" "${FLOOD_PORT:-$PORT}" \
	"$(pub b)" $((SECS + 20)) 0 - >"$TMPD/flood.out" 2>&1 &
fp=$!
sleep 1
phase flooded
kill -TERM "$fp" 2>/dev/null
wait "$fp" 2>/dev/null
note "flood.py: $(cat "$TMPD/flood.out")"
note "b: datagrams the kernel dropped for a full socket buffer during the flood: $(($(udp_drops) - drops0))"
note "b: admission $(st b '.admission.refused | tostring'), cookies sent $(st b '.counters.cookies_sent')"
ratio=$(( ${MBIT:-0} * 100 / (quiet > 0 ? quiet : 1) ))
rx=${PINGS%/*} tx=${PINGS#*/}
echo "flood-bench ratio goodput ${ratio}% of quiet, pings $((rx * 1000 / tx / 10)).$((rx * 1000 / tx % 10))% (quiet: $quiet_pings)"
check "goodput under the flood >= 50 % of quiet" "${ratio}%" test "$ratio" -ge 50
check "pings under the flood >= 99 %" "$PINGS" test $((rx * 100)) -ge $((tx * 99))
finish
