#!/usr/bin/env bash
# filter.sh -- --filter on b: 'in tcp 8080 from admin-*' and 'in icmp from nobody'. a is b's peer
# "admin-a": its TCP to b:8080 connects, to b:8081 does not, its ping to b is refused; b's own
# ping to a (no out rules) goes out and its replies come back in (stateful). A reload with
# 'in icmp from admin-*' lets a's ping through. Drops are counted (drops.filtered), rule hits shown.
#
#   veil-t-$$-a (admin-a)  ========================>  veil-t-$$-b  --filter ...
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
keys_make a b
write_b() { # ICMP-PATTERN
	cat >"$TMPD/b.toml" <<TOML
key = "$TMPD/b.key"
listen = "$UL4_b:$PORT"
address = ["$OL4_b/24"]
filter = ["in tcp 8080 from admin-*", "in icmp from $1"]

[[peer]]
name = "admin-a"
public_key = "$(pub a)"
endpoint = "$UL4_a:$PORT"
allowed_ips = ["$OL4_a/32"]
TOML
}
write_b nobody
node_run b up --config "$TMPD/b.toml" --tun "$(tun b)" --control "$(sock b)"
wait_log b 'event=started' 10 || die "b did not start"
node_start a
wait_log a 'event=started' 10 || die "a did not start"
# servers on b: 8080 (allowed) and 8081 (not)
for port in 8080 8081; do
	ip netns exec "$NS_b" timeout 20 python3 -c "
import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('$OL4_b', $port)); s.listen(4)
while True: c, _ = s.accept(); c.close()" 2>/dev/null &
done
sleep 0.5
connects() { ip netns exec "$NS_a" timeout 4 python3 -c "import socket; socket.create_connection(('$OL4_b', $1), timeout=3).close()" 2>/dev/null; }
check "b pings a: out has no rules, and the replies come back in" "no reply" ping_ok b "$OL4_a"
check "a connects to b:8080 (in tcp 8080 from admin-*)" "refused" connects 8080
if connects 8081; then not_ok "a does not connect to b:8081 (no rule)" "connected"; else ok "a does not connect to b:8081 (no rule)"; fi
check "a's ping to b is refused (in icmp from nobody)" "b answered" bash -c "! ip netns exec $NS_a ping -c 2 -W 1 -q $OL4_b >/dev/null"
json=$(nsx b "$VEIL" status --json --control "$(sock b)")
check "b counts the drops and the rules' hits" "$(jq -c '{d: .drops.filtered, f: .filter}' <<<"$json")" \
	bash -c "[[ \$(jq '.drops.filtered' <<<\"\$0\") -ge 3 && \$(jq '.filter.rules[0].hits' <<<\"\$0\") -ge 1 && \$(jq '.filter.refused' <<<\"\$0\") -ge 1 ]]" "$json"
status=$(nsx b "$VEIL" status --control "$(sock b)")
check "status lists the rules with their hits" "$status" grep -q "in tcp 8080 from admin-\*  ([0-9]* hits)" <<<"$status"
write_b 'admin-*'
nsx b "$VEIL" reload --control "$(sock b)" >/dev/null
check "after a reload with 'in icmp from admin-*' a's ping passes" "no reply" ping_ok a "$OL4_b"
out=$("$VEIL" up --key "$TMPD/b.key" --address "$OL4_b/24" --filter 'in tcp 99999' --check 2>&1)
rc=$?
check "a bad rule: exit 2, one line naming it" "exit $rc: $out" bash -c "[[ $rc == 2 && \$(grep -c '' <<<\"\$0\") == 1 ]] && grep -q \"filter 'in tcp 99999'\" <<<\"\$0\"" "$out"
finish
