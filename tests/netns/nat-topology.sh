# nat-topology.sh -- sourced by tests/netns/nat.sh and tests/bench/nat.sh (after lib.sh): the NAT
# topology both build, and the nodes on it.
#
#   veil-t-$$-a          veil-t-$$-r1                 veil-t-$$-in (core)    veil-t-$$-r2          veil-t-$$-c
#   veth0 198.51.100.2 - lan0 198.51.100.1            i1 192.0.2.1           lan0 203.0.113.1 - veth0 203.0.113.2
#                        wan0 192.0.2.2/26 ---------- i1                    wan0 192.0.2.66/26
#                                                     i2 192.0.2.65 -------- wan0
#                                                     i3 192.0.2.129 ------- veth0 192.0.2.130 veil-t-$$-b
# The core router is one hop between the NATs: a datagram with TTL 2 from a dies there.
# shellcheck shell=bash
# shellcheck disable=SC2034  # NS_*, UL4_* are read through ns and ul4
# shellcheck disable=SC2154  # NS_a, NS_b, NS_c, VETH, PORT, TMPD and the helpers come from lib.sh

NS_r1=veil-t-$$-r1 NS_r2=veil-t-$$-r2 NS_in=veil-t-$$-in
UL4_a=198.51.100.2 UL4_b=192.0.2.130 UL4_c=203.0.113.2
NS_ALL=() EXTRA_PIDS=()

# link NS1 IF1 NS2 IF2 -- a veth between two namespaces, both ends up
link() {
	ip link add "$2" netns "$(ns "$1")" type veth peer name "$4" netns "$(ns "$3")" || die "veth $1/$2 <-> $3/$4"
	ip -n "$(ns "$1")" link set "$2" up && ip -n "$(ns "$3")" link set "$4" up || die "link up $1 $3"
}
addr() { ip -n "$(ns "$1")" addr add "$3" dev "$2" || die "address $3 on $1"; }

# router NAME NAT FILTER -- nftables on a router: masquerade out of wan0 (NAT: cone keeps the
# source port where it can, random picks a fresh one per mapping), and FILTER drop refuses WAN
# input that no conntrack entry expects (OpenWrt's default), accept lets it in (a bare box)
router() {
	local how='masquerade' input=''
	[[ $2 == random ]] && how='masquerade random,fully-random'
	[[ $3 == drop ]] && input='iifname "wan0" ct state established,related accept
		iifname "wan0" drop'
	nsx "$1" nft -f - <<-EOF || die "nft rules on $1"
		table ip nat {
			chain post { type nat hook postrouting priority srcnat; oifname "wan0" $how; }
		}
		table ip filter {
			chain input { type filter hook input priority 0; policy accept
				$input
			}
			chain forward { type filter hook forward priority 0; policy accept
				$input
			}
		}
	EOF
	nsx "$1" sysctl -qw net.ipv4.ip_forward=1 || die "ip_forward on $1"
}

# topology NAT1 NAT2 FILTER -- every namespace of the picture above, fresh
topology() {
	local n
	for n in a b c r1 r2 in; do ns_add "$n"; done
	link in i1 r1 wan0; link in i2 r2 wan0; link in i3 b "$VETH"
	link r1 lan0 a "$VETH"; link r2 lan0 c "$VETH"
	addr in i1 192.0.2.1/26; addr in i2 192.0.2.65/26; addr in i3 192.0.2.129/26
	addr r1 wan0 192.0.2.2/26; addr r1 lan0 198.51.100.1/24; addr a "$VETH" "$UL4_a/24"
	addr r2 wan0 192.0.2.66/26; addr r2 lan0 203.0.113.1/24; addr c "$VETH" "$UL4_c/24"
	addr b "$VETH" "$UL4_b/26"
	nsx in sysctl -qw net.ipv4.ip_forward=1 || die "ip_forward on the core"
	ip -n "$NS_r1" route add default via 192.0.2.1 || die "r1 default route"
	ip -n "$NS_r2" route add default via 192.0.2.65 || die "r2 default route"
	ip -n "$NS_b" route add default via 192.0.2.129 || die "b default route"
	ip -n "$NS_a" route add default via 198.51.100.1 || die "a default route"
	ip -n "$NS_c" route add default via 203.0.113.1 || die "c default route"
	router r1 "$1" "$3"
	router r2 "$2" "$3"
	local i
	for n in a c; do
		for ((i = 0; i < 50; i++)); do
			nsx "$n" timeout --foreground 2 ping -c 1 -W 1 -q "$UL4_b" >/dev/null 2>&1 && break
			sleep 0.1
		done
		((i < 50)) || die "underlay ping $n -> b failed"
	done
}

teardown() {
	local n pid
	for n in a b c; do node_stop "$n" >/dev/null 2>&1; done
	for pid in "${EXTRA_PIDS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
	EXTRA_PIDS=()
	for n in "${NS_ALL[@]}"; do
		for pid in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
		ip netns del "$n" 2>/dev/null
	done
	NS_ALL=()
}

mesh_up() {
	local n=$1; shift
	node_run "$n" up --key "$TMPD/$n.key" --psk "$TMPD/net.psk" --mesh --name "$n" \
		--listen "0.0.0.0:$PORT" --address "$(ol4 "$n")/24" --address "$(ol6 "$n")/64" \
		--tun "$(tun "$n")" --keepalive 1 --control "$(sock "$n")" --mgmt off \
		--log-level "${VEIL_LOG_LEVEL:-info}" "$@"
}
via_b() { echo "$(pub b)@$UL4_b:$PORT"; }

pq() { st "$1" ".peers[] | select(.public_key == \"$(pub "$2")\") | $3"; }
up_path() { [[ $(pq "$1" "$2" '"\(.state) \(.path)"') == "up $3" ]]; }
