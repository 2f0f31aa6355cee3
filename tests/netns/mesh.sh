#!/usr/bin/env bash
# mesh.sh -- network membership (--mesh + one network secret): four nodes on one L2 underlay,
# each told about b only (b about nobody), find each other by peer exchange and talk directly;
# subnets are announced with --claim and taken only where --accept allows; an anycast address
# claimed by two nodes fails over by metric and back; an unaccepted default route is refused;
# a member that leaves (SIGTERM) is dropped by the others. Every node: --keepalive 1 (a member
# silent for 3 s is down), --name a|b|c|d.
#
#   (1) line topology: a and c know only b; a lists c as a learned member, up, and pings it
#       directly (c's byte counter for a grows by the pings, b's does not); b lists everyone
#   (2) subnet behind c: c --claim 203.0.113.0/24, a --accept 203.0.113.0/24: a routes it to c
#       (status and kernel) and pings the lan host 203.0.113.10; b (no --accept) does not
#   (4) unauthorised claim: b --claim 0.0.0.0/0 --claim ::/0; a logs claim_refused and has no
#       default route (status or kernel)
#   (3) HA: c (--metric 10) and d (--metric 20) both claim 198.51.100.10/32 (on their lo);
#       a --accept 198.51.100.0/24 routes it to c, c answers; kill -9 c: a routes it to d within
#       10 s and d answers; c restarts (same key, same flags): back to c within 20 s
#   (5) graceful leave: SIGTERM to d: a, b and c mark d down and drop its routes
# (4) runs before (3): it needs no restart. Failover/failback/leave times are printed as notes.
#
#   veil-t-$$-a              veil-t-$$-b          veil-t-$$-c               veil-t-$$-d
#   veil-a 100.64.0.1/24     veil-b 100.64.0.2    veil-c 100.64.0.3         veil-d 100.64.0.4
#          fd00:64::1/64            fd00:64::2           fd00:64::3                fd00:64::4
#   --peer b                 (no --peer)          --peer b                  --peer b
#   --accept 203.0.113.0/24  --claim 0.0.0.0/0    --claim 203.0.113.0/24    --claim 198.51.100.10/32
#   --accept 198.51.100.0/24 --claim ::/0         --claim 198.51.100.10/32  --metric 20
#                                                 --metric 10               lo 198.51.100.10/32
#                                                 lo 198.51.100.10/32
#                                                 ip_forward=1, lan0 203.0.113.1
#                                                        | veth
#                                                 veil-t-$$-lan: veth0 203.0.113.10
#                                                 (route 100.64.0.0/24 via 203.0.113.1)
#   veth0 192.0.2.1          veth0 192.0.2.2      veth0 192.0.2.3           veth0 192.0.2.4
#        |                        |                    |                         |
#   -----+-------- p-a ... p-d in bridge br0 of veil-t-$$-sw (UDP port 51820 everywhere) -----
# shellcheck disable=SC2034  # NS_*, TUN_*, UL4_*, OL*_* are read through ns, tun, ul4, ol4, ol6
# shellcheck disable=SC2317  # predicates are called through wait_until, check and checkd
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

# every node's underlay sits on one bridge in 192.0.2.0/24 (198.51.100.0/24 is the anycast
# range here, 203.0.113.0/24 the lan behind c)
NS_d=veil-t-$$-d TUN_d=veil-d
NS_sw=veil-t-$$-sw NS_lan=veil-t-$$-lan
UL4_a=192.0.2.1 UL4_b=192.0.2.2 UL4_c=192.0.2.3 UL4_d=192.0.2.4
OL4_d=100.64.0.4 OL6_d=fd00:64::4
LAN_NET=203.0.113.0/24 LAN_GW=203.0.113.1 LAN_HOST=203.0.113.10
ANY=198.51.100.10 ANY_NET=198.51.100.0/24
ANY_P=$ANY/32
NOWHERE4=198.51.100.20         # claimed by nobody (only b's refused 0.0.0.0/0 covers it)
NOWHERE6=2001:db8:ffff::1      # likewise for ::/0
LIVENESS_MS=3000               # 3 x --keepalive 1
NS_ALL=()

# ---- topology ---------------------------------------------------------------------------------

# mesh_net -- sw (bridge), a b c d on it, lan behind c, the anycast address on c and d
mesh_net() {
	local n
	ns_add sw
	ip -n "$NS_sw" link add br0 type bridge stp_state 0 || die "bridge in sw"
	ip -n "$NS_sw" link set br0 up || die "bridge up"
	for n in a b c d; do
		ns_add "$n"
		ip link add "$VETH" netns "$(ns $n)" type veth peer name "p-$n" netns "$NS_sw" || die "veth $n <-> sw"
		ip -n "$NS_sw" link set "p-$n" master br0 up || die "p-$n into the bridge"
		ip -n "$(ns $n)" addr add "$(ul4 $n)/24" dev "$VETH" || die "underlay address on $n"
		ip -n "$(ns $n)" link set "$VETH" up || die "veth up in $n"
	done
	ns_add lan
	ip link add lan0 netns "$NS_c" type veth peer name "$VETH" netns "$NS_lan" || die "veth c <-> lan"
	ip -n "$NS_c" addr add "$LAN_GW/24" dev lan0 || die "lan address on c"
	ip -n "$NS_c" link set lan0 up || die "lan0 up in c"
	ip -n "$NS_lan" addr add "$LAN_HOST/24" dev "$VETH" || die "address of the lan host"
	ip -n "$NS_lan" link set "$VETH" up || die "veth up in lan"
	ip -n "$NS_lan" route add 100.64.0.0/24 via "$LAN_GW" || die "lan route to the overlay"
	ip netns exec "$NS_c" sysctl -qw net.ipv4.ip_forward=1 || die "ip_forward on c"
	for n in c d; do
		ip -n "$(ns $n)" addr add "$ANY_P" dev lo || die "anycast address on $n"
	done
	local i dst
	for dst in "$UL4_b" "$UL4_c" "$UL4_d"; do
		for ((i = 0; i < 50; i++)); do
			nsx a timeout --foreground 2 ping -c 1 -W 1 -q "$dst" >/dev/null 2>&1 && break
			sleep 0.1
		done
		((i < 50)) || die "underlay ping a -> $dst failed"
	done
	for ((i = 0; i < 50; i++)); do
		nsx c timeout --foreground 2 ping -c 1 -W 1 -q "$LAN_HOST" >/dev/null 2>&1 && break
		sleep 0.1
	done
	((i < 50)) || die "ping c -> lan host $LAN_HOST failed"
}

# ---- nodes ------------------------------------------------------------------------------------

# mesh_up NODE [EXTRA-FLAGS...] -- veil up --mesh in NODE's namespace (tracked by node_run)
mesh_up() {
	local n=$1; shift
	node_run "$n" up --key "$TMPD/$n.key" --psk "$TMPD/net.psk" --mesh --name "$n" \
		--listen "$(ul4 "$n"):$PORT" --address "$(ol4 "$n")/24" --address "$(ol6 "$n")/64" \
		--tun "$(tun "$n")" --keepalive 1 --control "$(sock "$n")" --mgmt off \
		--log-level "${VEIL_LOG_LEVEL:-info}" "$@"
}
via_b() { echo "$(pub b)@$UL4_b:$PORT"; }
up_a() { mesh_up a --peer "$(via_b)" --accept "$LAN_NET" --accept "$ANY_NET"; }
up_b() { mesh_up b --claim 0.0.0.0/0 --claim ::/0; }
up_c() { mesh_up c --peer "$(via_b)" --claim "$LAN_NET" --claim "$ANY_P" --metric 10; }
up_d() { mesh_up d --peer "$(via_b)" --claim "$ANY_P" --metric 20; }

# ---- observing --------------------------------------------------------------------------------

# pq NODE PEER JQ -- JQ applied to PEER's entry (found by public key) in NODE's status
pq() { st "$1" ".peers[] | select(.public_key == \"$(pub "$2")\") | $3"; }
# best NODE PREFIX -- the peer NODE routes PREFIX to (lowest metric if several are listed)
best() { st "$1" "[.routes[] | select(.prefix == \"$2\")] | min_by(.metric) | .peer // empty"; }
peers_line() { st "$1" '[.peers[] | "\(.name)/\(.source)/\(.state)"] | join(" ")'; }
routes_line() { st "$1" '[.routes[] | "\(.prefix)->\(.peer)(\(.metric),\(.origin))"] | join(" ")'; }

listed() { [[ -n $(pq "$1" "$2" .public_key) ]]; }
learned_up() { [[ $(pq "$1" "$2" '"\(.state)/\(.source)"') == up/learned ]]; }
route_is() { [[ $(best "$1" "$2") == "$3" ]]; }
# no_route NODE PREFIX -- NODE answers and lists no route for PREFIX
no_route() { [[ $(st "$1" "[.routes[] | select(.prefix == \"$2\")] | length") == 0 ]]; }
# left NODE PEER -- NODE no longer has PEER up and routes nothing to PEER's name
left() {
	[[ $(pq "$1" "$2" .state) != up ]] &&
		[[ $(st "$1" "[.routes[] | select(.peer == \"$2\")] | length") == 0 ]]
}
# kroute NODE PREFIX -- NODE's kernel has PREFIX as a route into NODE's TUN
kroute() { ip -n "$(ns "$1")" route show "$2" 2>/dev/null | grep -Eq "dev $(tun "$1")( |$)"; }
# kvia_tun NODE ADDR -- the kernel would send a packet for ADDR into NODE's TUN (a lookup only)
kvia_tun() { ip -n "$(ns "$1")" route get "$2" 2>/dev/null | grep -Eq "dev $(tun "$1")( |$)"; }
# unclaimed_out -- a's kernel sends neither NOWHERE4 nor NOWHERE6 into a's TUN
unclaimed_out() { ! kvia_tun a "$NOWHERE4" && ! kvia_tun a "$NOWHERE6"; }
# logged NODE EVENT PEER -- NODE's current log has EVENT naming PEER (NAME=PEER or its key)
logged() {
	local line key re
	key=$(pub "$3" | tr '+/' '-_')          # a key's default name spells + and / as - and _
	re="[[:space:]][a-z_]+=\"?$3\"?([[:space:]]|\$)"
	while IFS= read -r line; do
		[[ $line =~ $re || $line == *"${key:0:8}"* ]] && return 0
	done < <(grep -E "event=$2( |$)" "${NODE_LOG[$1]}" 2>/dev/null | head -n 200)
	return 1
}
num() { local v=${1:-0}; [[ $v =~ ^[0-9]+$ ]] && echo "$v" || echo 0; }
rxb() { num "$(pq "$1" "$2" .rx_bytes)"; }
tunrx() { num "$(tun_packets "$1" rx)"; }

# gate NAME REASON CMD... -- check, returning CMD's status (check itself always returns 0)
gate() {
	local name=$1 reason=$2; shift 2
	if "$@"; then ok "$name"; return 0; fi
	not_ok "$name" "$reason"
	return 1
}

# checkd NAME CMD... -- like check, but the reason is whatever CMD left in DETAIL
checkd() {
	local name=$1; shift
	DETAIL=''
	if "$@"; then ok "$name"; else not_ok "$name" "$DETAIL"; fi
}

# pings FROM DST COUNT [SIZE] -- COUNT echo requests, 0.2 s apart; prints how many were answered
pings() {
	nsx "$1" timeout --foreground $(($3 + 5)) ping -c "$3" -i 0.2 -W 2 -s "${4:-56}" -q "$2" 2>/dev/null |
		sed -n 's/.* \([0-9]*\) received.*/\1/p'
}

# answered_by NODE OTHER -- 5 pings a -> ANY; ok when at least 4 are answered and NODE's TUN took
# at least that many requests and OTHER's fewer (requests reach the TUN of the node that answers)
answered_by() {
	local n0 o0 got
	n0=$(tunrx "$1") o0=$(tunrx "$2")
	got=$(num "$(pings a "$ANY" 5)")
	DETAIL="$got/5 answered; TUN rx: $1 +$(($(tunrx "$1") - n0)), $2 +$(($(tunrx "$2") - o0))"
	((got >= 4 && $(tunrx "$1") - n0 >= got && $(tunrx "$2") - o0 < got))
}

# steady -- no peer_down in any node's log so far (DETAIL: how many, and the first)
steady() {
	local n lines=''
	for n in a b c d; do
		lines+=$(grep -h 'event=peer_down' "${NODE_LOG[$n]}" 2>/dev/null | sed "s/^/$n: /")$'\n'
	done
	lines=$(grep . <<<"$lines")
	DETAIL="$(grep -c . <<<"$lines") peer_down lines, first: $(head -n 1 <<<"$lines")"
	[[ -z $lines ]]
}

# ---- setup ------------------------------------------------------------------------------------

net_begin
mesh_net
keys_make a b c d
psk_make net
up_b
wait_ready b
up_a
up_c
up_d
wait_ready a c d

# ---- (1) line topology: members learned through b, reached directly ---------------------------

if wait_until 15 listed a c; then
	ok "a learns c through b (a has only --peer b)"
	note "a listed c after ${WAITED_MS} ms"
else
	not_ok "a learns c through b (a has only --peer b)" "not listed after 15 s; a's peers: $(peers_line a)"
	note "skipping the rest: nothing else can work without membership"
	finish
fi
# a and c know each other only through b: one of them learned the other by exchange (the other
# may first meet it in its handshake, which logs no member_learned)
learned_by_exchange() { logged a member_learned c || logged c member_learned a; }
check "a or c logs member_learned for the other" "no such line in a's or c's log within 3 s" \
	wait_until 3 learned_by_exchange
reached=0
ping_within a "$OL4_c" 10 && reached=1
check "ping a -> c (100.64.0.3)" "no reply within ${WAITED_MS} ms" test "$reached" -eq 1
wait_until 5 learned_up a c
check "a's peer c is up, source learned" "a's peers: $(peers_line a)" learned_up a c
check "a's peer c has c's announced name" "name '$(pq a c .name)'" test "$(pq a c .name)" = c
# The first handshake may go through b (relay first, then punch): the first punch round moves the
# pair to the direct path, so a waits a bounded time for it.
at_own_address() { [[ "$(pq a c .endpoint)" == "$UL4_c:$PORT" ]]; }
wait_until 3 at_own_address
ep=$(pq a c .endpoint)
check "a reaches c at c's own underlay address" "endpoint '$ep' after ${WAITED_MS} ms" test "$ep" = "$UL4_c:$PORT"
note "a's endpoint for c was c's own after ${WAITED_MS} ms"
check "a's peer b is static (--peer)" "source '$(pq a b .source)'" test "$(pq a b .source)" = static
wait_until 5 learned_up c a
check "c lists a as up, source learned" "c's peers: $(peers_line c)" learned_up c a
b_all() { learned_up b a && learned_up b c && learned_up b d; }
wait_until 5 b_all
check "b (no --peer) lists a, c and d as learned members, up" "b's peers: $(peers_line b)" b_all
check "ping a -> c over IPv6 (fd00:64::3)" "no reply within 5 s" ping_ok a "$OL6_c"

# direct: 10 x 1200-byte echo requests must show up in c's count of bytes from a, not in b's
c0=$(rxb c a) b0=$(rxb b a)
got=$(num "$(pings a "$OL4_c" 10 1200)")
dc=$(($(rxb c a) - c0)) db=$(($(rxb b a) - b0))
check "a -> c traffic goes direct, not through b" \
	"$got/10 answered; rx_bytes from a grew by $dc at c, by $db at b" \
	test "$got" -ge 9 -a "$dc" -ge 10000 -a "$db" -lt 5000
note "10 x 1200-byte pings a -> c: rx_bytes from a +$dc at c, +$db at b"

# ---- (2) a subnet behind c ----------------------------------------------------------------------

wait_until 10 route_is a "$LAN_NET" c
check "a routes $LAN_NET (c's claim, a's --accept) to c" "a's routes: $(routes_line a)" route_is a "$LAN_NET" c
origin=$(st a ".routes[] | select(.prefix == \"$LAN_NET\") | .origin")
check "its origin is claim" "origin '$origin'" test "$origin" = claim
wait_until 5 kroute a "$LAN_NET"
check "a's kernel routes $LAN_NET into $TUN_a" "$(ip -n "$NS_a" route show "$LAN_NET")" kroute a "$LAN_NET"
reached=0
ping_within a "$LAN_HOST" 5 && reached=1
check "ping a -> lan host $LAN_HOST behind c" "no reply within ${WAITED_MS} ms" test "$reached" -eq 1
check "b (no --accept) does not take c's $LAN_NET" "b's routes: $(routes_line b)" no_route b "$LAN_NET"
check "b's kernel has no route for $LAN_NET into $TUN_b" "$(ip -n "$NS_b" route show "$LAN_NET")" \
	bash -c "! ip -n $NS_b route show $LAN_NET | grep -q ."

# ---- (4) an unauthorised claim: b announces the default route -----------------------------------

check "a logs claim_refused for b's 0.0.0.0/0" "no such line within 10 s" \
	wait_log a 'event=claim_refused .*prefix="?0\.0\.0\.0/0' 10
defaults=$(st a '[.routes[] | select(.prefix == "0.0.0.0/0" or .prefix == "::/0")] | length')
check "a's routes have neither 0.0.0.0/0 nor ::/0" "a's routes: $(routes_line a)" test "$defaults" = 0
kdef="$(ip -n "$NS_a" route show default) $(ip -n "$NS_a" -6 route show default)"
check "a's kernel has no default route" "default routes: $kdef" test "$kdef" = " "
check "a's kernel sends nothing unclaimed into $TUN_a ($NOWHERE4, $NOWHERE6)" \
	"$(ip -n "$NS_a" route get "$NOWHERE4" 2>&1) / $(ip -n "$NS_a" route get "$NOWHERE6" 2>&1)" \
	unclaimed_out

# ---- (3) HA: anycast 198.51.100.10 on c (metric 10) and d (metric 20) ---------------------------

ha() {
	wait_until 10 route_is a "$ANY_P" c
	if ! gate "a routes $ANY_P to c (metric 10 beats d's 20)" "a's routes: $(routes_line a)" route_is a "$ANY_P" c; then
		note "skipping failover: no route to c to begin with"
		return
	fi
	d_has() { [[ $(pq a d ".claims[]? | select(.prefix == \"$ANY_P\") | .metric") == 20 ]]; }
	wait_until 5 d_has
	check "a knows d's standby claim ($ANY_P, metric 20)" "d's claims at a: $(pq a d '.claims' | tr -d ' \n')" d_has
	check "a's kernel sends $ANY into $TUN_a" "$(ip -n "$NS_a" route get "$ANY" 2>&1)" kvia_tun a "$ANY"
	checkd "ping a -> $ANY is answered by c" answered_by c d
	# everyone has run for a while with --keepalive 1: nobody may have been taken for down
	checkd "no member was marked down while all were running (no flapping)" steady

	local t0 fo fo_ping fb
	t0=$(now_ms)
	kill -KILL "${NODE_PID[c]}"
	wait "${NODE_PID[c]}" 2>/dev/null
	unset "NODE_PID[c]"
	wait_until 10 route_is a "$ANY_P" d
	fo=$(($(now_ms) - t0))
	fo_ping=-1
	if gate "after kill -9 of c, a routes $ANY_P to d within 10 s" "after ${fo} ms a's routes: $(routes_line a)" \
		route_is a "$ANY_P" d; then
		reached=0
		ping_within a "$ANY" 10 && reached=1
		fo_ping=$(($(now_ms) - t0))
		check "ping a -> $ANY works again" "no reply within ${WAITED_MS} ms" test "$reached" -eq 1
		checkd "... and is answered by d" answered_by d c
	else
		fo=-1
		note "no failover: the pings to $ANY through d are not tried"
	fi
	check "a marks c down" "c at a: $(pq a c '"\(.state)/\(.source)"')" test "$(pq a c .state)" != up
	wait_until 5 no_route a "$LAN_NET"
	check "a withdraws c's other claim $LAN_NET" "a's routes: $(routes_line a)" no_route a "$LAN_NET"

	t0=$(now_ms)
	up_c
	wait_ready c
	wait_until 20 route_is a "$ANY_P" c
	fb=$(($(now_ms) - t0))
	if ! gate "c restarted (same key and flags): a routes $ANY_P back to c within 20 s" \
		"after ${fb} ms a's routes: $(routes_line a)" route_is a "$ANY_P" c; then
		fb=-1
	fi
	checkd "ping a -> $ANY is answered by c again" answered_by c d
	wait_until 5 route_is a "$LAN_NET" c
	reached=0
	ping_within a "$LAN_HOST" 5 && reached=1
	check "the lan behind c is reachable again" "no reply; a's routes: $(routes_line a)" test "$reached" -eq 1
	((fo >= 0)) && note "failover (kill -9 c): route -> d after ${fo} ms, ping answered ${fo_ping} ms after the kill" \
		"(liveness timeout ${LIVENESS_MS} ms)"
	((fb >= 0)) && note "failback (c restarted): route -> c ${fb} ms after veil up (TUN ready, handshakes, claims)"
}
ha

# ---- (5) graceful leave: SIGTERM to d ---------------------------------------------------------

leave() {
	d_up_all() { learned_up a d && learned_up b d && learned_up c d; }
	wait_until 10 d_up_all
	if ! gate "before the leave a, b and c have d up" \
		"a: $(peers_line a) | b: $(peers_line b) | c: $(peers_line c)" d_up_all; then
		return
	fi
	note "a's routes to d before the leave: $(st a '[.routes[] | select(.peer == "d") | .prefix] | join(" ")')"
	local pid=${NODE_PID[d]} t0 n t
	local -A seen=()
	t0=$(now_ms)
	kill -TERM "$pid"
	# one bounded wait for all three observers; each one's time is when it was first seen done
	while (($(now_ms) - t0 < 10000)) && ((${#seen[@]} < 3)); do
		for n in a b c; do
			[[ -z ${seen[$n]:-} ]] && left "$n" d && seen[$n]=$(($(now_ms) - t0))
		done
		sleep 0.1
	done
	local times=''
	for n in a b c; do
		if [[ -n ${seen[$n]:-} ]]; then
			ok "$n marks d down and drops its routes after d's SIGTERM"
			times+=" $n ${seen[$n]} ms,"
		else
			not_ok "$n marks d down and drops its routes after d's SIGTERM" \
				"not after 10 s: d at $n: $(pq "$n" d '"\(.state)/\(.source)"'), routes: $(routes_line "$n")"
			times+=" $n not within 10 s,"
		fi
	done
	note "graceful leave seen by:${times%,} (liveness timeout would be ${LIVENESS_MS} ms)"
	check "a logs peer_down for d" "no such line within 3 s" wait_until 3 logged a peer_down d
	if node_exited d "$t0" 3000; then
		check "d exits after SIGTERM, status 0" "exit status $NODE_RC" test "$NODE_RC" -eq 0
	else
		not_ok "d exits after SIGTERM" "still running $EXIT_MS ms after it"
		node_stop d
	fi
	check "a still routes $ANY_P to c" "a's routes: $(routes_line a)" route_is a "$ANY_P" c
}
leave
finish
