#!/usr/bin/env bash
# autoaddr.sh -- --address auto: a takes a host address of --network derived from its key; b,
# with a lower key, is configured with that very address. The lower key keeps it: a moves to its
# next candidate (address_moved), the TUN and the mesh follow, both reach each other, and the
# state file (0600) keeps a's new address, so a restarted a starts on it without a collision.
# Bad input: auto without --mesh or without --network is one line, exit 2.
#
#   veil-t-$$-a  --address auto (collides, moves)          veil-t-$$-b  --address auto (the same first)
#   veth0  198.51.100.1   <------------- veth ------------->   veth0  198.51.100.2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
psk_make net
keys_make a b
NET=100.64.0.0/29                 # six host addresses: two keys with the same first candidate are quick to find
cand() { "$VEIL" up --key "$TMPD/$1.key" --psk "$TMPD/net.psk" --mesh --network $NET --address auto --check 2>&1 | sed -n 's/.*address auto: \([0-9.]*\)\/29).*/\1/p'; }
auto=$(cand a)
check "up --check names the auto address, inside --network" "got '$auto'" bash -c "[[ '$auto' =~ ^100\.64\.0\.[1-6]$ ]]"
for ((i = 0; i < 80; i++)); do [[ $(cand b) == "$auto" ]] && break; keys_make b; done
[[ $(cand b) == "$auto" ]] || die "no key for b with a's first candidate in 80 draws"
# b's key must sort below a's (the lower key keeps the address): else they swap names
lower() { python3 -c "import base64,sys; sys.exit(0 if base64.b64decode(sys.argv[1]) < base64.b64decode(sys.argv[2]) else 1)" "$(pub b)" "$(pub a)"; }
if ! lower; then
	for f in key pub; do mv "$TMPD/a.$f" "$TMPD/t.$f" && mv "$TMPD/b.$f" "$TMPD/a.$f" && mv "$TMPD/t.$f" "$TMPD/b.$f"; done
fi
lower || die "b's key does not sort below a's"

out=$("$VEIL" up --key "$TMPD/a.key" --address auto --network $NET --check 2>&1)
rc=$?
check "auto without --mesh: exit 2, one line" "exit $rc: $out" bash -c "[[ $rc == 2 ]] && grep -q 'needs --mesh' <<<\"\$0\"" "$out"
out=$("$VEIL" up --key "$TMPD/a.key" --psk "$TMPD/net.psk" --mesh --address auto --check 2>&1)
check "auto without --network: refused" "$out" grep -q 'needs --network' <<<"$out"

cat >"$TMPD/a.toml" <<TOML
key = "$TMPD/a.key"
psk = "$TMPD/net.psk"
mesh = true
listen = "$UL4_a:$PORT"
address = ["auto"]
network = ["$NET"]
keepalive = 1

[[peer]]
public_key = "$(pub b)"
endpoint = "$UL4_b:$PORT"
TOML
node_run b up --key "$TMPD/b.key" --psk "$TMPD/net.psk" --mesh --listen "$UL4_b:$PORT" --address auto --network $NET \
	--tun "$(tun b)" --control "$(sock b)" --keepalive 1 --peer "$(pub a)@$UL4_a:$PORT"
node_run a up --config "$TMPD/a.toml" --tun "$(tun a)" --control "$(sock a)"
wait_log a 'event=address_moved' 15
moved=$(sed -n "s/.*event=address_moved from=$auto\/29 to=\([0-9.]*\)\/29 .*/\1/p" "${NODE_LOG[a]}")
check "a, the higher key, moves off $auto (logged with the new address)" "$(grep -E 'address_|claim_refused' "${NODE_LOG[a]}")" \
	bash -c "[[ '$moved' == 100.64.0.* && '$moved' != '$auto' ]]"
check "a's TUN has the new address, not the old one" "$(ip -n "$NS_a" addr show dev "$(tun a)")" \
	bash -c "ip -n $NS_a addr show dev $(tun a) | grep -q 'inet $moved/29' && ! ip -n $NS_a addr show dev $(tun a) | grep -q 'inet $auto/'"
rt() { st b '.routes[].prefix' | grep -qx "$moved/32"; }
wait_until 5 rt
check "b learns a's new address within the 1 s debounce ($WAITED_MS ms)" "routes: $(st b '.routes[].prefix')" rt
check "b keeps its address and b reaches a at the new one" "no reply" ping_ok b "$moved"
check "a reaches b at $auto" "no reply" ping_ok a "$auto"
wait_until 5 grep -q "^address $moved/29$" "$TMPD/state"
check "the state file keeps the new address, mode 0600" "$(ls -l "$TMPD/state" 2>&1; cat "$TMPD/state" 2>&1)" \
	bash -c "grep -qx 'address $moved/29' '$TMPD/state' && [[ \$(stat -c %a '$TMPD/state') == 600 ]]"

node_stop a
node_run a up --config "$TMPD/a.toml" --tun "$(tun a)" --control "$(sock a)"
wait_log a 'event=started' 10 || die "a did not start again"
check "restarted, a starts on its new address (from the state file)" "$(ip -n "$NS_a" addr show dev "$(tun a)")" \
	bash -c "ip -n $NS_a addr show dev $(tun a) | grep -q 'inet $moved/29'"
check "and b reaches it" "no reply" ping_ok b "$moved"
sleep 1
check "no second move" "$(grep address_moved "${NODE_LOG[a]}")" bash -c "! grep -q address_moved '${NODE_LOG[a]}'"
finish
