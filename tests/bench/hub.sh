#!/usr/bin/env bash
# hub.sh -- one real veil hub with HUB_PEERS (default 1,000) configured peers, default flags, and as
# many real veil spokes (HUB_PER_NS to a network namespace, each on its own port and TUN), each
# knowing only the hub and sending a keepalive every 25 s, as clients behind NAT do. Reports: the
# time until the hub has every peer up, then over HUB_STEADY_S (default 60) seconds that all stay
# up, the hub's CPU per second (in all, and per idle peer: keepalives, timers, rekeys) and its RSS,
# against a hub with HUB_BASE_PEERS (default 10) peers measured the same way, so the difference is
# what the peers cost. Run by `make scale` after scale.sh (root; a few minutes); not in make test.
#
#   veil-h-PID-br: bridge br0 -- veth -- veil-h-PID-hub: ul0 198.51.100.1/24 (hub, 100.64.255.254)
#                             -- veth -- veil-h-PID-K:   ul0 198.51.100.(K+1)/24, spokes on ports 20000+
set -uo pipefail
PEERS=${HUB_PEERS:-1000}
BASE=${HUB_BASE_PEERS:-10}
PER_NS=${HUB_PER_NS:-25}
STEADY_S=${HUB_STEADY_S:-60}
LIMIT_S=${HUB_LIMIT_S:-300}
VEIL=${VEIL:-$(cd "$(dirname "$0")/../.." && pwd)/out/veil}
((PEERS >= 1 && PEERS <= 4000 && BASE >= 1 && BASE < PEERS && PER_NS >= 1 && PER_NS <= 100)) ||
	{ echo "hub: HUB_PEERS 1..4000, HUB_BASE_PEERS below it, HUB_PER_NS 1..100" >&2; exit 2; }
[[ -x $VEIL ]] || { echo "hub: no $VEIL (make build)" >&2; exit 2; }
ID=$$
TMPD=$(mktemp -d /tmp/veil-hub.XXXXXX)
PIDS=()
HUB_PID=
NS_COUNT=$(((PEERS + PER_NS - 1) / PER_NS))
stop_all() {
	local p i
	for p in "${PIDS[@]}" $HUB_PID; do kill -TERM "$p" 2>/dev/null; done
	for ((i = 0; i < 50; i++)); do
		kill -0 "${PIDS[@]}" $HUB_PID 2>/dev/null || break
		sleep 0.2
	done
	for p in "${PIDS[@]}" $HUB_PID; do kill -KILL "$p" 2>/dev/null; done
	PIDS=()
	HUB_PID=
}
cleanup() {
	stop_all
	for ((k = 1; k <= NS_COUNT; k++)); do ip netns del "veil-h-$ID-$k" 2>/dev/null; done
	ip netns del "veil-h-$ID-hub" 2>/dev/null
	ip netns del "veil-h-$ID-br" 2>/dev/null
	rm -rf "$TMPD"
}
trap cleanup EXIT
now_ms() { echo $(($(date +%s%N) / 1000000)); }
spoke_ns() { echo "veil-h-$ID-$((($1 - 1) / PER_NS + 1))"; }
spoke_ip() { echo "198.51.100.$((($1 - 1) / PER_NS + 2))"; }
spoke_port() { echo $((20000 + ($1 - 1) % PER_NS)); }
overlay() { echo "100.64.$(($1 / 250)).$(($1 % 250 + 1))"; }

ip netns add "veil-h-$ID-br" || exit 1
ip -n "veil-h-$ID-br" link add br0 type bridge && ip -n "veil-h-$ID-br" link set br0 up || exit 1
attach() { # NAMESPACE INDEX ADDRESS
	ip netns add "$1" || exit 1
	ip -n "$1" link set lo up
	ip link add "h$ID-$2" netns "veil-h-$ID-br" type veth peer name ul0 netns "$1" || exit 1
	ip -n "veil-h-$ID-br" link set "h$ID-$2" master br0 up
	ip -n "$1" addr add "$3/24" dev ul0 && ip -n "$1" link set ul0 up
}
attach "veil-h-$ID-hub" 0 198.51.100.1
for ((k = 1; k <= NS_COUNT; k++)); do attach "veil-h-$ID-$k" "$k" "198.51.100.$((k + 1))"; done
(umask 077 && "$VEIL" genkey >"$TMPD/hub.key")
hub_pub=$("$VEIL" pubkey <"$TMPD/hub.key")
for ((i = 1; i <= PEERS; i++)); do
	(umask 077 && "$VEIL" genkey >"$TMPD/$i.key")
	"$VEIL" pubkey <"$TMPD/$i.key" >"$TMPD/$i.pub"
done
echo "hub: $PEERS spoke keys, $NS_COUNT namespaces of $PER_NS spokes on one bridge" >&2

hub_health() { timeout 5 "$VEIL" health --control "$TMPD/hub.sock" 2>/dev/null | sed -n 's/^ok: \([0-9]*\) of .*/\1/p'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# One measurement: a hub with N peers and their spokes; writes "up_ms cpu_us_per_s rss_kb still_up" to $TMPD/result.
run() {
	local n=$1 i args=() t0 up_ms=-1 c1 c2 rss still
	for ((i = 1; i <= n; i++)); do args+=(--peer "$(cat "$TMPD/$i.pub")" --allow "$(overlay "$i")/32"); done
	ip netns exec "veil-h-$ID-hub" "$VEIL" up --key "$TMPD/hub.key" --listen 198.51.100.1:51820 --address 100.64.255.254/16 \
		--tun veil-h --control "$TMPD/hub.sock" --mgmt off --no-port-mapping --log-level warn "${args[@]}" >"$TMPD/hub.log" 2>&1 &
	HUB_PID=$!
	for ((i = 1; i <= n; i++)); do
		ip netns exec "$(spoke_ns "$i")" "$VEIL" up --key "$TMPD/$i.key" --listen "$(spoke_ip "$i"):$(spoke_port "$i")" \
			--address "$(overlay "$i")/32" --tun "vh$(((i - 1) % PER_NS))" --keepalive 25 --control "$TMPD/$i.sock" --mgmt off \
			--no-port-mapping --log-level error --peer "$hub_pub@198.51.100.1:51820" --allow 100.64.255.254/32 >"$TMPD/$i.log" 2>&1 &
		PIDS+=($!)
	done
	t0=$(now_ms)
	while (($(now_ms) - t0 < LIMIT_S * 1000)); do
		[[ $(hub_health) == "$n" ]] && { up_ms=$(($(now_ms) - t0)); break; }
		sleep 0.5
	done
	if ((up_ms < 0)); then
		echo "hub: $n peers: only $(hub_health) up after $LIMIT_S s" >&2
		tail -5 "$TMPD/hub.log" >&2
		stop_all
		return 1
	fi
	sleep 5
	c1=$(ticks "$HUB_PID")
	sleep "$STEADY_S"
	c2=$(ticks "$HUB_PID")
	rss=$(rss_kb "$HUB_PID")
	still=$(hub_health)
	echo "$up_ms $(((c2 - c1) * 1000000 / $(getconf CLK_TCK) / STEADY_S)) $rss $still" >"$TMPD/result"
	stop_all
}

run "$BASE" || exit 1
read -r _ base_cpu base_rss base_still <"$TMPD/result"
run "$PEERS" || exit 1
read -r up_ms cpu rss still <"$TMPD/result"
printf 'hub: %d peers (default flags): all up %d ms after the last spoke started; still up after %d s: %s/%d\n' "$PEERS" "$up_ms" "$STEADY_S" "$still" "$PEERS"
printf 'hub: CPU %d us/s with %d peers, %d us/s with %d: %d us/s per idle peer (keepalives every 25 s, rekeys)\n' \
	"$cpu" "$PEERS" "$base_cpu" "$BASE" "$(((cpu - base_cpu) / (PEERS - BASE)))"
printf 'hub: RSS %d KB with %d peers, %d KB with %d: %d bytes per peer\n' \
	"$rss" "$PEERS" "$base_rss" "$BASE" "$(((rss - base_rss) * 1024 / (PEERS - BASE)))"
[[ $still == "$PEERS" && $base_still == "$BASE" ]]
