#!/usr/bin/env bash
# demo.sh -- a two-node Veil network in two namespaces: ping (IPv4, IPv6), a 3 s iperf3
# and both nodes' `veil status`; everything is removed at the end.
#
#   veil-t-$$-a                                   veil-t-$$-b
#   veil-a 100.64.0.1/24 fd00:64::1/64  ======>  veil-b 100.64.0.2/24 fd00:64::2/64
#   veth0  198.51.100.1  2001:db8:1::1  <-veth-> veth0  198.51.100.2  2001:db8:1::2
#
# Each node runs (the embedded default configuration, all flags):
#   veil up --key K --listen UNDERLAY:51820 --address 100.64.0.N/24 --address fd00:64::N/64 \
#           --tun veil-N --peer PEERKEY@PEER-UNDERLAY:51820 --allow PEER/32 --allow PEER/128 \
#           --keepalive 25 --control SOCKET
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

step() { printf '\n== %s\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

net_setup
keys_make a b
step "keys"
printf 'a: %s\nb: %s\n' "$(pub a)" "$(pub b)"
step "starting two nodes"
node_start b --keepalive 25
node_start a --keepalive 25
wait_ready a b
ip -n "$NS_a" -br addr show dev "$TUN_a"
ip -n "$NS_b" -br addr show dev "$TUN_b"

step "ping through the tunnel (a -> b)"
show nsx a timeout --foreground 10 ping -c 3 -i 0.2 -W 5 "$OL4_b" || not_ok demo "IPv4 ping failed"
show nsx a timeout --foreground 10 ping -c 3 -i 0.2 -W 5 "$OL6_b" || not_ok demo "IPv6 ping failed"

if command -v iperf3 >/dev/null; then
	step "iperf3, 3 s, a -> b"
	iperf_server b
	show nsx a timeout --foreground 20 iperf3 -c "$OL4_b" -B "$OL4_a" -t 3 -f m || not_ok demo "iperf3 failed"
fi

for n in a b; do
	step "veil status on node $n"
	nsx "$n" timeout --foreground 5 "$VEIL" status --control "$(sock "$n")" || not_ok demo "veil status on $n failed"
done
step "stopping (SIGTERM) and removing the namespaces"
((FAILS == 0)) && echo "demo ok"
finish
