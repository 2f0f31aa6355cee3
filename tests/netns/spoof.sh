#!/usr/bin/env bash
# spoof.sh -- a targeted handshake flood with a forged source: from a third namespace,
# ClientHellos with a correct MAC1 for b's key (b's public key is all it takes) and a's own
# underlay address as their IPv4 source, 200 a second, far over the per-source budget
# (--handshake-rate-per-source, default 10). The forger never sees b's answers (they go to
# the real a), so it can never show a cookie. While this goes on, a restarts and must reach b
# again within 15 s: the admission limiter may spend a source's budget only on hellos that
# prove their address (a valid cookie, MAC2) once b is under load, else anyone who knows a
# peer's address can lock that peer out.
#
#   veil-t-$$-a                        veil-t-$$-b                          veil-t-$$-c
#   veil-a 100.64.0.1  == tunnel ==>   veil-b 100.64.0.2
#   veth0 198.51.100.1 <-- veth -->    veth0 198.51.100.2:51820
#                                      veth1 203.0.113.2    <-- veth -->    veth0 203.0.113.3
#                 hellos "from 198.51.100.1" (raw socket) <------------------- flood.py spoof
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

SPOOF_S=${SPOOF_S:-25}
SPOOF_PPS=${SPOOF_PPS:-200}

command -v python3 >/dev/null || die "missing python3 (make deps)"
net_setup
net_add_c b
# b must take packets from a's address on its c-side link (reverse-path filter off)
for ifc in all default "$VETH_C"; do nsx b sysctl -qw "net.ipv4.conf.$ifc.rp_filter=0" || die "rp_filter off on b"; done
keys_make a b
node_start b
node_start a
wait_ready a b
ping_ok a "$OL4_b" || die "no ping a -> b"

ip netns exec "$NS_c" timeout --foreground $((SPOOF_S + 10)) python3 "$NETNS_DIR/flood.py" spoof "$UL4_a" "$UL4_b" "$PORT" \
	"$(pub b)" "$SPOOF_S" "$SPOOF_PPS" >"$TMPD/spoof.out" 2>&1 </dev/null &
spoof_pid=$!
cookies0=$(st b '.counters.cookies_sent // 0')
sleep 2
kill -0 "$spoof_pid" 2>/dev/null || die "the spoofer ended early: $(cat "$TMPD/spoof.out")"
cookies1=$(st b '.counters.cookies_sent // 0')
src=$(st b '.admission.refused.rate_source // 0')
note "b's cookies sent $cookies0 -> $cookies1 in the first 2 s; per-source refusals $src"
check "the forged hellos reach b and earn only cookie replies" "cookies_sent $cookies0 -> $cookies1" test "${cookies1:-0}" -gt "${cookies0:-0}"
check "the forger cannot spend a's per-source budget" "rate_source $src" test "${src:-0}" -eq 0
check "the running session a -> b is unaffected" "no reply within 5 s" ping_ok a "$OL4_b"

node_stop a
wait_gone a || die "a's TUN did not go away"
node_start a
wait_ready a
reached=0
ping_within a "$OL4_b" 15 && reached=1
t=$WAITED_MS
running=0
kill -0 "$spoof_pid" 2>/dev/null && running=1
check "restarted a reaches b within 15 s while its address is forged" \
	"no reply after ${t} ms (spoofer still running: $running)" test "$reached" -eq 1 -a "$running" -eq 1
((reached)) && note "a reached b ${t} ms after its restart"
kill -TERM "$spoof_pid" 2>/dev/null
wait "$spoof_pid" 2>/dev/null
note "flood.py: $(cat "$TMPD/spoof.out")"
note "b's admission: $(st b '.admission' | tr -d ' \n')"
note "b's cookies sent: $(st b '.counters.cookies_sent // "?"'); a's log: $(grep -c 'handshake' "${NODE_LOG[a]}") handshake lines"
check "b is alive" "b exited" node_alive b
finish
