#!/usr/bin/env bash
# networks.sh -- several networks in one daemon (README "Several networks"): a and b each run
# one veil with two [[network]] tables, "work" (TUN, 100.64.0.N/24, port 51820) and "home" (TAP,
# 100.64.1.N/24, port 51821), each with its own network secret; c hangs off b.
#
#   veil-t-$$-a 198.51.100.1 <--- veth ---> 198.51.100.2 | 203.0.113.2 <--- veth ---> 203.0.113.3 veil-t-$$-c
#
#   (i)    --check names both; both interfaces come up (the TUN named after its network, the TAP);
#          pings cross each network; status, JSON and health answer for all and per network;
#   (ii)   /metrics holds each family once and each sample with its network label;
#   (iii)  isolation, both ways: a packet for the other network's prefix goes nowhere (a->b over
#          work to home's address, b->a likewise); a member of work (c1) is refused on b's home
#          port and a member of home (c2) on b's work port, and neither reaches anything;
#   (iv)   a reload of work (its peer's keepalive) leaves home's session as it was;
#   (v)    bad files: a repeated interface, port or prefix, a node-wide key in a network, a flag
#          that belongs to a network: exit 2 with one line; the running daemon is not touched;
#   (vi)   `veil down --network work` stops work alone; SIGTERM ends the rest, exit 0.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

command -v promtool >/dev/null || die "missing promtool (Debian package prometheus; make deps)"
net_setup
net_add_c b
keys_make a b c1 c2
psk_make work
psk_make home
H4_a=100.64.1.1 H4_b=100.64.1.2

# conf NODE OTHER -- NODE's file: work's peers are OTHER (and c1 for b), home's OTHER (and c2 for b)
conf() {
	local n=$1 o=$2 ul_o
	ul_o=$(ul4 "$o")
	cat <<EOF
key = "$TMPD/$n.key"
control = "$(sock "$n")"
mgmt = "127.0.0.1:$MGMT_PORT"

[[network]]
name = "work"
psk = "$TMPD/work.psk"
listen = "0.0.0.0:51820"
address = ["$(ol4 "$n")/24"]
keepalive = ${KA:-5}

[[network.peer]]
public_key = "$(pub "$o")"
endpoint = "$ul_o:51820"
allowed_ips = ["$(ol4 "$o")/32"]
$([[ $n == b ]] && printf '\n[[network.peer]]\npublic_key = "%s"\nallowed_ips = ["100.64.0.3/32"]\n' "$(pub c1)")

[[network]]
name = "home"
mode = "tap"
tun = "veil-home"
psk = "$TMPD/home.psk"
listen = "0.0.0.0:51821"
address = ["$(eval echo "\$H4_$n")/24"]
keepalive = 5

[[network.peer]]
public_key = "$(pub "$o")"
endpoint = "$ul_o:51821"
$([[ $n == b ]] && printf '\n[[network.peer]]\npublic_key = "%s"\n' "$(pub c2)")
EOF
}
conf a b >"$TMPD/a.toml"
conf b a >"$TMPD/b.toml"

out=$(nsx a "$VEIL" up --config "$TMPD/a.toml" --check 2>&1)
check "(i) --check names both networks" "$out" bash -c "grep -q 'network work, peers: 1, tun work' <<<'$out' && grep -q 'network home, peers: 1, tun veil-home' <<<'$out'"
node_run a up --config "$TMPD/a.toml"
node_run b up --config "$TMPD/b.toml"
up() { ip -n "$(ns "$1")" -o link show dev "$2" 2>/dev/null | grep -q '[<,]UP[,>]'; }
wait_until 10 bash -c "ip -n $NS_a -o addr show dev work | grep -q $OL4_a && ip -n $NS_b -o addr show dev veil-home | grep -q $H4_b" \
	|| die "the networks' interfaces did not come up"
link=$(ip -n "$NS_a" -d link show dev work; ip -n "$NS_a" -d link show dev veil-home)
check "(i) work is a TUN named after its network, home a TAP" "$link" \
	bash -c "grep -A2 '^[0-9]*: work:' <<<'$link' | grep -q 'tun type tun' && grep -A2 'veil-home:' <<<'$link' | grep -q 'tun type tap'"
check "(i) ping a -> b over work" "no reply" ping_within a "$OL4_b" 10
check "(i) ping a -> b over home (ARP on the TAP)" "no reply" ping_within a "$H4_b" 10
check "(i) ping b -> a over home" "no reply" ping_within b "$H4_a" 10

ask() { local n=$1; shift; nsx "$n" timeout --foreground 10 "$VEIL" "$@" --control "$(sock "$n")"; }
all=$(ask a status --json)
check "(i) status --json holds both networks, a peer up in each" "$all" \
	bash -c "jq -e '.networks.work.peers[0].state == \"up\" and .networks.home.peers[0].state == \"up\"' <<<'$all' >/dev/null"
one=$(ask a status --network home --json)
check "(i) status --network home is home's alone, with its switch" "$one" \
	bash -c "jq -e '.switch != null and .peers[0].state == \"up\" and (.networks == null)' <<<'$one' >/dev/null"
text=$(ask a status)
check "(i) status text names each network" "$text" bash -c "grep -q '^network work' <<<'$text' && grep -q '^network home' <<<'$text'"
health=$(ask a health)
check "(i) health is ok for both" "$health" grep -q '^ok: work: .*; home: ' <<<"$health"
err=$(ask a ping "$(pub b)" -c 1 2>&1)
check "(i) a request of one network without --network is refused" "$err" grep -q 'name one with --network NAME' <<<"$err"
err=$(ask a status --network nope 2>&1)
check "(i) --network of no such network says which exist" "$err" grep -q "no network 'nope' here (networks: work, home)" <<<"$err"
out=$(ask a ping "$(pub b)" --network work -c 1 2>&1)
check "(i) veil ping --network work answers" "$out" grep -q '1 answered' <<<"$out"

# (ii) one scrape for both networks
wait_mgmt a || die "a's management endpoint did not answer"
http a GET 127.0.0.1 "$MGMT_PORT" /metrics "$TMPD/metrics" >/dev/null
m=$(cat "$TMPD/metrics")
check "(ii) veil_peers carries a network label for each" "$(grep '^veil_peers' <<<"$m")" \
	bash -c "grep -q '^veil_peers{network=\"work\",state=\"up\"} 1' '$TMPD/metrics' && grep -q '^veil_peers{network=\"home\",state=\"up\"} 1' '$TMPD/metrics'"
promtool check metrics <"$TMPD/metrics" >"$TMPD/promtool.out" 2>&1
prc=$?
check "(ii) promtool check metrics: no findings" "exit $prc: $(head -c 300 "$TMPD/promtool.out")" test "$prc" = 0
dups=$(grep '^# TYPE' "$TMPD/metrics" | sort | uniq -d)
check "(ii) each family's TYPE appears once" "$dups" test -z "$dups"
unlabelled=$(grep -v '^#' "$TMPD/metrics" | grep -v 'network="' | head -3)
check "(ii) every sample has its network" "$unlabelled" test -z "$unlabelled"
hs=$(http a GET 127.0.0.1 "$MGMT_PORT" /healthz)
check "(ii) /healthz is 200 while both are up" "$hs" test "${hs%% *}" = 200

# (iii) isolation
check "(iii) a -> b's home address through work: no reply" "answered" bash -c "! ip netns exec $NS_a ping -c 2 -W 1 -q -I work $H4_b >/dev/null 2>&1"
check "(iii) b -> a's home address through work: no reply" "answered" bash -c "! ip netns exec $NS_b ping -c 2 -W 1 -q -I work $H4_a >/dev/null 2>&1"
nr=$(ask a status --network work --json | jq -r '.drops.no_route')
check "(iii) a's work counted what it could not route" "no_route=$nr" test "${nr:-0}" -ge 2
nr=$(ask b status --network work --json | jq -r '.drops.no_route')
check "(iii) b's work counted what it could not route" "no_route=$nr" test "${nr:-0}" -ge 2

# c1 is a member of work; it aims at b's home port. c2 is a member of home; it aims at b's work port.
wrong() { # KEY PSK PORT
	node_run c up --key "$TMPD/$1.key" --psk "$TMPD/$2.psk" --listen "0.0.0.0:$PORT" --address 100.64.0.3/24 --tun veil-c \
		--peer "$(pub b)@$UL4_VIA_c:$3" --allow 100.64.0.0/16 --keepalive 1 --control "$(sock c)"
	wait_until 10 bash -c "ip -n $NS_c -o addr show dev veil-c | grep -q 100.64.0.3" || die "c did not come up"
}
unk() { ask b status --network "$1" --json | jq -r '.drops.unknown_peer'; }
u0=$(unk home)
wrong c1 work 51821
sleep 3
check "(iii) work's member c1 gets no session on b's home port" "state $(ask c status --json | jq -r '.peers[0].state')" \
	bash -c "! ip netns exec $NS_c ping -c 1 -W 1 -q 100.64.0.2 >/dev/null 2>&1 && [[ \$(ip netns exec $NS_c $VEIL status --json --control $(sock c) | jq -r '.peers[0].state') != up ]]"
u1=$(unk home)
check "(iii) b's home refused c1's hellos as from an unknown peer" "unknown_peer $u0 -> $u1" test "${u1:-0}" -gt "${u0:-0}"
node_stop c
u0=$(unk work)
wrong c2 home 51820
sleep 3
check "(iii) home's member c2 gets no session on b's work port" "up" \
	bash -c "! ip netns exec $NS_c ping -c 1 -W 1 -q 100.64.0.2 >/dev/null 2>&1 && [[ \$(ip netns exec $NS_c $VEIL status --json --control $(sock c) | jq -r '.peers[0].state') != up ]]"
u1=$(unk work)
check "(iii) b's work refused c2's hellos as from an unknown peer" "unknown_peer $u0 -> $u1" test "${u1:-0}" -gt "${u0:-0}"
node_stop c

# (iv) reloading work leaves home alone
hs_home() { ask a status --network home --json | jq -r '.peers[0].handshakes'; }
h0=$(hs_home)
KA=7 conf a b >"$TMPD/a.toml.new" && mv "$TMPD/a.toml.new" "$TMPD/a.toml"
r=$(ask a reload --network work 2>&1)
check "(iv) reload --network work applies" "$r" grep -q '^ok: reloaded' <<<"$r"
sleep 3
h1=$(hs_home)
check "(iv) home's session is the one it had (handshakes $h0 -> $h1)" "$h0 -> $h1" test "$h0" = "$h1"
check "(iv) home still carries pings" "no reply" ping_within a "$H4_b" 5
r=$(ask a reload 2>&1)
check "(iv) reload of all answers for each" "$r" grep -q '^ok: work: .*; home: ' <<<"$r"

# (v) bad files
one_line_error() { [[ $1 == 2 && $(wc -l <<<"$2") == 1 ]] && grep -q -- "$3" <<<"$2"; }
bad() { # WHAT SED-EXPR EXPECTED
	sed -e "$2" "$TMPD/a.toml" >"$TMPD/bad.toml"
	out=$(nsx a "$VEIL" up --config "$TMPD/bad.toml" --check 2>&1); rc=$?
	check "(v) $1: exit 2, one line" "rc=$rc $out" one_line_error "$rc" "$out" "$3"
}
bad "a repeated interface" 's/^tun = "veil-home"/tun = "work"/' "both use interface work"
bad "a repeated port" 's/51821"$/51820"/' "both listen on port 51820"
bad "an overlapping prefix" "s#$H4_a/24#100.64.0.9/16#" "overlap"
bad "a node-wide key in a network" 's/^mode = "tap"/mode = "tap"\nuser = "nobody"/' "key .user. is the node"
bad "a [[peer]] after a [[network]]" 's/^\[\[network.peer\]\]$/[[peer]]/' "write ..network.peer.. for"
bad "a second network of one name" 's/^name = "home"/name = "work"/' "names another"
cp "$TMPD/a.toml" "$TMPD/a.good"
sed -e 's/51821"$/51820"/' "$TMPD/a.good" >"$TMPD/a.toml"
r=$(ask a reload --network home 2>&1); rc=$?
check "(v) a reload into a repeated port is refused (exit 2), nothing applied" "rc=$rc $r" \
	bash -c "[[ $rc == 2 ]] && grep -q 'both listen on port 51820' <<<\"\$1\"" _ "$r"
cp "$TMPD/a.good" "$TMPD/a.toml"
out=$(nsx a "$VEIL" up --config "$TMPD/a.toml" --tun x --check 2>&1); rc=$?
check "(v) --tun with [[network]] tables: exit 2" "rc=$rc $out" bash -c "[[ $rc == 2 ]] && grep -q 'set tun in the one it belongs to' <<<'$out'"
check "(v) a is still up on both" "no reply" bash -c "ip netns exec $NS_a ping -c 1 -W 2 -q $OL4_b >/dev/null && ip netns exec $NS_a ping -c 1 -W 2 -q $H4_b >/dev/null"

# (vi) one network down, then all
r=$(ask a down --network work 2>&1)
check "(vi) down --network work" "$r" grep -q '^ok' <<<"$r"
check "(vi) work's TUN is gone" "still there" wait_until 5 bash -c "! ip -n $NS_a link show dev work >/dev/null 2>&1"
check "(vi) home still pings" "no reply" ping_within a "$H4_b" 5
h=$(ask a health 2>&1)
check "(vi) health says work no longer answers" "$h" grep -q 'work: error' <<<"$h"
node_stop a
check "(vi) SIGTERM ends the rest with exit 0" "rc=$NODE_RC" test "$NODE_RC" = 0
check "(vi) home's TAP is gone with it" "still there" bash -c "! ip -n $NS_a link show dev veil-home >/dev/null 2>&1"
log=$(cat "${NODE_LOG[a]}")
check "(vi) each network's lines carry its name" "$(head -3 <<<"$log")" \
	bash -c "grep -q 'event=started network=work' <<<'$log' && grep -q 'event=started network=home' <<<'$log'"
finish
