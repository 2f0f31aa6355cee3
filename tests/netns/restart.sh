#!/usr/bin/env bash
# restart.sh -- node b dies (SIGKILL: no close record, stale control socket left behind)
# and a new b process starts with the same key and flags. Without any operator action
# a must reach b again within 15 s.
#
#   veil-t-$$-a                          veil-t-$$-b
#   veil up (keeps running)   ======>    veil up  --kill -9-->  veil up (same key)
#   veth0 198.51.100.1       <-veth->    veth0 198.51.100.2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
keys_make a b
node_start b
node_start a
wait_ready a b
ping_ok a "$OL4_b" || die "no ping a -> b before the restart"
hs0=$(st a '.counters.handshakes_completed')

kill -KILL "${NODE_PID[b]}"
wait "${NODE_PID[b]}" 2>/dev/null
unset "NODE_PID[b]"
check "b's TUN is gone after kill -9" "$TUN_b still exists after 2 s" wait_gone b

node_start b
wait_ready b
reached=0
ping_within a "$OL4_b" 15 && reached=1
t=$WAITED_MS
check "ping a -> restarted b within 15 s" "no reply after ${t} ms" test "$reached" -eq 1
((reached)) && note "a reached the new b after ${t} ms"
check "ping b -> a after the restart" "no reply within 5 s" ping_ok b "$OL4_a"
hs1=$(st a '.counters.handshakes_completed')
check "a completed a new handshake" "handshakes_completed $hs0 -> $hs1" test "${hs1:-0}" -gt "${hs0:-0}"
finish
