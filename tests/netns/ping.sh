#!/usr/bin/env bash
# ping.sh -- two nodes, IPv4 and IPv6 overlay, ping both ways; the very first ping after
# both TUNs are up must get its reply (no warm-up). Then the same over the IPv6 underlay
# (--peer PUBKEY@[2001:db8:1::N]:51820).
#
#   veil-t-$$-a                                   veil-t-$$-b
#   veil-a 100.64.0.1/24 fd00:64::1/64  ======>  veil-b 100.64.0.2/24 fd00:64::2/64
#   veth0  198.51.100.1  2001:db8:1::1  <-veth-> veth0  198.51.100.2  2001:db8:1::2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
keys_make a b

# round LABEL -- start both nodes at once, then ping in all four directions
round() {
	local label=$1
	node_start b
	node_start a
	wait_ready a b
	# the first request goes out right now; its reply proves the handshake and the
	# queued first packet both work
	check "$label: first ping a -> b IPv4, no warm-up" "no reply within 5 s" ping_ok a "$OL4_b"
	check "$label: ping a -> b IPv6" "no reply within 5 s" ping_ok a "$OL6_b"
	check "$label: ping b -> a IPv4" "no reply within 5 s" ping_ok b "$OL4_a"
	check "$label: ping b -> a IPv6" "no reply within 5 s" ping_ok b "$OL6_a"
	local sa sb
	sa=$(st a '.peers[0].state') sb=$(st b '.peers[0].state')
	check "$label: status shows the peer up on both nodes" "a: '$sa', b: '$sb'" \
		test "$sa" = up -a "$sb" = up
	local ep
	ep=$(st a '.peers[0].endpoint')
	note "$label: a sees b at endpoint $ep"
	if [[ $UL == 6 ]]; then
		check "$label: endpoint is b's IPv6 underlay address" "endpoint '$ep'" \
			grep -q "2001:db8:1::2" <<<"$ep"
	fi
	node_stop a
	node_stop b
	wait_gone a
	wait_gone b
}

round "IPv4 underlay"
UL=6
round "IPv6 underlay"
finish
