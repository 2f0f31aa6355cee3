# shellcheck shell=bash
# veil: the project's daemon, $VEIL_BIN (default out/veil of this checkout). Fresh keys every run;
# each side gets its IPv4 and IPv6 overlay address, the peer's two host routes as --allow, a control
# socket in STATE (bench.sh's sampler asks it for status) and no management HTTP. Extra `veil up`
# flags (e.g. --cipher chacha20-poly1305) come from VEIL_UP_ARGS, split on spaces.
VEIL=${VEIL_BIN:-$(cd "$BENCH_HOME/../.." && pwd)/out/veil}
[[ $VEIL == /* ]] || VEIL=$PWD/$VEIL
UDP_PORT=51820

impl_up() {
	[[ -x $VEIL ]] || fail "no veil binary at $VEIL (make build)"
	local s extra=()
	for s in a b; do
		(umask 077 && "$VEIL" genkey >"$STATE/$s.key") || fail "veil genkey"
		"$VEIL" pubkey <"$STATE/$s.key" >"$STATE/$s.pub" || fail "veil pubkey"
	done
	[[ -n ${VEIL_UP_ARGS:-} ]] && read -r -a extra <<<"$VEIL_UP_ARGS"
	spawn veil-a "$NS_A" "$VEIL" up --key "$STATE/a.key" --listen "$UL4_A:$UDP_PORT" \
		--address "$OL4_A/$OL4_LEN" --address "$OL6_A/$OL6_LEN" --tun veil-a \
		--peer "$(<"$STATE/b.pub")@$EP_OF_B:$UDP_PORT" --allow "$OL4_B/32" --allow "$OL6_B/128" \
		--control "$STATE/a.sock" --mgmt off "${extra[@]}"
	spawn veil-b "$NS_B" "$VEIL" up --key "$STATE/b.key" --listen "$UL4_B:$UDP_PORT" \
		--address "$OL4_B/$OL4_LEN" --address "$OL6_B/$OL6_LEN" --tun veil-b \
		--peer "$(<"$STATE/a.pub")@$EP_OF_A:$UDP_PORT" --allow "$OL4_A/32" --allow "$OL6_A/128" \
		--control "$STATE/b.sock" --mgmt off "${extra[@]}"
	# the daemon creates its TUN and puts the addresses on it: wait for both sides (10 s)
	until_ok 100 has_addr "$NS_A" veil-a "$OL4_A" && until_ok 100 has_addr "$NS_B" veil-b "$OL4_B" ||
		{ show_logs; fail "veil did not bring up veil-a/veil-b within 10 s"; }
}

# impl_metrics: a's parity records (README "Lossy paths") as a share of the bytes it sent, and the
# data records b rebuilt from them, all tests so far included; 0 on a clean link.
impl_metrics() {
	local a b
	a=$(ip netns exec "$NS_A" "$VEIL" status --json --control "$STATE/a.sock" 2>/dev/null) || return 0
	b=$(ip netns exec "$NS_B" "$VEIL" status --json --control "$STATE/b.sock" 2>/dev/null) || return 0
	emit parity_pct "$(jq -r '(.fec.parity_bytes / ([.counters.tx_bytes, 1] | max) * 10000 | round) / 100' <<<"$a")" pct
	emit parity_recovered "$(jq -r '.fec.recovered' <<<"$b")" count
}
