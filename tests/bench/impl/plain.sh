# shellcheck shell=bash
# plain: no VPN at all. The overlay addresses go straight onto the veth, so this row is the
# ceiling of the path between the two namespaces (MTU 1500, the kernel's GSO/TSO). Direct link only.
impl_up() {
	[[ $LINK == direct ]] || fail "plain has no lossy-link variant"
	ip -n "$NS_A" addr add "$OL4_A/$OL4_LEN" dev "$UL_DEV"
	ip -n "$NS_B" addr add "$OL4_B/$OL4_LEN" dev "$UL_DEV"
	ip -n "$NS_A" -6 addr add "$OL6_A/$OL6_LEN" dev "$UL_DEV" nodad
	ip -n "$NS_B" -6 addr add "$OL6_B/$OL6_LEN" dev "$UL_DEV" nodad
}
