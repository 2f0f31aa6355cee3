#!/usr/bin/env bash
# exit.sh -- exit nodes. b runs --exit: it announces 0.0.0.0/0 and ::/0, forwards, and masquerades
# members out of its uplink (an nftables table of its own). a runs --exit-node b: its default
# routes go into table 51820 behind "not fwmark" (its own UDP packets are marked and bypass it),
# so c, an "internet" host reachable only through b, answers a and sees b's address. a is also a
# router (--exit-allow-lan: its LAN routes win): l, a LAN host behind it, reaches c through the
# exit as well. Without --exit-allow-lan the LAN is sent to the exit too: a no longer reaches l. The tunnel itself travels
# over a's main default route (b's endpoint is b's uplink address), which only the mark keeps out
# of the tunnel. `veil down` and kill -9 + restart leave rules, routes, nft ruleset and
# ip_forward exactly as they were (the exit's sysctl journal tells the restart what it had set).
#
#   l 192.0.2.10 -- 192.0.2.1 a ------------------- b 203.0.113.2 ----------- c 203.0.113.3
#   (LAN host)      veil-a 100.64.0.1     198.51.100.0/24     veil-b 100.64.0.2   (internet host)
#                   default via b, --exit-node b               --exit
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
net_add_c b
keys_make a b
ip -n "$NS_c" route del 198.51.100.0/24          # c knows nothing behind b: only b's masquerade reaches it
nsx a ip route add default via "$UL4_b"
NS_l=veil-t-$$-l
NS_ALL+=("$NS_l")
ip netns add "$NS_l" || die "ip netns add l"
ip link add veth-l netns "$NS_a" type veth peer name veth0 netns "$NS_l" || die "veth to l"
ip -n "$NS_l" link set lo up
ip -n "$NS_l" addr add 192.0.2.10/24 dev veth0
ip -n "$NS_l" link set veth0 up
ip -n "$NS_l" route add default via 192.0.2.1
nsx a ip addr add 192.0.2.1/24 dev veth-l
nsx a ip link set veth-l up
nsx a sysctl -qw net.ipv4.ip_forward=1              # a is a router: it forwards for its LAN already
# and its uplink checks reverse paths strictly: the tunnel's replies must still get in (src_valid_mark
# plus the mark given back to them by a's NAT table)
nsx a sysctl -qw net.ipv4.conf.all.rp_filter=1 "net.ipv4.conf.$VETH.rp_filter=1"

snapshot() { # NODE: what Veil may change and must put back (link-local routes come and go by themselves)
	{
		nsx "$1" ip rule; nsx "$1" ip -6 rule; nsx "$1" ip route show table all; nsx "$1" ip -6 route show table all
		nsx "$1" nft list ruleset; nsx "$1" cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/all/forwarding \
			/proc/sys/net/ipv4/conf/all/src_valid_mark
	} | grep -v fe80::
}
before_a=$(snapshot a | grep -v "$(tun a)") before_b=$(snapshot b | grep -v "$(tun b)")

start_b() {
	node_run b up --key "$TMPD/b.key" --listen "0.0.0.0:$PORT" --address "$OL4_b/24" --address "$OL6_b/64" --tun "$(tun b)" \
		--peer "$(pub a)" --allow "$OL4_a/32" --allow "$OL6_a/128" --control "$(sock b)" --exit "$@"
	wait_log b 'event=started' 10 || die "b did not start"
}
cat >"$TMPD/a.toml" <<TOML
key = "$TMPD/a.key"
listen = "0.0.0.0:$PORT"
address = ["$OL4_a/24", "$OL6_a/64"]
exit_node = "b"
exit_allow_lan = true

[[peer]]
name = "b"
public_key = "$(pub b)"
endpoint = "$UL4_VIA_c:$PORT"
allowed_ips = ["$OL4_b/32", "$OL6_b/128"]
TOML
start_a() {
	node_run a up --config "$TMPD/a.toml" --tun "$(tun a)" --control "$(sock a)"
	wait_log a 'event=started' 10 || die "a did not start"
}

# bad input first: one line, exit 2, nothing started
out=$(nsx a "$VEIL" up --key "$TMPD/a.key" --address "$OL4_a/24" --peer "$(pub b)@$UL4_VIA_c:$PORT" --allow "$OL4_b/32" --exit-node nosuch 2>&1)
rc=$?
check "--exit-node naming no peer: exit 2, one line" "exit $rc: $out" bash -c "[[ $rc == 2 && \$(grep -c '' <<<\"\$0\") == 1 ]] && grep -q \"names no peer\" <<<\"\$0\"" "$out"
out=$(nsx a "$VEIL" up --key "$TMPD/a.key" --address "$OL4_a/24" --exit --exit-node b 2>&1)
check "--exit with --exit-node: refused" "$out" grep -q "exclude each other" <<<"$out"

start_b
start_a
wait_until 10 bash -c "ip -n $NS_a route show table 51820 | grep -q '^default dev $(tun a)'"
check "a: the exit's default route is in table 51820, with the two policy rules" "$(nsx a ip rule; ip -n "$NS_a" route show table 51820)" \
	bash -c "ip -n $NS_a rule | grep -q '^5208:.*lookup main suppress_prefixlength 0' && ip -n $NS_a rule | grep -q '^5209:.*not from all fwmark 0xca6c lookup 51820' &&
		ip -n $NS_a -6 route show table 51820 | grep -q '^default dev $(tun a)'"
check "a: the kill switch: an unreachable default behind the exit's, so an exit that goes away leaks nothing" "$(ip -n "$NS_a" route show table 51820; ip -n "$NS_a" -6 route show table 51820)" \
	bash -c "ip -n $NS_a route show table 51820 | grep -q '^unreachable default' && ip -n $NS_a -6 route show table 51820 | grep -q '^unreachable default'"
check "a: the main table's default route is untouched" "$(ip -n "$NS_a" route show table main)" \
	bash -c "ip -n $NS_a route show table main | grep -q '^default via $UL4_b dev $VETH'"
check "b: forwarding on, its own nft table" "$(nsx b nft list ruleset)" \
	bash -c "[[ \$(ip netns exec $NS_b cat /proc/sys/net/ipv4/ip_forward) == 1 ]] && ip netns exec $NS_b nft list table inet veil-$(tun b) | grep -q 'oif != \"$(tun b)\" masquerade'"

check "a reaches the internet host c through the exit (IPv4)" "no reply" ping_ok a "$UL4_c"
check "and over IPv6" "no reply" ping_ok a "$UL6_c"
# c logs who connects: b's uplink address when masqueraded, anything else is a leak
seen() { # NODE: the source address c sees for a TCP connection from NODE
	ip netns exec "$NS_c" timeout 8 python3 -c '
import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8081)); s.listen(1); c, a = s.accept(); print(a[0]); c.close()' >"$TMPD/seen" &
	local srv=$!
	sleep 0.5
	ip netns exec "$(ns "$1")" timeout 5 python3 -c "import socket; socket.create_connection(('$UL4_c', 8081), timeout=4).close()"
	wait "$srv"
	cat "$TMPD/seen"
}
ns() { if [[ $1 == l ]]; then echo "$NS_l"; else local v="NS_$1"; echo "${!v}"; fi; }
src=$(seen a)
check "c sees a's connection coming from b's uplink address (masqueraded by the exit)" "c saw '$src'" test "$src" = "$UL4_VIA_c"
ep=$(st b '.peers[0].endpoint')
check "the tunnel runs over the underlay, not through itself (b sees a at $UL4_a)" "b sees a at '$ep'" test "$ep" = "$UL4_a:$PORT"
check "l, a LAN host behind router a, reaches c through the exit" "no reply" \
	ip netns exec "$NS_l" timeout 6 ping -c 2 -W 2 -q "$UL4_c"
src=$(seen l)
check "and c sees it from b's uplink address too" "c saw '$src'" test "$src" = "$UL4_VIA_c"
check "a still reaches b's overlay address (the main table wins over the exit)" "no reply" ping_ok a "$OL4_b"
check "--exit-allow-lan: a reaches its LAN host l" "no reply" ping_ok a 192.0.2.10

# --exit-for: an exit that serves only "nobody" gives a no default route, and a reaches nothing through it
node_stop b
start_b --exit-for 'nobody*'
check "status names whom the exit serves" "$(st b '.exit')" test "$(st b '.exit.for[0]')" = 'nobody*'
wait_until 15 bash -c "ip netns exec $NS_a $VEIL status --json --control $(sock a) | jq -e '.peers[0].state == \"up\"' >/dev/null && ! ip -n $NS_a route show table 51820 | grep -q '^default dev'"
check "--exit-for nobody*: a has no default route from b ($WAITED_MS ms)" "$(ip -n "$NS_a" route show table 51820)" \
	bash -c "! ip -n $NS_a route show table 51820 | grep -q '^default dev'"
check "and does not reach c (the kill switch holds)" "c answered" bash -c "! ip netns exec $NS_a ping -c 1 -W 2 -q $UL4_c >/dev/null"
nsx a "$VEIL" set exit-node off --control "$(sock a)" >/dev/null 2>&1
out=$(nsx a "$VEIL" set exit-node b --control "$(sock a)" 2>&1)
rc=$?
check "set exit-node b while b serves only nobody*: exit 2, one clear line, still none" "exit $rc: $out" \
	bash -c "[[ $rc == 2 && \$(grep -c '' <<<\"\$0\") == 1 ]] && grep -q 'offers no exit to this node' <<<\"\$0\" && [[ \$(ip -n $NS_a rule | grep -c '^520[89]:') == 0 ]]" "$out"
node_stop b
start_b --exit-for "$(pub a)"
nsx a "$VEIL" set exit-node b --control "$(sock a)" >/dev/null 2>&1 || true
wait_until 15 bash -c "ip -n $NS_a route show table 51820 | grep -q '^default dev $(tun a)'"
check "--exit-for naming a's public key: the default route is back ($WAITED_MS ms), c reached" "no reply" ping_within a "$UL4_c" 10

# switching at run time: off puts rules and routes back as they were; b again brings them back
out=$(nsx a "$VEIL" set exit-node nosuch --control "$(sock a)" 2>&1)
rc=$?
check "set exit-node naming no peer: exit 2, one line, nothing changed" "exit $rc: $out" \
	bash -c "[[ $rc == 2 && \$(grep -c '' <<<\"\$0\") == 1 && \$(ip -n $NS_a rule | grep -c '^520[89]:') == 2 ]]" "$out"
out=$(nsx a "$VEIL" set exit-node off --control "$(sock a)" 2>&1)
check "set exit-node off: ok" "$out" grep -q "^ok: no exit node" <<<"$out"
wait_until 5 bash -c "! ip -n $NS_a route show table 51820 | grep -q default"
check "off: a's rules, routes and nft ruleset are as before veil started (the TUN's own aside)" "$(diff <(echo "$before_a") <(snapshot a | grep -v "$(tun a)"))" \
	test "$before_a" = "$(snapshot a | grep -v "$(tun a)")"
check "off: c is out of reach again (nothing goes to the exit)" "c answered" bash -c "! ip netns exec $NS_a ping -c 1 -W 2 -q $UL4_c >/dev/null"
out=$(nsx a "$VEIL" set exit-node b --control "$(sock a)" 2>&1)
check "set exit-node b: ok" "$out" grep -q "^ok: exit node b" <<<"$out"
wait_until 5 bash -c "ip -n $NS_a route show table 51820 | grep -q '^default dev $(tun a)'"
check "b again: rules and default route back, c reached through the exit" "no reply" \
	bash -c "[[ \$(ip -n $NS_a rule | grep -c '^520[89]:') == 2 ]] && ip netns exec $NS_a ping -c 1 -W 3 -q $UL4_c >/dev/null"

# without --exit-allow-lan (a reload): one rule, everything unmarked goes to the exit, the LAN too
sed -i '/^exit_allow_lan/d' "$TMPD/a.toml"
out=$(nsx a "$VEIL" reload --control "$(sock a)" 2>&1)
check "exit_allow_lan is reloadable" "$out" grep -q '^ok: reloaded' <<<"$out"
wait_log a 'event=exit_node_changed exit_node=b trigger=reload' 5
check "without --exit-allow-lan: only the fwmark rule" "$(nsx a ip rule)" \
	bash -c "[[ \$(ip -n $NS_a rule | grep -c '^520[89]:') == 1 ]] && ip -n $NS_a rule | grep -q '^5209:'"
check "a still reaches c and b's overlay address" "no reply" bash -c "ip netns exec $NS_a ping -c 1 -W 3 -q $UL4_c >/dev/null && ip netns exec $NS_a ping -c 1 -W 3 -q $OL4_b >/dev/null"
check "but no longer its LAN host l (sent to the exit)" "l answered" bash -c "! ip netns exec $NS_a ping -c 1 -W 2 -q 192.0.2.10 >/dev/null"

node_stop a
node_stop b
check "veil down: a's rules, routes, nft ruleset and sysctls are as before" "$(diff <(echo "$before_a") <(snapshot a | grep -v "$(tun a)"))" \
	test "$before_a" = "$(snapshot a | grep -v "$(tun a)")"
check "veil down: b's as well (ip_forward back to 0, nft table gone)" "$(diff <(echo "$before_b") <(snapshot b | grep -v "$(tun b)"))" \
	test "$before_b" = "$(snapshot b | grep -v "$(tun b)")"

# kill -9: b's nft table goes with its socket at once; a's rules stay until a restart removes them
start_b
start_a
wait_until 10 bash -c "ip -n $NS_a route show table 51820 | grep -q '^default dev $(tun a)'"
kill -9 "${NODE_PID[b]}" "${NODE_PID[a]}"
wait "${NODE_PID[b]}" "${NODE_PID[a]}" 2>/dev/null
unset "NODE_PID[a]" "NODE_PID[b]"
check "kill -9: b's nft table is gone with the process" "$(nsx b nft list ruleset)" test -z "$(nsx b nft list ruleset)"
start_a
check "the restarted a has its rule once (the stale one removed first)" "$(nsx a ip rule)" \
	test "$(nsx a ip rule | grep -c '^520[89]:')" = 1
node_stop a
check "and after it stops, a's state is as before" "$(diff <(echo "$before_a") <(snapshot a | grep -v "$(tun a)"))" \
	test "$before_a" = "$(snapshot a | grep -v "$(tun a)")"
# the crashed exit left ip_forward at 1; its journal lets the restart know that was its own doing
check "kill -9 left b's sysctl journal" "$(ls "$TMPD")" test -s "$(sock b).sysctl"
start_b
check "the restarted b put back what the crashed run set" "$(grep -E 'sysctl_(restored|set)' "${NODE_LOG[b]}")" \
	grep -q 'event=sysctl_restored file=/proc/sys/net/ipv4/ip_forward to=0 reason=previous_run_did_not_exit_cleanly' "${NODE_LOG[b]}"
node_stop b
check "and after it stops, b's state is as before (ip_forward 0)" "$(diff <(echo "$before_b") <(snapshot b | grep -v "$(tun b)"))" \
	test "$before_b" = "$(snapshot b | grep -v "$(tun b)")"
check "a clean stop removes the journal" "$(ls "$TMPD")" test ! -e "$(sock b).sysctl"
finish
