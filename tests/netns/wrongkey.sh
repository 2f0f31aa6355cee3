#!/usr/bin/env bash
# wrongkey.sh -- no tunnel without the right secrets:
#   (i)  a and b hold different network secrets (--psk): the initiator cannot
#        authenticate ServerHello (reason=server_hello_auth);
#   (ii) a is configured with a wrong public key for b: b drops a's ClientHello
#        before any Diffie-Hellman (reason=bad_mac1), and a drops b's ClientHello
#        because b is not its configured peer (reason=unknown_peer).
#
#   veil-t-$$-a                           veil-t-$$-b
#   veil up (psk A | peer key C)  --X-->  veil up (psk B | right keys)
#   veth0 198.51.100.1           <-veth-> veth0 198.51.100.2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
keys_make a b c

# no_ping FROM DST -- two echo requests, no reply (bounded to ~6 s)
# shellcheck disable=SC2317  # called through check
no_ping() {
	! nsx "$1" timeout --foreground 8 ping -c 2 -W 3 -q "$2" >/dev/null 2>&1
}

# (i) different PSKs
psk_make psk1
psk_make psk2
check "(i) psk files are mode 0600" "modes $(stat -c %a "$TMPD/psk1.psk" "$TMPD/psk2.psk" | tr '\n' ' ')" \
	test "$(stat -c %a "$TMPD/psk1.psk")$(stat -c %a "$TMPD/psk2.psk")" = 600600
node_start b --psk "$TMPD/psk2.psk"
node_start a --psk "$TMPD/psk1.psk"
wait_ready a b
check "(i) different PSKs: ping a -> b fails" "got a reply" no_ping a "$OL4_b"
check "(i) a logs reason=server_hello_auth" "no such line in a's log within 10 s" \
	wait_log a 'event=handshake_failed.*reason=server_hello_auth' 10
state=$(st a '.peers[0].state')
check "(i) a's peer is not up" "state '$state'" test "$state" != up
node_stop a
node_stop b
wait_gone a
wait_gone b

# (ii) a knows c's public key where b's should be
PEER_PUB=$(pub c) node_start a
node_start b
wait_ready a b
check "(ii) wrong peer key: ping a -> b fails" "got a reply" no_ping a "$OL4_b"
check "(ii) b logs reason=bad_mac1" "no such line in b's log within 10 s" \
	wait_log b 'event=handshake_dropped.*reason=bad_mac1' 10
n=$(st b '.drops.bad_mac1 // 0')
check "(ii) b's drops.bad_mac1 counts it" "drops.bad_mac1 is '$n'" test "${n:-0}" -gt 0
check "(ii) a logs reason=unknown_peer for b's ClientHello" "no such line in a's log within 10 s" \
	wait_log a 'event=handshake_dropped.*reason=unknown_peer' 10
finish
