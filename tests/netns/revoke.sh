#!/usr/bin/env bash
# revoke.sh -- an admin revokes a member of a --mesh network. a, b and c share the network secret
# and name the same admin key; c hangs off b. `veil revoke C --admin-key` on b:
#   b drops c at once (no peer, no ping) and writes the revocation down; a hears of it from b and
#   keeps it too; c, restarted, cannot get back in (b refuses its handshakes); b, restarted, still
#   refuses c (it reads its revocations file). A revocation signed by another key is refused.
#
#   veil-t-$$-a                 veil-t-$$-b                    veil-t-$$-c
#   veil-a 100.64.0.1 --peer b  veil-b 100.64.0.2 (no --peer)  veil-c 100.64.0.3 --peer b
#   veth0 198.51.100.1 <-veth-> veth0 198.51.100.2
#                               veth1 203.0.113.2    <-veth->  veth0 203.0.113.3
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
net_add_c b
keys_make a b c
psk_make net
"$VEIL" genadmin >"$TMPD/admin.key" && chmod 600 "$TMPD/admin.key" || die "veil genadmin"
"$VEIL" genadmin >"$TMPD/other.key" && chmod 600 "$TMPD/other.key" || die "veil genadmin"
ADMIN=$("$VEIL" adminpub <"$TMPD/admin.key") || die "veil adminpub"

# member NODE LISTEN [PEER@ENDPOINT] -- veil up --mesh with the admin key and a revocations file
member() {
	local n=$1 listen=$2; shift 2
	local peer=()
	[[ $# -gt 0 ]] && peer=(--peer "$1")
	node_run "$n" up --key "$TMPD/$n.key" --psk "$TMPD/net.psk" --mesh --name "$n" --keepalive 1 \
		--listen "$listen" --address "$(ol4 "$n")/24" --tun "$(tun "$n")" --control "$(sock "$n")" \
		--admin "$ADMIN" --revocations "$TMPD/$n.revoked" "${peer[@]}"
}
member b "0.0.0.0:$PORT"
member a "$UL4_a:$PORT" "$(pub b)@$UL4_b:$PORT"
member c "$UL4_c:$PORT" "$(pub b)@$UL4_VIA_c:$PORT"
for n in a b c; do wait_log "$n" 'event=started' 10 || die "$n did not start"; done
ping_within b "$OL4_c" 15 || die "no tunnel b -> c"
ping_within a "$OL4_b" 15 || die "no tunnel a -> b"

has_peer() { nsx "$1" "$VEIL" peers --json --control "$(sock "$1")" | jq -e --arg k "$2" 'any(.[]; .public_key == $k)' >/dev/null; }
revocations() { st "$1" '.mesh.revocations'; }
wait_until 10 has_peer a "$(pub c)" || note "a never learned c (it can reach it only through b)"

out=$(nsx b "$VEIL" revoke "$(pub c)" --admin-key "$TMPD/other.key" --control "$(sock b)" 2>&1)
rc=$?
refused=no
[[ $rc == 2 && $out == *"not signed by this network"* ]] && refused=yes
check "a revocation signed by another key is refused (exit 2)" "rc=$rc: $out" test "$refused" = yes
check "...and changes nothing" "b lost c" has_peer b "$(pub c)"

out=$(nsx b "$VEIL" revoke "$(pub c)" --admin-key "$TMPD/admin.key" --control "$(sock b)" 2>&1)
check "veil revoke on b succeeds" "$out" grep -q "^revoked $(pub c)" <<<"$out"
check "b drops c at once" "c is still b's peer" bash -c "! ip netns exec $(ns b) $VEIL peers --json --control $(sock b) | jq -e 'any(.[]; .name == \"c\")' >/dev/null"
check "b no longer reaches c" "a ping got through" bash -c "! ip netns exec $(ns b) ping -c 2 -W 1 -q $OL4_c >/dev/null 2>&1"
check "b wrote the revocation down" "$(cat "$TMPD/b.revoked" 2>&1)" test "$(grep -c . "$TMPD/b.revoked" 2>/dev/null)" = 1
check "a hears of it from b, keeps it, and has no c" "a: $(revocations a) revocations" \
	wait_until 10 bash -c "[[ \$(ip netns exec $(ns a) $VEIL status --json --control $(sock a) | jq .mesh.revocations) == 1 ]] && [[ -s $TMPD/a.revoked ]] && ! ip netns exec $(ns a) $VEIL peers --json --control $(sock a) | jq -e 'any(.[]; .name == \"c\")' >/dev/null"
check "a and b still talk" "no reply" ping_ok a "$OL4_b"

node_stop c
member c "$UL4_c:$PORT" "$(pub b)@$UL4_VIA_c:$PORT"
wait_log c 'event=started' 10 || die "c did not restart"
check "c, restarted, is refused by b" "b refused $(st b '.mesh.revoked_refused') handshakes" \
	wait_until 10 bash -c "(( \$(ip netns exec $(ns b) $VEIL status --json --control $(sock b) | jq .mesh.revoked_refused) > 0 ))"
check "c cannot reach b" "a ping got through" bash -c "! ip netns exec $(ns c) ping -c 2 -W 1 -q $OL4_b >/dev/null 2>&1"

node_stop b
member b "0.0.0.0:$PORT"
wait_log b 'event=started' 10 || die "b did not restart"
check "b, restarted, reads its revocations file" "$(grep revocations_loaded "${NODE_LOG[b]}")" \
	grep -q 'event=revocations_loaded .*count=1' "${NODE_LOG[b]}"
check "...and still refuses c" "c is b's peer again" \
	bash -c "sleep 3; ! ip netns exec $(ns b) $VEIL peers --json --control $(sock b) | jq -e 'any(.[]; .name == \"c\")' >/dev/null"
check "a and b talk again" "no reply" ping_within a "$OL4_b" 15

line=$("$VEIL" revoke "$(pub a)" --admin-key "$TMPD/admin.key" --print)
check "revoke --print writes one base64 line of 104 bytes" "got '$line'" \
	test "$(base64 -d <<<"$line" 2>/dev/null | wc -c)" = 104
finish
