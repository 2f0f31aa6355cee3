#!/usr/bin/env bash
# workers.sh -- both nodes with --workers 3: a multi-queue TUN (3 queues) and 3 sockets sharing the
# port (SO_REUSEPORT), one thread each, the node under one lock. Pings both ways (IPv4, IPv6), then
# iperf3 with 8 TCP streams each way: every stream moves data, the workers' shares add up to the
# node's counters, both daemons keep running and log no error; a keepalive that a packet on any
# worker arms fires on time; a stop is clean (exit 0, TUN gone).
# This machine may have 2 cores: the check is correctness with several threads, not speed.
#
#   veil-t-$$-a                                  veil-t-$$-b
#   veil-a (3 queues) 100.64.0.1  ==== 3 x ====  veil-b (3 queues) 100.64.0.2
#   veth0 198.51.100.1:51820     <-- veth -->    veth0 198.51.100.2:51820 (3 sockets)
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

command -v iperf3 >/dev/null || die "missing iperf3 (make deps)"
net_setup
keys_make a b
node_start b --workers 3
node_start a --workers 3
wait_ready a b
for n in a b; do
	check "$n logs 3 workers on a multi-queue TUN and a shared port" "$(grep -o 'event=workers.*' "${NODE_LOG[$n]}")" \
		grep -q 'event=workers count=3 .*tun=multi_queue udp=reuseport' "${NODE_LOG[$n]}"
	link=$(ip -n "$(ns "$n")" -d link show dev "$(tun "$n")")
	check "$n's TUN has 3 queues" "$(grep -o 'multi_queue.*' <<<"$link")" grep -q 'multi_queue numqueues 3' <<<"$link"
	check "$n's status lists 3 workers" "workers: $(st "$n" '.workers | length')" test "$(st "$n" '.workers | length')" = 3
done
check "ping a -> b IPv4" "no reply" ping_ok a "$OL4_b"
check "ping a -> b IPv6" "no reply" ping_ok a "$OL6_b"
check "ping b -> a IPv4" "no reply" ping_ok b "$OL4_a"
check "ping b -> a IPv6" "no reply" ping_ok b "$OL6_a"

iperf_server b
# streams LABEL [-R] -- 8 TCP streams for 3 s; the receiver's total must be nonzero and each
# stream must have moved data
streams() {
	local label=$1 json bps n; shift
	json=$(nsx a timeout --foreground 25 iperf3 -c "$OL4_b" -B "$OL4_a" -t 3 -P 8 -J "$@" 2>/dev/null)
	bps=$(jq -r '.end.sum_received.bits_per_second // 0' <<<"$json" 2>/dev/null)
	n=$(jq -r '[.end.streams[] | select(.receiver.bytes > 0)] | length' <<<"$json" 2>/dev/null)
	note "$label: $(awk -v b="${bps:-0}" 'BEGIN { printf "%.1f Mbit/s", b / 1e6 }'), $(jq -r '.end.sum_sent.retransmits // "?"' <<<"$json" 2>/dev/null) retransmits"
	check "$label: every stream moved data" "${n:-0} of 8 streams, ${bps:-0} bit/s" test "${n:-0}" -eq 8
}
streams "8 streams a -> b"
streams "8 streams b -> a" -R

# The kernel steers a flow to the TUN queue its replies are written on, and a peer's datagrams
# reach one socket: with a single peer most packets end up on one worker (note the spread).
for n in a b; do
	note "$n's workers: $(st "$n" '.workers' | tr -d ' \n')"
	check "$n: handshakes came through the handshake queue, records through the workers' sockets" "$(st "$n" '.workers' | tr -d ' \n')" \
		test "$(st "$n" '.workers[0].handshake_datagrams')" -gt 0 -a "$(st "$n" '[.workers[].udp_datagrams] | add')" -gt 1000
	shares=$(st "$n" '[.workers[].tun_packets] | add') total=$(st "$n" '.counters.tun_rx_packets')
	check "$n: the workers' TUN packets add up to the node's count (nothing counted twice or lost)" \
		"workers $shares, node $total" test -n "$total" -a "${shares:-x}" = "$total"
done
check "b is alive" "b exited" node_alive b
check "a is alive" "a exited" node_alive a
for n in a b; do
	err=$(grep -E 'level=error|worker_failed' "${NODE_LOG[$n]}" | head -n 3)
	check "$n logged no errors" "$err" test -z "$err"
done

# A second daemon on a's port must be refused as without workers, not share the port with a
out=$(nsx a timeout --foreground 10 "$VEIL" up --key "$TMPD/a.key" --listen "$UL4_a:$PORT" --address 100.64.9.1/24 \
	--tun veil-x --control "$TMPD/x.sock" --mgmt off --workers 3 2>&1)
rc=$?
check "a second daemon with workers on a's port is refused (exit 1, port in use)" "rc $rc: $out" \
	test "$rc" -eq 1 -a -n "$(grep 'another process uses the port' <<<"$out")"
check "a's status still answers after the refused second daemon" "no status" test -n "$(st a '.node.public_key')"

# Timers armed while another worker handles a packet must still fire on time: a sends one
# datagram that b's kernel swallows (a sink that never answers), so b owes a keepalive 10 s later
# (KeepaliveTimeoutMs) and has nothing else to send. Only the first worker's loop runs timers;
# when b's socket for a is another worker's, that loop has to look again soon enough.
rm -f "$TMPD/sink.ready"
nsx b timeout --foreground 20 python3 "$NETNS_DIR/pkt.py" udpsink "$OL4_b" 5300 16 2 "$TMPD/sink.ready" >/dev/null 2>&1 </dev/null &
for ((i = 0; i < 50; i++)); do [[ -e "$TMPD/sink.ready" ]] && break; sleep 0.1; done
sleep 11                                              # the streams' own keepalive duties run out first
rx0=$(st a '.peers[0].rx_bytes')
nsx a python3 -c "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('$OL4_a', 0)); s.sendto(b'x' * 64, ('$OL4_b', 5300))"
t0=$(now_ms) heard=0
while (($(now_ms) - t0 < 14000)); do
	rx=$(st a '.peers[0].rx_bytes')
	if [[ -n "$rx" && "$rx" != "$rx0" ]]; then heard=$(($(now_ms) - t0)); break; fi
	sleep 0.2
done
note "b's keepalive reached a ${heard} ms after a's lone datagram (due after 10000 ms)"
check "b's keepalive, armed by a packet, fires on time (10-11.5 s)" "after ${heard} ms" \
	test "$heard" -ge 9500 -a "$heard" -le 11500

t0=$(now_ms)
kill -TERM "${NODE_PID[a]}"
node_exited a "$t0" 5000
check "a exits after SIGTERM with status 0" "rc ${NODE_RC:-none} after ${EXIT_MS} ms" test "${NODE_RC:-1}" -eq 0
check "a's TUN is gone" "still there" wait_gone a
finish
