#!/usr/bin/env bash
# isolated.sh -- isolated members of a mesh: b, the gateway, invites a as a member and c with
# `veil invite --isolated`. All three run --mesh. c gets a secret of its own, never the network's,
# and b writes it down `isolated = true` with that secret; b tells a of the mark, tells c of no
# member, and carries nothing between them. c knows a's key and endpoint anyway (its config names
# a): a refuses its handshakes, so a and c cannot reach each other in either direction, while both
# reach b. a keeps the mark across its restart (state file). A reload of b without the mark lifts
# it at a, and c still reaches nobody but b: it never had the network secret.
#
#   veil-t-$$-a  member (joined)       veil-t-$$-b  gateway, inviter      veil-t-$$-c  isolated (joined)
#   198.51.100.1  <--- veth --->  198.51.100.2 | 203.0.113.2  <--- veth --->  203.0.113.3
#   (b forwards between its two links, so a and c can reach each other's underlay)
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
net_add_c b
nsx b sysctl -qw net.ipv4.ip_forward=1
ip -n "$NS_a" route add 203.0.113.0/24 via "$UL4_b" || die "route a -> c's link"
NET=100.64.0.0/24
mesh_first() { printf 'mesh = true\nnetwork = ["%s"]\nkeepalive = 2\n' "$NET" | cat - "$1" >"$1.new" && mv "$1.new" "$1"; }

"$VEIL" init --dir "$TMPD/b" --address "$OL4_b/24" --listen "0.0.0.0:$PORT" >/dev/null || die "veil init"
psk_make net
printf 'psk = "%s"\n' "$TMPD/net.psk" >>"$TMPD/b/veil.toml"
mesh_first "$TMPD/b/veil.toml"
node_run b up --config "$TMPD/b/veil.toml" --tun "$(tun b)" --control "$(sock b)"
wait_log b 'event=started' 10 || die "b did not start"

member=$(nsx b "$VEIL" invite --name member --endpoint "$UL4_b:$PORT" --control "$(sock b)") || die "invite for a failed"
guest=$(nsx b "$VEIL" invite --isolated --name guest --endpoint "$UL4_VIA_c:$PORT" --control "$(sock b)") || die "invite --isolated failed"
list=$(nsx b "$VEIL" invite --list --control "$(sock b)" 2>&1)
check "invite --list marks the guest's invite isolated" "$list" grep -Eq 'guest +pending  isolated' <<<"$list"
nsx a "$VEIL" join "$member" --dir "$TMPD/a" --listen "0.0.0.0:$PORT" >/dev/null 2>&1 || die "a's join failed"
nsx c "$VEIL" join "$guest" --dir "$TMPD/c" --listen "0.0.0.0:$PORT" >/dev/null 2>&1 || die "c's join failed"
check "b wrote the guest down isolated" "$(cat "$TMPD/b/veil.toml")" \
	bash -c "grep -A6 'name = \"guest\"' $TMPD/b/veil.toml | grep -qx 'isolated = true'"
check "and the member not" "$(cat "$TMPD/b/veil.toml")" bash -c "! grep -A6 'name = \"member\"' $TMPD/b/veil.toml | grep -q isolated"
check "the guest got a secret of its own, not the network's" "same secret" bash -c "! cmp -s $TMPD/c/network.psk $TMPD/net.psk"
check "b keeps the guest's secret in a file of its own (0600) its [[peer]] names" "$(ls -l "$TMPD/b")" \
	bash -c "f=\$(ls $TMPD/b/peer-*.psk) && [[ \$(stat -c %a \$f) == 600 ]] && grep -q \"^psk = \\\"peer-\" $TMPD/b/veil.toml && cmp -s \$f $TMPD/c/network.psk"
for n in a c; do mesh_first "$TMPD/$n/veil.toml"; done
# the guest knows the member anyway (say, from before): its config names a
printf '\n[[peer]]\nname = "a"\npublic_key = "%s"\nendpoint = "%s:%s"\n' "$("$VEIL" pubkey <"$TMPD/a/private.key")" "$UL4_a" "$PORT" >>"$TMPD/c/veil.toml"
node_run a up --config "$TMPD/a/veil.toml" --tun "$(tun a)" --control "$(sock a)"
node_run c up --config "$TMPD/c/veil.toml" --tun "$(tun c)" --control "$(sock c)"
wait_log a 'event=started' 10 && wait_log c 'event=started' 10 || die "a joiner did not start"
ip_a=$(sed -n 's/^address = \["\([0-9.]*\)\/24"\]/\1/p' "$TMPD/a/veil.toml")
ip_c=$(sed -n 's/^address = \["\([0-9.]*\)\/24"\]/\1/p' "$TMPD/c/veil.toml")
[[ -n $ip_a && -n $ip_c ]] || die "no overlay address in a joiner's config"

check "a reaches the gateway" "no reply" ping_within a "$OL4_b" 10
check "the isolated c reaches the gateway" "no reply" ping_within c "$OL4_b" 10
marked() { [[ $(st "$1" '.mesh.isolated_by_members') == 1 ]]; }
wait_until 10 marked a
check "a heard b's mark (mesh.isolated_by_members 1)" "$(st a '.mesh')" marked a
check "b marks one peer (isolating 1, peers[guest].isolated)" "$(st b '.mesh.isolating') $(st b '.peers[] | select(.name == "guest") | .isolated')" \
	test "$(st b '.mesh.isolating') $(st b '.peers[] | select(.name == "guest") | .isolated')" = "1 true"
refused() { (($(st a '.mesh.isolated_refused') > 0)); }
wait_until 15 refused
check "c tries a: a refuses it (isolated_refused $(st a '.mesh.isolated_refused'))" "$(grep -c 'reason=isolated' "${NODE_LOG[a]}") log lines" refused
check "b told c of no member (members_learned 0)" "$(st c '.mesh')" test "$(st c '.mesh.members_learned')" = 0
check "c does not reach a" "a answered" bash -c "! ip netns exec $NS_c ping -c 3 -W 1 -q $ip_a >/dev/null"
check "a does not reach c" "c answered" bash -c "! ip netns exec $NS_a ping -c 3 -W 1 -q $ip_c >/dev/null"
ups() { st a '[.peers[] | select(.state == "up")] | length'; }
check "a has one session up, b's" "$(st a '.peers[] | [.name, .state] | join(" ")')" test "$(ups)" = 1

# a restarts: its state file keeps the mark, so c is refused from the first moment
node_stop a
check "a's state file keeps the mark" "$(cat "$TMPD/a/state" 2>&1)" grep -q '^isolated ' "$TMPD/a/state"
node_run a up --config "$TMPD/a/veil.toml" --tun "$(tun a)" --control "$(sock a)"
wait_log a 'event=started' 10 || die "a did not restart"
check "after a's restart the mark is there at once" "$(st a '.mesh')" marked a
check "and c still does not reach a" "a answered" bash -c "! ip netns exec $NS_c ping -c 3 -W 1 -q $ip_a >/dev/null"

# the gateway lifts the mark: a and c meet directly
sed -i '/^isolated = true$/d' "$TMPD/b/veil.toml"
out=$(nsx b "$VEIL" reload --control "$(sock b)" 2>&1)
check "the mark is reloadable" "$out" test $? = 0
unmarked() { [[ $(st a '.mesh.isolated_by_members') == 0 ]]; }
wait_until 10 unmarked
check "a dropped the mark ($WAITED_MS ms)" "$(st a '.mesh')" unmarked
check "c still does not reach a: it never had the network secret" "a answered" bash -c "! ip netns exec $NS_c ping -c 3 -W 1 -q $ip_a >/dev/null"
check "and c still reaches b" "no reply" ping_ok c "$OL4_b"
finish
