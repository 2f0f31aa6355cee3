#!/usr/bin/env bash
# garbage.sh -- 20,000 random UDP datagrams (lengths 0..1500, some opening like TLS
# handshake/application records) hit b's port from a third address. b must stay alive,
# answer none of them, keep its log rate-limited, count them as drops, and the tunnel
# must still carry pings.
#
#   veil-t-$$-a                                  veil-t-$$-b
#   veil-a 100.64.0.1        ==== tunnel ====>   veil-b 100.64.0.2
#   veth0 198.51.100.1 (veil)                    veth0 198.51.100.2:51820
#         198.51.100.3 (pkt.py garbage) --junk-->
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

COUNT=20000
SEED=${GARBAGE_SEED:-1}
JUNK_SRC=198.51.100.3

command -v python3 >/dev/null || die "missing python3 (make deps)"
net_setup
ip -n "$NS_a" addr add "$JUNK_SRC/24" dev "$VETH" || die "third address on a"
keys_make a b
node_start b
node_start a
wait_ready a b
ping_ok a "$OL4_b" || die "no ping a -> b before the garbage"

drops0=$(drops_total b)
lines0=$(wc -l <"${NODE_LOG[b]}")
note "sending $COUNT datagrams from $JUNK_SRC, seed $SEED"
out=$(nsx a timeout --foreground 60 python3 "$NETNS_DIR/pkt.py" garbage "$JUNK_SRC" "$UL4_b" "$PORT" "$COUNT" "$SEED")
note "pkt.py: ${out:-no output}"
sent=$(awk '{ print $2 }' <<<"$out")
replies=$(awk '{ print $4 }' <<<"$out")
check "all $COUNT datagrams sent" "sent '${sent}'" test "${sent:-0}" -eq "$COUNT"

# the daemon may still be working through its socket buffer: wait (bounded) for the counters
for ((i = 0; i < 30; i++)); do
	d=$(drops_total b)
	[[ -n "$d" ]] && ((d > drops0)) && break
	sleep 0.1
done
drops1=$(drops_total b)
check "b is alive" "b exited" node_alive b
check "b's drop counters increased" "drops total $drops0 -> ${drops1:-unreachable}" \
	test "${drops1:-0}" -gt "${drops0:-0}"
note "b drops: $(st b '.drops | to_entries | map(select(.value > 0) | "\(.key)=\(.value)") | join(" ")')"
check "nothing was sent back to the garbage source" "$replies replies" test "${replies:-1}" -eq 0
lines1=$(wc -l <"${NODE_LOG[b]}")
check "b's log stays rate-limited" "log grew by $((lines1 - lines0)) lines" test $((lines1 - lines0)) -lt 200
check "ping a -> b still works" "no reply within 5 s" ping_ok a "$OL4_b"
check "ping b -> a still works" "no reply within 5 s" ping_ok b "$OL4_a"
finish
