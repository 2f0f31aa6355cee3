#!/usr/bin/env bash
# prometheus.sh -- a real Prometheus server (Debian's prometheus package) scrapes a's
# management endpoint every second from inside a's namespace. Within 30 s its HTTP API must
# report the target up (up == 1, no scrape error), and after pings the transfer counters
# it stored (veil_sent_bytes_total, veil_peer_sent_bytes_total for b) must be nonzero.
#
#   veil-t-$$-a                                                veil-t-$$-b
#   prometheus 127.0.0.1:9090 --scrape 1s--> veil mgmt 127.0.0.1:7777
#   veil-a 100.64.0.1  ============== tunnel ==============>  veil-b 100.64.0.2
#   veth0 198.51.100.1 <------------- veth --------------->   veth0 198.51.100.2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

PROM_PORT=9090
command -v python3 >/dev/null || die "missing python3 (make deps)"
command -v prometheus >/dev/null || die "missing prometheus (Debian package prometheus; make deps)"

net_setup
keys_make a b
node_start b
node_start a --mgmt "127.0.0.1:$MGMT_PORT"
wait_ready a b
wait_mgmt a || die "a's /healthz did not answer 200 within 10 s"
ping_ok a "$OL4_b" || die "no ping a -> b"

mkdir -p "$TMPD/prom-data"
cat >"$TMPD/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: veil
    static_configs:
      - targets: ["127.0.0.1:$MGMT_PORT"]
EOF
ip netns exec "$NS_a" timeout --foreground 60 prometheus --config.file="$TMPD/prometheus.yml" \
	--storage.tsdb.path="$TMPD/prom-data" --web.listen-address="127.0.0.1:$PROM_PORT" \
	--storage.tsdb.retention.time=1h >"$TMPD/prometheus.out" 2>&1 </dev/null &
prom_pid=$!

# q PROMQL -- the first result's value of an instant query ("" if none)
q() {
	local path
	path="/api/v1/query?query=$(jq -rn --arg q "$1" '$q | @uri')"
	http a GET 127.0.0.1 "$PROM_PORT" "$path" "$TMPD/q.json" >/dev/null
	jq -r '.data.result[0].value[1] // empty' "$TMPD/q.json" 2>/dev/null
}

for ((i = 0; i < 100; i++)); do
	[[ $(http_code a GET 127.0.0.1 "$PROM_PORT" /-/ready) == 200 ]] && break
	kill -0 "$prom_pid" 2>/dev/null || break
	sleep 0.2
done
if [[ $(http_code a GET 127.0.0.1 "$PROM_PORT" /-/ready) != 200 ]]; then
	sed 's/^/#   /' "$TMPD/prometheus.out" | tail -n 20
	die "Prometheus did not become ready within 20 s"
fi
note "Prometheus $(prometheus --version 2>&1 | head -n 1 | awk '{ print $3 }') ready"

t0=$(now_ms)
up=''
for ((i = 0; i < 60; i++)); do
	up=$(q 'up{job="veil"}')
	[[ $up == 1 ]] && break
	sleep 0.5
done
t=$(($(now_ms) - t0))
http a GET 127.0.0.1 "$PROM_PORT" /api/v1/targets "$TMPD/targets.json" >/dev/null
health=$(jq -r '.data.activeTargets[0].health // "none"' "$TMPD/targets.json" 2>/dev/null)
lasterr=$(jq -r '.data.activeTargets[0].lastError // ""' "$TMPD/targets.json" 2>/dev/null)
check "Prometheus scrapes a: up == 1 within 30 s" "up '$up' after ${t} ms, health '$health', lastError '$lasterr'" \
	test "$up" = 1
check "the target is healthy with no scrape error" "health '$health', lastError '$lasterr'" \
	test "$health" = up -a -z "$lasterr"
((${#up})) && note "up == $up after ${t} ms"

nsx a timeout --foreground 10 ping -c 10 -i 0.2 -W 2 -q "$OL4_b" >/dev/null 2>&1 || not_ok "pings a -> b" "some of 10 lost"
pub_b=$(pub b)
sent='' psent=''
for ((i = 0; i < 30; i++)); do
	sent=$(q 'veil_sent_bytes_total{job="veil"}')
	psent=$(q "veil_peer_sent_bytes_total{job=\"veil\",public_key=\"$pub_b\"}")
	awk -v a="$sent" -v b="$psent" 'BEGIN { exit !(a + 0 > 0 && b + 0 > 0) }' && break
	sleep 0.5
done
check "Prometheus stored veil_sent_bytes_total > 0" "value '$sent'" awk -v v="$sent" 'BEGIN { exit !(v + 0 > 0) }'
check "Prometheus stored veil_peer_sent_bytes_total{public_key=b} > 0" "value '$psent'" \
	awk -v v="$psent" 'BEGIN { exit !(v + 0 > 0) }'
note "veil_sent_bytes_total $sent, for b $psent"
bi=$(q 'veil_build_info{job="veil"}')
check "Prometheus stored veil_build_info == 1" "value '$bi'" test "$bi" = 1
ss=$(q 'scrape_samples_scraped{job="veil"}')
note "samples per scrape: $ss"
# a counter must not go backwards between scrapes (a reset would be a daemon restart)
resets=$(q 'resets(veil_sent_bytes_total{job="veil"}[1m])')
check "veil_sent_bytes_total never went backwards" "resets() = '$resets'" test "$resets" = 0

kill -TERM "$prom_pid" 2>/dev/null
for ((i = 0; i < 50; i++)); do kill -0 "$prom_pid" 2>/dev/null || break; sleep 0.1; done
kill -KILL "$prom_pid" 2>/dev/null
wait "$prom_pid" 2>/dev/null
check "a is alive" "a exited" node_alive a
finish
