#!/usr/bin/env bash
# nat.sh [CASE...] -- members behind real Linux NAT routers (nftables masquerade) reach each other.
# a and c each know only b (public) and learn each other through b. Per case the whole topology
# is built fresh (no conntrack state carries over), three nodes start with --mesh --keepalive 1,
# and the case checks the path c shows in a's status (and a in c's) and that pings flow both ways.
#
#   case            routers (r1 in front of a, r2 in front of c)              path expected
#   cone-drop       both port-preserving, unsolicited WAN input dropped      direct
#   cone-accept     both port-preserving, WAN input accepted (a bare box)    direct
#   sym1-drop       r1 fully random, r2 port-preserving, input dropped        relay:b
#   sym1-accept     the same, input accepted                                  relay:b
#   sym2-drop       both fully random, dropped                                relay:b
#   sym2-accept     both fully random, accepted                               relay:b
#   bkill           cone-drop, then b is killed (SIGKILL): a <-> c stays up, direct
#   cut             cone-drop, then the core drops r1 <-> r2: a <-> c falls back to relay:b;
#                   the cut healed, punching brings it back to direct
#   norelay         sym2-drop with --no-relay on b: no path; a lists c, not up
#   state           cone-accept, a with --state: a stops (writing the members it learned), b is
#                   killed, a starts again knowing only b, and reaches c from its state file
#   beacon          cone-accept; b stores beacons through a command (|tee FILE), a knows no peer at
#                   all and loads them from FILE: a finds b from its beacon, and c through b
#   tcp             cone-drop, but r1 drops every UDP datagram from its LAN: a reaches b over TCP
#                   (b --listen-tcp 443, a --peer-tcp), and c through b as a relay over that link
#   map-pcp         sym1-drop, and r1 runs miniupnpd: a maps its port with PCP, NAT-PMP or UPnP IGD
#   map-natpmp      (VEIL_PORTMAP narrows a to that protocol; map-upnp leaves the default order and
#   map-upnp        r1 serves only UPnP), announces 192.0.2.2:51820, and c reaches it there: direct,
#                   where sym1 needs the relay. When a stops, the mapping is gone from r1.
# With Linux conntrack every mapping filters by address and port, so a fully random NAT facing
# anything cannot be punched without predicting its ports: those cases expect the relay.
# Times to the first overlay ping and to the direct path are printed as notes.
# The topology (tests/netns/nat-topology.sh draws it): a behind r1, c behind r2, b public, one
# core router between them.
# shellcheck disable=SC2034  # NS_*, TUN_*, UL4_*, OL*_* are read through ns, tun, ul4, ol4, ol6
# shellcheck disable=SC2317  # predicates are called through wait_until and check
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

# shellcheck source=nat-topology.sh
source "$(dirname "$0")/nat-topology.sh"
OL4_c=100.64.0.3 OL6_c=fd00:64::3 TUN_c=veil-c
CASES=(cone-drop cone-accept sym1-drop sym1-accept sym2-drop sym2-accept bkill cut state beacon tcp norelay map-pcp map-natpmp map-upnp)

# miniupnpd PROTOCOL -- r1 (cone-drop so far) becomes a UPnP/NAT-PMP/PCP gateway: the chains
# miniupnpd fills (it creates none) are jumped to before WAN traffic is dropped; a STUN responder
# on the core lets it believe 192.0.2.2 is public; it serves NAT-PMP+PCP (one switch) or UPnP.
miniupnpd_on() {
	local natpmp=yes upnp=no conf=$TMPD/miniupnpd.conf
	[[ $1 == upnp ]] && natpmp=no upnp=yes
	nsx r1 nft -f - <<-EOF || die "nft rules for miniupnpd on r1"
		flush ruleset
		table inet filter {
			chain input { type filter hook input priority 0; policy accept
				iifname "wan0" ct state established,related accept
				iifname "wan0" drop
			}
			chain forward { type filter hook forward priority 0; policy accept
				iifname "wan0" ct state established,related accept
				iifname "wan0" jump miniupnpd
				iifname "wan0" drop
			}
			chain miniupnpd { }
		}
		table inet nat {
			chain prerouting { type nat hook prerouting priority dstnat; policy accept
				iifname "wan0" jump prerouting_miniupnpd
			}
			chain postrouting { type nat hook postrouting priority srcnat; policy accept
				jump postrouting_miniupnpd
				ip saddr 198.51.100.0/24 oifname "wan0" masquerade random,fully-random   # not its own STUN probes
			}
			chain prerouting_miniupnpd { }
			chain postrouting_miniupnpd { }
		}
	EOF
	cat >"$conf" <<-EOF
		ext_ifname=wan0
		listening_ip=lan0
		http_port=5000
		ipv6_disable=yes
		enable_natpmp=$natpmp
		enable_upnp=$upnp
		secure_mode=yes
		system_uptime=no
		uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
		lease_file=$TMPD/upnp.leases
		upnp_table_name=filter
		upnp_nat_table_name=nat
		upnp_forward_chain=miniupnpd
		upnp_nat_chain=prerouting_miniupnpd
		upnp_nat_postrouting_chain=postrouting_miniupnpd
		ext_perform_stun=yes
		ext_stun_host=192.0.2.1
		ext_stun_port=3478
		allow 1024-65535 198.51.100.0/24 1024-65535
		deny 0-65535 0.0.0.0/0 0-65535
	EOF
	# not through nsx: $! must be the daemon itself (ip netns exec execs it), not a subshell
	ip netns exec "$NS_in" python3 "$(dirname "$0")/stun.py" 192.0.2.1 3478 >/dev/null 2>&1 &
	EXTRA_PIDS+=($!)
	sleep 0.3
	ip netns exec "$NS_r1" miniupnpd -d -f "$conf" -P "$TMPD/miniupnpd.pid" >"$TMPD/miniupnpd.log" 2>&1 &
	EXTRA_PIDS+=($!)
	local i
	for ((i = 0; i < 50; i++)); do
		grep -q "Port forwarding is now enabled" "$TMPD/miniupnpd.log" && return 0
		sleep 0.1
	done
	die "miniupnpd did not enable port forwarding: $(tail -5 "$TMPD/miniupnpd.log")"
}
r1_mappings() { nsx r1 nft list chain inet nat prerouting_miniupnpd 2>/dev/null | grep -c 'dnat'; }

pings_both() { ping_ok a "$OL4_c" 2 && ping_ok c "$OL4_a" 2; }
# pings_all FROM DST N -- N pings 0.2 s apart, all answered
pings_all() {
	local got
	got=$(nsx "$1" timeout --foreground 20 ping -c "$3" -i 0.2 -W 2 -q "$2" 2>/dev/null | awk '/received/ { print $4 }')
	[[ $got == "$3" ]]
}

# run_case NAME -- one row of the table above
run_case() {
	local name=$1 nat1=cone nat2=cone filter=drop want=direct brelay=()
	case $name in
		cone-drop | bkill | cut) ;;
		cone-accept) filter=accept ;;
		state | beacon) filter=accept ;;
		sym1-*) nat1=random filter=${name#sym1-} want=relay:b ;;
		sym2-*) nat1=random nat2=random filter=${name#sym2-} want=relay:b ;;
		norelay) nat1=random nat2=random want=none brelay=(--no-relay) ;;
		map-*) ;;
		tcp) want=relay:b ;;
		*) not_ok "$name" "no such case"; return ;;
	esac
	topology "$nat1" "$nat2" "$filter"
	local proto=${name#map-}
	[[ $name == map-* ]] && { miniupnpd_on "$proto"; [[ $proto == natpmp ]] && proto=nat-pmp; }
	local btcp=() atcp=()
	if [[ $name == tcp ]]; then
		nsx r1 nft -f - <<-EOF || die "nft UDP block on r1"
			table ip udpblock {
				chain forward { type filter hook forward priority -10; policy accept
					iifname "lan0" meta l4proto udp drop
				}
			}
		EOF
		btcp=(--listen-tcp 0.0.0.0:443) atcp=(--peer-tcp "$UL4_b:443")
	fi
	[[ $name == beacon ]] && btcp=(--beacon-store "|/usr/bin/tee $TMPD/beacons")
	mesh_up b "${brelay[@]}" "${btcp[@]}"
	wait_ready b
	local t0
	t0=$(now_ms)
	if [[ $name == map-* && $proto != upnp ]]; then
		VEIL_PORTMAP=$proto mesh_up a --peer "$(via_b)"
	elif [[ $name == state ]]; then
		mesh_up a --peer "$(via_b)" --state "$TMPD/a.state"
	elif [[ $name != beacon ]]; then
		mesh_up a --peer "$(via_b)" "${atcp[@]}"
	fi
	if [[ $name == beacon ]]; then
		check "$name: b stored a sealed beacon" "$(cat "$TMPD/beacons" 2>&1)" wait_until 15 grep -q '^veil-beacon1 ' "$TMPD/beacons"
		t0=$(now_ms)
		mesh_up a --beacon-load "$TMPD/beacons"
		check "$name: a loaded b from the beacon" "$(grep beacon "${NODE_LOG[a]}")" wait_until 15 grep -q 'event=beacons_loaded .* members=1 ignored=0' "${NODE_LOG[a]}"
		check "$name: a reaches b, which it knew only from the beacon" "a sees b as: $(pq a b '"\(.state) \(.source)"')" wait_until 10 up_path a b direct
	fi
	mesh_up c --peer "$(via_b)"
	wait_ready a c
	if [[ $name == map-* ]]; then
		if wait_until 10 test "$(st a '.port_mapping.protocol')" == "$proto"; then
			ok "$name: a mapped its port with $proto after $(($(now_ms) - t0)) ms: $(st a '.port_mapping|tojson')"
		else
			not_ok "$name: a maps its port with $proto" "a: $(st a '.port_mapping|tojson'); miniupnpd: $(tail -3 "$TMPD/miniupnpd.log")"
		fi
		check "$name: the mapping is 192.0.2.2:51820, announced first" "a: $(st a '"\(.port_mapping.external) \(.mesh.endpoints[0])"')" \
			test "$(st a '"\(.port_mapping.external) \(.mesh.endpoints[0])"')" == "192.0.2.2:$PORT 192.0.2.2:$PORT"
		check "$name: r1 forwards it (one miniupnpd rule)" "r1: $(r1_mappings) rules" test "$(r1_mappings)" == 1
		local nc
		nc=$(nsx a "$VEIL" netcheck --control "$(sock a)" 2>&1)
		check "$name: veil netcheck names the mapping" "$nc" grep -q "^port mapping: $proto 192.0.2.2:$PORT via 198.51.100.1" <<<"$nc"
	fi
	if [[ $want == none ]]; then
		wait_until 10 quiet pq a c .public_key
		sleep 4
		check "$name: a lists c, not up (no relay, no punchable path)" "a: $(pq a c '"\(.state) \(.path)"')" \
			test "$(pq a c .state)" != up
		check "$name: b offers no relay and carried nothing" "b: $(st b ".relay|tojson")" \
			test "$(st b '"\(.relay.offered) \(.relay.bytes)"')" == "false 0"
		teardown
		return
	fi
	if [[ $name == tcp ]]; then
		check "$name: a reaches b over TCP" "a sees b as: $(pq a b '"\(.state) \(.path) \(.endpoint)"')" wait_until 15 up_path a b tcp
		check "$name: b sees a on its TCP link" "b: $(st b '.tcp|tojson')" test "$(st b '.tcp.connections')" == 1
	fi
	if wait_until 15 pings_both; then
		ok "$name: first overlay ping both ways after $(($(now_ms) - t0)) ms"
	else
		not_ok "$name: pings a <-> c" "no answer within 15 s (a sees c: $(pq a c '"\(.state) \(.path)"'))"
	fi
	if wait_until 15 up_path a c "$want"; then
		note "$name: a's path to c is $want after $(($(now_ms) - t0)) ms"
		ok "$name: a reaches c by $want"
	else
		not_ok "$name: a reaches c by $want" "a sees c as: $(pq a c '"\(.state) \(.path) \(.endpoint)"')"
	fi
	check "$name: c reaches a by ${want/relay:b/relay:b}" "c sees a as: $(pq c a '"\(.state) \(.path) \(.endpoint)"')" \
		wait_until 10 up_path c a "$want"
	if [[ $name == map-* ]]; then
		check "$name: c hears a at the mapped endpoint" "c sees a at $(pq c a .endpoint)" test "$(pq c a .endpoint)" == "192.0.2.2:$PORT"
	fi
	local vping
	vping=$(nsx a "$VEIL" ping c -c 2 --control "$(sock a)" 2>&1)
	check "$name: veil ping c shows path=${want/relay:b/relay:b}" "$vping" grep -q "^pong from c path=$want endpoint=" <<<"$vping"
	check "$name: 20 pings a -> c all answered" "lost some" pings_all a "$OL4_c" 20
	check "$name: 20 pings c -> a all answered" "lost some" pings_all c "$OL4_a" 20
	if [[ $want == relay:b ]]; then
		check "$name: b counts the relayed pair and bytes" "b: $(st b ".relay|tojson")" \
			test "$(st b '.relay.bytes')" -gt 0
	fi
	if [[ $name == bkill ]]; then
		kill -KILL "${NODE_PID[b]}" 2>/dev/null
		wait "${NODE_PID[b]}" 2>/dev/null
		unset "NODE_PID[b]"
		sleep 5                                              # past a's and c's liveness for b (3 s)
		check "$name: b is down at a" "a sees b: $(pq a b .state)" test "$(pq a b .state)" != up
		check "$name: a -> c still direct after b died" "a sees c: $(pq a c '"\(.state) \(.path)"')" up_path a c direct
		check "$name: 20 pings a -> c after b died" "lost some" pings_all a "$OL4_c" 20
	fi
	if [[ $name == map-* ]]; then
		node_stop a >/dev/null
		check "$name: a deleted its mapping on exit" "r1 still has $(r1_mappings) rules" test "$(r1_mappings)" == 0
		check "$name: a logged the unmapping" "$(tail -4 "${NODE_LOG[a]}")" grep -q "event=port_unmapped protocol=$proto" "${NODE_LOG[a]}"
	fi
	if [[ $name == state ]]; then
		node_stop a >/dev/null
		check "$name: a wrote its state file (0600) naming c" "$(cat "$TMPD/a.state" 2>&1)" \
			test "$(stat -c %a "$TMPD/a.state" 2>/dev/null)" == 600 -a -n "$(grep "^member $(pub c) c " "$TMPD/a.state")"
		kill -KILL "${NODE_PID[b]}" 2>/dev/null
		wait "${NODE_PID[b]}" 2>/dev/null
		unset "NODE_PID[b]"
		t0=$(now_ms)
		mesh_up a --peer "$(via_b)" --state "$TMPD/a.state"
		wait_ready a
		check "$name: a loaded c from the state file" "$(grep state_ "${NODE_LOG[a]}")" grep -q "event=state_loaded .* members=1" "${NODE_LOG[a]}"
		if wait_until 20 up_path a c direct; then
			ok "$name: a reaches c again without b, $(($(now_ms) - t0)) ms after its restart"
		else
			not_ok "$name: a reaches c again without b" "a sees c as: $(pq a c '"\(.state) \(.path) \(.endpoint)"')"
		fi
		check "$name: 20 pings c -> a after the restart" "lost some" pings_all c "$OL4_a" 20
	fi
	if [[ $name == cut ]]; then
		nsx in nft -f - <<-EOF || die "nft cut on the core"
			table ip cut {
				chain forward { type filter hook forward priority 0; policy accept
					ip saddr 192.0.2.0/26 ip daddr 192.0.2.64/26 drop
					ip saddr 192.0.2.64/26 ip daddr 192.0.2.0/26 drop
				}
			}
		EOF
		t0=$(now_ms)
		if wait_until 20 up_path a c relay:b; then
			ok "$name: a falls back to relay:b after $(($(now_ms) - t0)) ms"
		else
			not_ok "$name: a falls back to relay:b" "a sees c as: $(pq a c '"\(.state) \(.path)"')"
		fi
		check "$name: c falls back to relay:b" "c sees a as: $(pq c a '"\(.state) \(.path)"')" wait_until 10 up_path c a relay:b
		check "$name: 20 pings a -> c over the relay" "lost some" pings_all a "$OL4_c" 20
		nsx in nft delete table ip cut || die "nft uncut"
		t0=$(now_ms)
		if wait_until 40 up_path a c direct; then
			ok "$name: back to direct $(($(now_ms) - t0)) ms after the cut healed"
		else
			not_ok "$name: back to direct after the cut healed" "a sees c as: $(pq a c '"\(.state) \(.path)"')"
		fi
		check "$name: 20 pings c -> a direct again" "lost some" pings_all c "$OL4_a" 20
	fi
	teardown
}

net_begin
command -v nft >/dev/null || die "missing command nft (make deps)"
command -v miniupnpd >/dev/null || die "missing command miniupnpd (make deps)"
keys_make a b c
psk_make net
cases=("$@")
((${#cases[@]})) || cases=("${CASES[@]}")
for c in "${cases[@]}"; do run_case "$c"; done
finish
