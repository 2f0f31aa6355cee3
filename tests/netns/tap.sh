#!/usr/bin/env bash
# tap.sh -- layer 2 (README "Layer 2: tap and hub"): three nodes with --mode tap, each on a TAP
# device; b forwards between its two links, so every node reaches the other two directly.
#
#   veil-t-$$-a  198.51.100.1  <--- veth --->  198.51.100.2 | 203.0.113.2  <--- veth --->  203.0.113.3  veil-t-$$-c
#   (b: veil-t-$$-b; each TAP holds 100.64.0.N/24 and fd00:64::N/64)
#
#   (i)    TAP devices with MACs from the keys; ARP and IPv6 neighbour discovery, then pings;
#   (ii)   a broadcast from a reaches b and c exactly once; unicast to a learned MAC reaches its
#          node alone; a MAC that moves from behind b to behind c is followed after one frame;
#   (iii)  an 802.1Q-tagged frame arrives tagged;
#   (iv)   a flood of made-up source MACs from b fills b's share of a's table only;
#   (v)    a restarted with --mode hub: its MAC is the same, and unicast now reaches both;
#   (vi)   b and c bridge their TAP with a veth to a LAN host that runs no VPN (c with --bridge):
#          the hosts ping each other and a through the overlay.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

NS_lb=veil-t-$$-lb NS_lc=veil-t-$$-lc
LAN_b=100.64.0.202 LAN_c=100.64.0.203
net_setup
net_add_c b
nsx b sysctl -qw net.ipv4.ip_forward=1
ip -n "$NS_a" route add 203.0.113.0/24 via "$UL4_b" || die "route a -> c's link"
keys_make a b c

start() { # NODE MODE PEER@ENDPOINT...
	local n=$1 mode=$2 args=() p; shift 2
	for p in "$@"; do args+=(--peer "$(pub "${p%%@*}")@${p#*@}:$PORT"); done
	node_run "$n" up --mode "$mode" --key "$TMPD/$n.key" --listen "0.0.0.0:$PORT" --address "$(ol4 "$n")/24" \
		--address "$(ol6 "$n")/64" --tun "$(tun "$n")" --keepalive 5 --control "$(sock "$n")" "${args[@]}" ${EXTRA:-}
}
start a tap "b@$UL4_b" "c@$UL4_c"
start b tap "a@$UL4_a" "c@$UL4_c"
start c tap "a@$UL4_a" "b@$UL4_VIA_c"
wait_ready a b c || die "nodes did not come up"

mac() { ip -n "$(ns "$1")" -j link show dev "${2:-$(tun "$1")}" | jq -r '.[0].address'; }
MAC_a=$(mac a) MAC_b=$(mac b) MAC_c=$(mac c)
link=$(ip -n "$NS_a" -d link show dev "$TUN_a")
check "(i) a's device is a TAP" "$link" grep -q 'tun type tap' <<<"$link"
check "(i) its MAC is locally administered unicast, one per node" "$MAC_a $MAC_b $MAC_c" \
	bash -c "[[ \$(( 0x${MAC_a:0:2} & 3 )) == 2 && $MAC_a != $MAC_b && $MAC_b != $MAC_c ]]"
check "(i) ping a -> b over ARP" "no reply" ping_within a "$OL4_b" 10
check "(i) ping a -> c" "no reply" ping_within a "$OL4_c" 10
check "(i) ping c -> b" "no reply" ping_within c "$OL4_b" 10
check "(i) ping6 a -> b over neighbour discovery" "no reply" ping_within a "$OL6_b" 10
neigh=$(ip -n "$NS_a" neigh show "$OL4_b" dev "$TUN_a")
check "(i) a's ARP entry for b holds b's TAP MAC" "$neigh (b is $MAC_b)" grep -q "lladdr $MAC_b" <<<"$neigh"
drops_bad() { st "$1" '.drops.malformed + .drops.bad_auth + .drops.replayed'; }

# sinks NAME SECONDS NODE... -- l2sink on each NODE's TAP, in the background; sink_wait collects
SINK_PIDS=()
sinks() {
	local name=$1 secs=$2 n; shift 2
	SINK_PIDS=()
	for n in "$@"; do
		rm -f "$TMPD/$name.$n.ready"
		nsx "$n" timeout --foreground $((secs + 5)) python3 "$NETNS_DIR/pkt.py" l2sink "$(tun "$n")" "$secs" "$TMPD/$name.$n.ready" >"$TMPD/$name.$n" 2>&1 &
		SINK_PIDS+=($!)
	done
	for n in "$@"; do wait_until 5 test -e "$TMPD/$name.$n.ready" || die "l2sink on $n did not start"; done
}
sink_wait() { local p; for p in "${SINK_PIDS[@]}"; do wait "$p"; done; }
got() { # NAME NODE TAG -- how many frames with TAG NODE's sink saw
	[[ -e $TMPD/$1.$2 ]] || { echo 0; return; }
	awk -v t="$3" '$1 == t { print $2; f = 1 } END { if (!f) print 0 }' "$TMPD/$1.$2"
}
l2send() { nsx "$1" timeout --foreground 20 python3 "$NETNS_DIR/pkt.py" l2send "$(tun "$1")" "$2" "$3" "$4" "${5:-1}" "${@:6}" >/dev/null; }
BC=ff:ff:ff:ff:ff:ff X=02:aa:00:00:00:01

# (ii) flooding, switching, moves
sinks ii 4 a b c
l2send a "$BC" "$MAC_a" bc1
sleep 0.5
l2send a "$MAC_b" "$MAC_a" uc1
sleep 0.5
l2send b "$BC" "$X" mv1                        # X is behind b
sleep 0.5
l2send a "$X" "$MAC_a" mv2
sleep 0.5
l2send c "$BC" "$X" mv3                        # X now behind c
sleep 0.5
l2send a "$X" "$MAC_a" mv4
sink_wait
seen() { echo "a=$(got "$1" a "$2") b=$(got "$1" b "$2") c=$(got "$1" c "$2")"; }
check "(ii) a broadcast from a reaches b and c exactly once, and not a again" "$(seen ii bc1)" test "$(seen ii bc1)" = "a=0 b=1 c=1"
check "(ii) unicast to b's MAC reaches b alone" "$(seen ii uc1)" test "$(seen ii uc1)" = "a=0 b=1 c=0"
check "(ii) unicast to X behind b reaches b alone" "$(seen ii mv2)" test "$(seen ii mv2)" = "a=0 b=1 c=0"
check "(ii) after one frame from X behind c, unicast to X reaches c alone" "$(seen ii mv4)" test "$(seen ii mv4)" = "a=0 b=0 c=1"
sw=$(st a '.switch')
check "(ii) a's status counts switched frames and the move" "$sw" \
	quiet jq -e '.mode == "tap" and .switched >= 3 and .flooded >= 1 and .moves >= 1' <<<"$sw"
name_b=$(st a ".peers[] | select(.public_key == \"$(pub b)\") | .name")
name_c=$(st a ".peers[] | select(.public_key == \"$(pub c)\") | .name")
check "(ii) a's MAC table: X is c's, b's MAC is b's" "$sw" \
	quiet jq -e --arg x "$X" --arg mb "$MAC_b" --arg b "$name_b" --arg c "$name_c" \
	'(.macs[] | select(.mac == $x) | .peer) == $c and (.macs[] | select(.mac == $mb) | .peer) == $b' <<<"$sw"

# (iii) an 802.1Q-tagged frame (this kernel may have no VLAN devices: the sink reads the tag)
sinks iii 2 b c
l2send a "$BC" "$MAC_a" tagged 1 10
sink_wait
check "(iii) a frame tagged VLAN 10 arrives tagged at b and c" "$(seen iii tagged@vlan10)" test "$(seen iii tagged@vlan10)" = "a=0 b=1 c=1"

# (v) hub
node_stop a
start a hub "b@$UL4_b" "c@$UL4_c"
wait_ready a || die "a did not come back as a hub"
check "(v) a's TAP has the same MAC after the restart" "$(mac a) (was $MAC_a)" test "$(mac a)" = "$MAC_a"
check "(v) ping a -> b" "no reply" ping_within a "$OL4_b" 10
wait_until 10 ping_ok a "$OL4_c" 1 || true
sinks v 2 b c
l2send a "$MAC_b" "$MAC_a" hub1
sink_wait
check "(v) as a hub, a sends unicast for b to b and c" "$(seen v hub1)" test "$(seen v hub1)" = "a=0 b=1 c=1"
check "(v) status says hub" "$(st a '.switch.mode')" test "$(st a '.switch.mode')" = hub

# (vi) bridges with LAN hosts that run no VPN
lan_host() { # NODE HOST-NS ADDRESS [veil]: veil makes its TAP a port of the bridge itself (--bridge)
	local n=$1 h=$2
	NS_ALL+=("$h")
	ip netns add "$h" || die "netns $h"
	ip -n "$h" link set lo up
	ip link add lan0 netns "$(ns "$n")" type veth peer name eth0 netns "$h" || die "lan veth on $n"
	ip -n "$h" addr add "$3/24" dev eth0 && ip -n "$h" link set eth0 up || die "lan host address"
	nsx "$n" ip link add br0 type bridge || die "bridge on $n"
	nsx "$n" ip link set lan0 master br0 || die "bridge port on $n"
	[ "${4:-}" = veil ] || nsx "$n" ip link set "$(tun "$n")" master br0 || die "TAP as a bridge port on $n"
	nsx "$n" ip link set lan0 up && nsx "$n" ip link set br0 up || die "bridge up on $n"
}
lan_host b "$NS_lb" "$LAN_b"
lan_host c "$NS_lc" "$LAN_c" veil
node_stop c
EXTRA="--bridge br0" start c tap "a@$UL4_a" "b@$UL4_VIA_c"
wait_ready c || die "c did not come back with --bridge"
master=$(ip -n "$NS_c" -j link show dev "$TUN_c" | jq -r '.[0].master // "none"')
check "(vi) with --bridge br0, c's TAP is a port of br0" "master $master" test "$master" = br0
check "(vi) c logged bridge_joined" "$(grep -c bridge_joined "${NODE_LOG[c]}") lines" grep -q "event=bridge_joined bridge=br0" "${NODE_LOG[c]}"
lan_ping() { ip netns exec "$1" timeout --foreground 3 ping -c 1 -W 1 -q "$2" >/dev/null 2>&1; }
check "(vi) LAN host behind b pings LAN host behind c" "no reply" wait_until 10 lan_ping "$NS_lb" "$LAN_c"
check "(vi) LAN host behind b pings a" "no reply" wait_until 10 lan_ping "$NS_lb" "$OL4_a"
# (iv) a MAC flood from b
before=$(st a '.drops.mac_not_allowed')
l2send b "$BC" random flood 600
sleep 1
sw=$(st a '.switch')
nb=$(jq --arg b "$name_b" '[.macs[] | select(.peer == $b)] | length' <<<"$sw")
nc=$(jq --arg c "$name_c" '[.macs[] | select(.peer == $c)] | length' <<<"$sw")
after=$(st a '.drops.mac_not_allowed')
check "(iv) b's share of a's table stops at 256 MACs" "b holds $nb" test "$nb" -eq 256
check "(iv) the rest of the flood is dropped as mac_not_allowed" "$before -> $after" test $((after - before)) -ge 340
check "(iv) c keeps its entries" "c holds $nc" test "$nc" -ge 1
check "(iv) a still reaches the LAN host behind c" "no reply" wait_until 5 lan_ping "$NS_a" "$LAN_c"
check "(iv) nothing malformed or forged on a" "$(st a '.drops')" test "$(drops_bad a)" = 0

check "(vi) nothing malformed or forged anywhere" "a $(drops_bad a) b $(drops_bad b) c $(drops_bad c)" \
	test "$(drops_bad a)$(drops_bad b)$(drops_bad c)" = 000
finish
