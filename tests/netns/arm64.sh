#!/usr/bin/env bash
# arm64.sh -- node a is the linux-arm64 build (tests/arm64/veil: under qemu-user on an x86-64
# host), node b this host's build. Keys made by one build are read by the other; the handshake,
# pings both ways (IPv4, IPv6), `veil status --json` from the arm64 client, a short iperf3 each way
# (TUN TSO/USO and UDP GSO/GRO on a's side, as the start-up log says), a clean SIGTERM exit; then
# again over the IPv6 underlay with VEIL_OFFLOADS=off on a. Notes a's memory (qemu's process, and
# the part mapped by the guest). Binary: VEIL_ARM64_BIN (default out/linux-arm64/veil, make build
# RID=linux-arm64); the x64 one is VEIL_BIN as for every scenario.
#
#   veil-t-$$-a (arm64, qemu-aarch64)             veil-t-$$-b (host build)
#   veil-a 100.64.0.1/24 fd00:64::1/64  ======>  veil-b 100.64.0.2/24 fd00:64::2/64
#   veth0  198.51.100.1  2001:db8:1::1  <-veth-> veth0  198.51.100.2  2001:db8:1::2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

ARM64=$NETNS_DIR/../arm64/veil
command -v iperf3 >/dev/null || die "missing iperf3 (make deps)"
ver=$("$ARM64" version 2>&1) || die "the arm64 build does not run: $ver"
[[ $ver == *linux-arm64* ]] || die "tests/arm64/veil runs '$ver', not a linux-arm64 build"
note "a runs $ver ($(uname -m) host$([[ $(uname -m) == aarch64 ]] || echo ", $(qemu-aarch64 --version | head -n 1)"))"

size=$(stat -c %s "$NETNS_DIR/../../out/linux-arm64/veil" 2>/dev/null || echo 0)
check "the arm64 binary is at most 4 MiB" "$size bytes" test "$size" -gt 0 -a "$size" -le 4194304
out=$("$ARM64" selftest 2>&1); rc=$?
check "the arm64 build passes veil selftest (vectors and struct layouts on arm64)" "exit $rc: $(grep -v '^ok' <<<"$out" | tr '\n' '|')" \
	eval 'test "$rc" = 0 && grep -q "^selftest: all passed" <<<"$out" && test "$(grep -c "^ok " <<<"$out")" -ge 9'
out=$("$ARM64" bench 0.05 2>&1); rc=$?
check "the arm64 build prints its veil bench figures" "exit $rc: ${out:0:300}" \
	eval 'test "$rc" = 0 && grep -q "^handshake" <<<"$out" && grep -q "^x25519" <<<"$out" && grep -q "linux-arm64" <<<"$out"'
note "arm64 $(grep -E '^(x25519|handshake)' <<<"$out" | tr -s ' ' | tr '\n' ';')"

net_setup
VEIL=$ARM64 keys_make a
keys_make b
check "the host build derives the arm64 build's public key" "$(pub a) vs $("$VEIL" pubkey <"$TMPD/a.key")" \
	test "$("$VEIL" pubkey <"$TMPD/a.key")" = "$(pub a)"
check "the arm64 build derives the host build's public key" "$(pub b) vs $("$ARM64" pubkey <"$TMPD/b.key")" \
	test "$("$ARM64" pubkey <"$TMPD/b.key")" = "$(pub b)"

# guest_rss PID -- kB resident in the mappings below 2^40 (qemu-user puts the guest's there;
# qemu's own heap, code cache and libraries are above)
guest_rss() {
	local line kb=0 guest=0
	while read -r line; do
		if [[ $line =~ ^([0-9a-f]+)- ]]; then
			guest=0
			((16#${BASH_REMATCH[1]} < 1 << 40)) && guest=1
		elif [[ $line =~ ^Rss:\ +([0-9]+) ]] && ((guest)); then
			kb=$((kb + BASH_REMATCH[1]))
		fi
	done <"/proc/$1/smaps"
	echo "$kb"
}

# round LABEL -- a (arm64) and b up, the checks above; a's environment comes from the caller
round() {
	local label=$1
	VEIL=$ARM64 node_start a
	node_start b
	wait_ready a b
	check "$label: a logs its offloads" "$(grep -c 'event=offloads' "${NODE_LOG[a]}") lines" \
		grep -q 'event=offloads' "${NODE_LOG[a]}"
	note "$label: a: $(grep -o 'event=offloads.*' "${NODE_LOG[a]}")"
	check "$label: ping a -> b IPv4" "no reply within 5 s" ping_ok a "$OL4_b"
	check "$label: ping a -> b IPv6" "no reply within 5 s" ping_ok a "$OL6_b"
	check "$label: ping b -> a IPv4" "no reply within 5 s" ping_ok b "$OL4_a"
	check "$label: ping b -> a IPv6" "no reply within 5 s" ping_ok b "$OL6_a"
	check "$label: a logs a completed handshake" "no event=handshake_complete" wait_log a 'event=handshake_complete' 1
	local sa sb
	sa=$(VEIL=$ARM64 st a '.peers[0].state') sb=$(st b '.peers[0].state')
	check "$label: status --json (arm64 client on a, host client on b) shows the peer up" \
		"a: '$sa', b: '$sb'" test "$sa" = up -a "$sb" = up
	note "$label: a: aead $(VEIL=$ARM64 st a '.peers[0].aead'), datapath $(VEIL=$ARM64 st a '.node.datapath' | tr -d ' \n')"
	if [[ -d /proc/${NODE_PID[a]} ]]; then
		note "$label: a's memory idle: qemu process $(awk '/^VmRSS/ { print $2 }' "/proc/${NODE_PID[a]}/status") kB RSS, guest mappings $(guest_rss "${NODE_PID[a]}") kB"
	fi
	if [[ $UL == 4 ]]; then
		iperf_server b
		local dir json bytes rev
		for dir in a-b b-a; do
			rev=()
			[[ $dir == b-a ]] && rev=(-R)
			json=$(nsx a timeout --foreground 20 iperf3 -c "$OL4_b" -B "$OL4_a" -t 2 -J "${rev[@]}" 2>/dev/null)
			bytes=$(jq -r '.end.sum_received.bytes // 0' <<<"$json" 2>/dev/null)
			note "$label: iperf3 $dir: $(jq -r '(.end.sum_received.bits_per_second // 0) / 1e6 | floor' <<<"$json" 2>/dev/null) Mbit/s"
			check "$label: iperf3 $dir moves data" "${bytes:-0} bytes received" test "${bytes:-0}" -gt 0
		done
		note "$label: a's counters $(VEIL=$ARM64 st a '.counters | {tun_super_packets, tun_coalesced, rx_records, tx_records}' | tr -d ' \n')"
	fi
	local err
	err=$(grep -E 'level=error' "${NODE_LOG[a]}" | head -n 3)
	check "$label: a logged no errors" "$err" test -z "$err"
	node_stop a
	check "$label: a exits with status 0 on SIGTERM" "exit status $NODE_RC" test "$NODE_RC" = 0
	check "$label: a's TUN is gone" "veil-a still there" wait_gone a
	node_stop b
	wait_gone b
}

round "IPv4 underlay"
UL=6
VEIL_OFFLOADS=off round "IPv6 underlay, VEIL_OFFLOADS=off on a"
finish
