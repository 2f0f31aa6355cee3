#!/usr/bin/env bash
# shutdown.sh -- SIGTERM to b: b sends a close record, removes its TUN and exits 0 within
# 2 s; a marks the peer not "up" within 1 s and logs event=session_closed.
#
#   veil-t-$$-a                            veil-t-$$-b
#   veil up  <====== close record ======   veil up  <-- SIGTERM
#   veth0 198.51.100.1          <-veth->   veth0 198.51.100.2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
keys_make a b
node_start b
node_start a
wait_ready a b
ping_ok a "$OL4_b" || die "no ping a -> b before the shutdown"
state=$(st a '.peers[0].state')
[[ $state == up ]] || die "a's peer state is '$state' before the shutdown, expected up"

pid=${NODE_PID[b]}
t0=$(now_ms)
kill -TERM "$pid"

# a: peer state leaves "up" within 1 s of the signal
state=up
while (($(now_ms) - t0 < 1000)); do
	state=$(st a '.peers[0].state')
	[[ $state != up ]] && break
	sleep 0.05
done
t_state=$(($(now_ms) - t0))
check "a: peer state is not up within 1 s" "still '$state' after ${t_state} ms" test "$state" != up
note "a: peer state '$state' after ${t_state} ms"
check "a logs event=session_closed" "no such line in a's log within 1 s" wait_log a 'event=session_closed' 1

# b: exits within 2 s of the signal, with status 0, and takes its TUN with it
if node_exited b "$t0" 2000; then
	ok "b exits within 2 s of SIGTERM"
	note "b exited after ~${EXIT_MS} ms"
	check "b exits with status 0" "exit status $NODE_RC" test "$NODE_RC" -eq 0
else
	not_ok "b exits within 2 s of SIGTERM" "still running after ${EXIT_MS} ms"
	node_stop b
fi
check "b's TUN is gone" "$TUN_b still exists" tun_gone b
check "b logs event=shutdown" "no such line in b's log" grep -q 'event=shutdown' "${NODE_LOG[b]}"
finish
