# shellcheck shell=bash
# wireguard-go: userspace WireGuard from Debian (wireguard-go, configured with wg from
# wireguard-tools). ChaCha20-Poly1305, MTU 1420 (its default). wireguard-go keeps its UAPI socket in
# /var/run/wireguard/DEV.sock, which every namespace shares, so the device names carry the run id.
UDP_PORT=51820
WG_A=wgb${RUN_ID}a WG_B=wgb${RUN_ID}b

wg_side() { # wg_side NS DEV SIDE PEER-SIDE ENDPOINT OL4 OL6 PEER-OL4 PEER-OL6
	local ns=$1 dev=$2 me=$3 peer=$4 ep=$5
	until_ok 50 in_ns "$ns" wg show "$dev" || { show_logs; fail "wireguard-go did not create $dev"; }
	in_ns "$ns" wg set "$dev" private-key "$STATE/$me.key" listen-port "$UDP_PORT" \
		peer "$(<"$STATE/$peer.pub")" endpoint "$ep:$UDP_PORT" allowed-ips "$8/32,$9/128" || fail "wg set $dev"
	ip -n "$ns" addr add "$6/$OL4_LEN" dev "$dev"
	ip -n "$ns" -6 addr add "$7/$OL6_LEN" dev "$dev" nodad
	ip -n "$ns" link set "$dev" mtu 1420 up
}

impl_up() {
	command -v wireguard-go >/dev/null && command -v wg >/dev/null || fail "wireguard-go or wg missing"
	local s
	for s in a b; do
		(umask 077 && wg genkey >"$STATE/$s.key")
		wg pubkey <"$STATE/$s.key" >"$STATE/$s.pub"
	done
	# -f: foreground, so the recorded PID is the daemon's
	spawn wg-a "$NS_A" wireguard-go -f "$WG_A"
	spawn wg-b "$NS_B" wireguard-go -f "$WG_B"
	wg_side "$NS_A" "$WG_A" a b "$EP_OF_B" "$OL4_A" "$OL6_A" "$OL4_B" "$OL6_B"
	wg_side "$NS_B" "$WG_B" b a "$EP_OF_A" "$OL4_B" "$OL6_B" "$OL4_A" "$OL6_A"
}
