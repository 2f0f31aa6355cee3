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
	if [[ $UL == 4 ]]; then control_verbs; else node_stop a; fi
	node_stop b
	wait_gone a
	wait_gone b
}

# control_verbs -- veil peers, routes (text and JSON) and down against the running pair
control_verbs() {
	local out bname
	bname=$(st a '.peers[0].name')   # b's key prefix, or the name b announces (key characters outside [A-Za-z0-9._-] become '-')
	out=$(nsx a "$VEIL" peers --control "$(sock a)" 2>&1)
	check "veil peers names b and shows it up" "got: $(head -3 <<<"$out" | tr '\n' '|')" \
		eval 'grep -q -- "$bname" <<<"$out" && grep -Eq "(^| )up( |$)" <<<"$out"'
	out=$(nsx a "$VEIL" peers --json --control "$(sock a)" 2>&1)
	check "veil peers --json: one peer, up, with b's key" "got: ${out:0:200}" \
		quiet jq -e --arg k "$(pub b)" '(if type == "array" then . else .peers end) | length == 1 and .[0].state == "up" and .[0].public_key == $k' <<<"$out"
	out=$(nsx a "$VEIL" routes --control "$(sock a)" 2>&1)
	check "veil routes lists b's allowed IPs" "got: $(tr '\n' '|' <<<"$out")" \
		eval 'grep -q "^$OL4_b/32 .*$bname" <<<"$out" && grep -q "^$OL6_b/128 .*$bname" <<<"$out"'
	out=$(nsx a "$VEIL" routes --json --control "$(sock a)" 2>&1)
	check "veil routes --json: the two prefixes" "got: ${out:0:200}" \
		quiet jq -e --arg a "$OL4_b/32" --arg b "$OL6_b/128" '(if type == "array" then . else .routes end) | map(.prefix) | sort == ([$a, $b] | sort)' <<<"$out"
	local t0 rc
	t0=$(now_ms)
	out=$(nsx a "$VEIL" down --control "$(sock a)" 2>&1); rc=$?
	check "veil down answers and exits 0" "exit $rc: $out" test "$rc" = 0
	check "a's daemon exits 0 within 3 s of veil down" "rc ${NODE_RC:-still running} after ${EXIT_MS:-?} ms" \
		eval 'node_exited a "$t0" 3000 && test "$NODE_RC" = 0'
	check "b hears a leave (session_closed reason=peer_close)" "not in b's log" wait_log b 'session_closed.*reason=peer_close' 3
}

round "IPv4 underlay"
UL=6
round "IPv6 underlay"
finish
