#!/usr/bin/env bash
# fec.sh -- parity records on a lossy path (README "Lossy paths"). a and b reach each other only
# through tests/bench/relay.c, which runs in a's namespace on two addresses of its own and drops
# LOSS_PCT of the datagrams each way:
#
#   veil-t-$$-a                                                     veil-t-$$-b
#   veil a 198.51.100.1:51820 <-> relay 198.51.100.11 | 198.51.100.12 <-- veth --> veil b 198.51.100.2:51820
#
#   (i)   lossy: iperf3 a -> b; b measures the loss and reports it, a sends parity and b rebuilds
#         data records from it; nothing is dropped as malformed, forged or replayed;
#   (ii)  the loss ends: a stops adding parity (no parity bytes during a clean transfer);
#   (iii) --fec off on a (a reload): lossy again, b still reports loss, a sends no parity.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

LOSS_PCT=5
RELAY_A=198.51.100.11 RELAY_B=198.51.100.12
command -v iperf3 >/dev/null || die "missing iperf3 (make deps)"
command -v cc >/dev/null || die "missing cc (make deps)"
net_setup
cc -O2 -o "$TMPD/relay" "$REPO_ROOT/tests/bench/relay.c" || die "relay.c did not compile"
nsx a ip addr add "$RELAY_A/32" dev lo || die "relay address on lo"
nsx a ip addr add "$RELAY_B/24" dev "$VETH" || die "relay address on veth0"
keys_make a b

RELAY_PID=''
relay_start() { # LOSS_PCT
	relay_stop
	ip netns exec "$NS_a" "$TMPD/relay" -d 1 -l "$1" -t 300 -s "$TMPD/relay.stats" "$RELAY_A:$PORT" "$UL4_a:$PORT" \
		"$RELAY_B:$PORT" "$UL4_b:$PORT" >"$TMPD/relay.log" 2>&1 </dev/null &
	RELAY_PID=$!
	relay_up() { nsx a ss -Hlun "src $RELAY_B" "sport = :$PORT" | grep -q .; }
	wait_until 5 relay_up || die "relay did not start"
}
relay_stop() {
	[[ -n $RELAY_PID ]] || return 0
	kill -TERM "$RELAY_PID" 2>/dev/null
	wait "$RELAY_PID" 2>/dev/null
	RELAY_PID=''
}

cat >"$TMPD/a.toml" <<EOF
key = "$TMPD/a.key"
listen = "$UL4_a:$PORT"
address = ["$OL4_a/24", "$OL6_a/64"]
tun = "$TUN_a"
mtu = 1420
control = "$(sock a)"

[[peer]]
name = "b"
public_key = "$(pub b)"
endpoint = "$RELAY_A:$PORT"
allowed_ips = ["$OL4_b/32"]
EOF
relay_start "$LOSS_PCT"
node_run a up --config "$TMPD/a.toml"
node_run b up --key "$TMPD/b.key" --listen "$UL4_b:$PORT" --address "$OL4_b/24" --address "$OL6_b/64" --tun "$TUN_b" \
	--peer "$(pub a)@$RELAY_B:$PORT" --allow "$OL4_a/32" --control "$(sock b)"
wait_ready a && wait_ready b || die "nodes did not come up"
wait_until 10 ping_ok a "$OL4_b" || die "no ping a -> b through the relay"
iperf_server b

transfer() { # LABEL SECONDS -- iperf3 a -> b; prints bits/s
	nsx a timeout --foreground 30 iperf3 -c "$OL4_b" -B "$OL4_a" -t "$2" -J 2>/dev/null | jq -r '.end.sum_received.bits_per_second // 0'
}
parity_sent() { st a '.fec.parity_sent'; }

# (i) lossy
bps=$(transfer lossy 4)
check "lossy: iperf3 a -> b moved data" "${bps:-none} bit/s" awk -v b="${bps:-0}" 'BEGIN {exit !(b > 1e6)}'
loss=$(st b '.peers[0].loss_pct')
check "lossy: b measures the loss of a's records (about $LOSS_PCT %)" "loss_pct $loss" \
	awk -v l="${loss:-0}" 'BEGIN {exit !(l >= 2 && l <= 10)}'
told=$(st a '.peers[0].peer_loss_pct')
check "lossy: a hears b's report" "peer_loss_pct $told" awk -v l="${told:-0}" 'BEGIN {exit !(l >= 2)}'
sent=$(parity_sent) bytes=$(st a '.fec.parity_bytes') txb=$(st a '.peers[0].tx_bytes')
check "lossy: a sends parity records" "parity_sent $sent" test "${sent:-0}" -gt 100
check "lossy: parity is a bounded share of a's bytes (at most 35 % at $LOSS_PCT % loss)" "$bytes of $txb bytes" \
	awk -v p="${bytes:-0}" -v t="${txb:-1}" 'BEGIN {exit !(p > 0 && p / t <= 0.35)}'
got=$(st b '.fec.parity_received') rec=$(st b '.fec.recovered')
check "lossy: b receives parity and rebuilds data records from it" "parity_received $got, recovered $rec" \
	test "${rec:-0}" -gt 50
bad=$(st b '(.drops.malformed // 0) + (.drops.bad_auth // 0)')
check "lossy: nothing at b dropped as malformed or forged" "malformed+bad_auth $bad" test "${bad:-1}" -eq 0
pings=$(nsx a timeout --foreground 20 ping -c 40 -i 0.05 -W 1 -q "$OL4_b" | sed -n 's/.* \([0-9]*\) received.*/\1/p')
check "lossy: pings get through more often than the path alone allows" "$pings of 40" test "${pings:-0}" -ge 38

# (ii) the loss ends
relay_start 0
zero() { [[ $(st a '.peers[0].peer_loss_pct') == 0 ]]; }
# b measures once a second what it got of a's records, given enough of them: pings every 10 ms
nsx a timeout --foreground 20 ping -c 1000 -i 0.01 -q "$OL4_b" >/dev/null 2>&1 &
ping_pid=$!
if wait_until 12 zero; then ok "clean: a hears the loss is gone (after $WAITED_MS ms)"; else not_ok "clean: a hears the loss is gone" "peer_loss_pct $(st a '.peers[0].peer_loss_pct') after 12 s"; fi
kill "$ping_pid" 2>/dev/null
wait "$ping_pid" 2>/dev/null
before=$(parity_sent)
bps=$(transfer clean 2)
after=$(parity_sent)
check "clean: no parity during a transfer on the clean path" "parity_sent $before -> $after, ${bps:-0} bit/s" \
	test "${after:-x}" = "${before:-y}"

# (iii) --fec off
relay_start "$LOSS_PCT"
printf 'fec = "off"\n' | cat - "$TMPD/a.toml" >"$TMPD/a2.toml" && mv "$TMPD/a2.toml" "$TMPD/a.toml"
nsx a timeout --foreground 10 "$VEIL" reload --control "$(sock a)" >/dev/null 2>&1
check "off: the reload applies" "fec.mode $(st a '.fec.mode')" test "$(st a '.fec.mode')" = off
before=$(parity_sent)
transfer off 3 >/dev/null
after=$(parity_sent) told=$(st a '.peers[0].peer_loss_pct')
check "off: b reports loss, a adds no parity" "peer_loss_pct $told, parity_sent $before -> $after" \
	awk -v l="${told:-0}" -v x="${before:-x}" -v y="${after:-y}" 'BEGIN {exit !(l > 0 && x == y)}'

relay_stop
finish
