#!/usr/bin/env bash
# routes.sh -- a kernel route Veil cannot install, or one that another route shadows, is never
# silent: it is logged (route_conflict), shown in `veil status` and explained by `veil doctor`.
# a's peer b is allowed 10.99.0.0/16, which another interface already routes (the kernel refuses
# a second route: not installed), and fd99::/64, installed, but fd99::/96 on that interface is
# more specific and takes fd99::'s traffic (shadowed). Once the dummy's routes go, a reload installs
# 10.99.0.0/16 and the conflicts clear. After a kill -9 the restarted daemon reports none (its
# TUN, and the routes on it, went with the killed one).
#
#   veil-t-$$-a  dum0: 10.99.0.0/16, fd99::/96       veil-t-$$-b
#   veil-a 100.64.0.1/24  ========================>  veil-b 100.64.0.2/24
#   veth0  198.51.100.1   <------- veth -------->    veth0  198.51.100.2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
keys_make a b
# dum0: one end of a veth pair (this kernel has no dummy interfaces), the other end idle
nsx a ip link add dum0 type veth peer name dum1 || die "veth dum0"
nsx a ip link set dum0 up
nsx a ip link set dum1 up
nsx a ip route add 10.99.0.0/16 dev dum0
nsx a ip -6 route add fd99::/96 dev dum0

cat >"$TMPD/a.toml" <<TOML
key = "$TMPD/a.key"
listen = "$UL4_a:$PORT"
address = ["$OL4_a/24"]

[[peer]]
name = "b"
public_key = "$(pub b)"
endpoint = "$UL4_b:$PORT"
allowed_ips = ["$OL4_b/32", "10.99.0.0/16", "fd99::/64"]
TOML
node_run a up --config "$TMPD/a.toml" --tun "$(tun a)" --control "$(sock a)"
wait_log a 'event=started' 10 || die "a did not start"
node_start b
wait_log a 'event=route_conflict prefix=fd99::/64' 5
check "IPv4: the prefix another route holds is logged as a conflict, not installed" "$(grep route_ "${NODE_LOG[a]}")" \
	bash -c "grep -q 'event=route_conflict prefix=10.99.0.0/16 reason=\"the main table has another route' '${NODE_LOG[a]}' &&
		! ip -n $(ns a) route show 10.99.0.0/16 | grep -q $(tun a)"
check "IPv6: the shadowed prefix is logged as a conflict (traffic leaves by dum0)" "$(grep route_ "${NODE_LOG[a]}")" \
	grep -q 'event=route_conflict prefix=fd99::/64 reason="traffic for it leaves by dum0' "${NODE_LOG[a]}"
check "the host route of b is no conflict" "$(grep route_ "${NODE_LOG[a]}")" \
	bash -c "! grep -q 'route_conflict prefix=$OL4_b/32' '${NODE_LOG[a]}'"
status=$(nsx a "$VEIL" status --control "$(sock a)")
check "status warns about both conflicts" "$status" \
	bash -c "grep -q 'warning: route conflict: 10.99.0.0/16: the main table' <<<\"\$0\" && grep -q 'warning: route conflict: fd99::/64: traffic for it leaves by dum0' <<<\"\$0\"" "$status"
json=$(nsx a "$VEIL" status --json --control "$(sock a)")
check "status JSON lists them in warnings" "$json" \
	test "$(jq '[.warnings[] | select(startswith("route conflict: "))] | length' <<<"$json")" = 2
doctor=$(nsx a "$VEIL" doctor --config "$TMPD/a.toml" --control "$(sock a)" 2>&1)
check "doctor fails the routes check and says what to do" "$doctor" \
	bash -c "grep -q 'FAIL.*routes.*10.99.0.0/16: the main table has another route.*ip route show PREFIX' <<<\"\$0\" && grep -q 'FAIL.*routes.*fd99::/64: traffic for it leaves by dum0.*ip route get' <<<\"\$0\"" "$doctor"

# the other routes go; a reload (b's allowed IPs change) installs ours and clears the conflicts
nsx a ip route del 10.99.0.0/16 dev dum0
nsx a ip -6 route del fd99::/96 dev dum0
sed -i 's|"fd99::/64"\]|"fd99::/64", "10.77.0.0/16"]|' "$TMPD/a.toml"
nsx a "$VEIL" reload --control "$(sock a)" >/dev/null
wait_log a 'event=route_added prefix=10.77.0.0/16' 5
check "after the reload 10.99.0.0/16 is installed via the TUN" "$(ip -n "$(ns a)" route)" \
	bash -c "ip -n $(ns a) route show 10.99.0.0/16 | grep -q 'dev $(tun a)'"
status=$(nsx a "$VEIL" status --control "$(sock a)")
check "and status has no route conflict any more" "$status" bash -c "! grep -q 'route conflict' <<<\"\$0\"" "$status"
check "the resolved conflicts are logged" "$(grep route_ "${NODE_LOG[a]}")" \
	test "$(grep -c 'event=route_conflict_resolved' "${NODE_LOG[a]}")" = 2

kill -9 "${NODE_PID[a]}"
wait "${NODE_PID[a]}" 2>/dev/null
unset "NODE_PID[a]"
check "kill -9 leaves no route of Veil's behind" "$(ip -n "$(ns a)" route show proto 86)" test -z "$(ip -n "$(ns a)" route show proto 86)"
node_run a up --config "$TMPD/a.toml" --tun "$(tun a)" --control "$(sock a)"
wait_log a 'event=started' 10 || die "a did not start again"
check "after a restart no route conflict is reported" "$(grep route_ "${NODE_LOG[a]}")" \
	bash -c "! grep -q 'route_conflict' '${NODE_LOG[a]}'"
check "and the tunnel works" "no reply" ping_ok a "$OL4_b"
finish
