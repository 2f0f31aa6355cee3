#!/usr/bin/env bash
# isolate.sh -- a hub between two spokes: a and c route the whole overlay through b, which
# forwards (ip_forward=1). Without --isolate a and c reach each other through b; after a reload
# with isolate = true they do not, in either direction (counted as drops "isolated" at b), while
# both still reach b itself.
#
#   veil-t-$$-a 100.64.0.1 ---- b 100.64.0.2 (hub, forwards) ---- c 100.64.0.3
#   198.51.100.1        198.51.100.2 | 203.0.113.2              203.0.113.3
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
net_add_c b
keys_make a b c
nsx b sysctl -qw net.ipv4.ip_forward=1
cat >"$TMPD/b.toml" <<TOML
key = "$TMPD/b.key"
listen = "0.0.0.0:$PORT"
address = ["$OL4_b/24"]

[[peer]]
name = "a"
public_key = "$(pub a)"
allowed_ips = ["$OL4_a/32"]

[[peer]]
name = "c"
public_key = "$(pub c)"
allowed_ips = ["$OL4_c/32"]
TOML
spoke() { # NODE ENDPOINT-OF-B
	node_run "$1" up --key "$TMPD/$1.key" --listen "0.0.0.0:$PORT" --address "$(ol4 "$1")/24" --tun "$(tun "$1")" \
		--control "$(sock "$1")" --peer "$(pub b)@$2:$PORT" --allow 100.64.0.0/24 --keepalive 5
}
node_run b up --config "$TMPD/b.toml" --tun "$(tun b)" --control "$(sock b)"
wait_log b 'event=started' 10 || die "b did not start"
spoke a "$UL4_b"
spoke c "$UL4_VIA_c"
wait_log a 'event=started' 10 && wait_log c 'event=started' 10 || die "a spoke did not start"
check "without --isolate: a reaches c through the hub" "no reply" ping_ok a "$OL4_c"
check "and c reaches a" "no reply" ping_ok c "$OL4_a"

printf 'isolate = true\n' | cat - "$TMPD/b.toml" >"$TMPD/b.new" && mv "$TMPD/b.new" "$TMPD/b.toml"
out=$(nsx b "$VEIL" reload --control "$(sock b)" 2>&1)
check "isolate is reloadable" "$out" test $? = 0
before=$(st b '.drops.isolated')
check "--isolate: a no longer reaches c" "c answered" bash -c "! ip netns exec $NS_a ping -c 2 -W 1 -q $OL4_c >/dev/null"
check "nor c a" "a answered" bash -c "! ip netns exec $NS_c ping -c 2 -W 1 -q $OL4_a >/dev/null"
after=$(st b '.drops.isolated')
check "b counted what it stopped (drops.isolated $before -> $after)" "before $before after $after" test "$after" -ge $((before + 4))
check "both still reach the hub" "no reply" bash -c "ip netns exec $NS_a ping -c 1 -W 2 -q $OL4_b >/dev/null && ip netns exec $NS_c ping -c 1 -W 2 -q $OL4_b >/dev/null"
check "status shows no relay offered" "$(st b '.relay.offered')" test "$(st b '.relay.offered')" = false
finish
