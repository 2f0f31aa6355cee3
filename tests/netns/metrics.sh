#!/usr/bin/env bash
# metrics.sh -- the management HTTP endpoint. a serves it on 127.0.0.1:7777 inside its own
# namespace; b on 0.0.0.0:7777 with --mgmt-acl 127.0.0.0/8,100.64.0.1/32. After a ping:
# /healthz, /metrics (checked by `promtool check metrics`, counters that moved, every
# metric family of the contract), /status (the same JSON shape as `veil status --json`),
# 404/405, the ACL (403 from a source outside it, 200 from one inside, a loopback-only
# bind unreachable from outside), an oversized header (431 or closed, the endpoint still
# answers), idle and dripping clients (they do not block /healthz, the server ends them).
# Then b again with the default ACL (403 even over the tunnel) and with --mgmt off.
#
#   veil-t-$$-a                                     veil-t-$$-b
#   mgmt 127.0.0.1:7777 (lo)                        mgmt 0.0.0.0:7777, acl 127/8 + 100.64.0.1/32
#   veil-a 100.64.0.1  ========= tunnel ==========> veil-b 100.64.0.2:7777   (allowed: 200)
#   veth0 198.51.100.1 ---------- veth ----------> veth0 198.51.100.2:7777  (not allowed: 403)
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

command -v python3 >/dev/null || die "missing python3 (make deps)"
# promtool comes with Debian's prometheus package (make deps installs it); without it the
# scenario fails here, loudly, instead of skipping the format check
command -v promtool >/dev/null || die "missing promtool (Debian package prometheus; make deps)"

net_setup
keys_make a b
node_start b --mgmt "0.0.0.0:$MGMT_PORT" --mgmt-acl "127.0.0.0/8,$OL4_a/32"
node_start a --mgmt "127.0.0.1:$MGMT_PORT"
wait_ready a b
wait_mgmt a || die "a's /healthz on 127.0.0.1:$MGMT_PORT did not answer 200 within 10 s"
wait_mgmt b || die "b's /healthz on 127.0.0.1:$MGMT_PORT did not answer 200 within 10 s"
ping_ok a "$OL4_b" || die "no ping a -> b"
nsx a timeout --foreground 10 ping -c 5 -i 0.2 -W 2 -q "$OL4_b" >/dev/null 2>&1 || die "5 pings a -> b failed"

B="$TMPD/body"
# ---- /healthz
r=$(http a GET 127.0.0.1 "$MGMT_PORT" /healthz "$B")
check "/healthz: 200" "got '$r'" test "${r%% *}" = 200
check "/healthz: body is 'ok\\n'" "body '$(head -c 40 "$B" | od -An -c | tr -s ' ')'" \
	test "$(od -An -tx1 "$B" | tr -d ' \n')" = 6f6b0a

# ---- /metrics, bracketed by two status snapshots: the counters are the same counters
tx0=$(st a '.counters.tx_bytes')
r=$(http a GET 127.0.0.1 "$MGMT_PORT" /metrics "$TMPD/metrics.txt")
tx1=$(st a '.counters.tx_bytes')
check "/metrics: 200" "got '$r'" test "${r%% *}" = 200
ctype=$(awk '{ print $2 }' <<<"$r")
check "/metrics: Content-Type text/plain; version=0.0.4" "Content-Type '$ctype'" \
	grep -qi '^text/plain;.*version=0\.0\.4' <<<"$ctype"
note "/metrics: $(wc -l <"$TMPD/metrics.txt") lines, $(grep -c '^# TYPE' "$TMPD/metrics.txt") families"
promtool check metrics <"$TMPD/metrics.txt" >"$TMPD/promtool.out" 2>&1
prc=$?
check "promtool check metrics: parses (exit != 1)" "exit $prc: $(head -c 400 "$TMPD/promtool.out" | tr '\n' ' ')" \
	test "$prc" -ne 1
check "promtool check metrics: no lint findings (exit 0)" "exit $prc: $(head -c 400 "$TMPD/promtool.out" | tr '\n' ' ')" \
	test "$prc" -eq 0
missing=''
for fam in veil_build_info veil_uptime_seconds veil_peers veil_sessions veil_received_records_total \
	veil_sent_records_total veil_received_bytes_total veil_sent_bytes_total veil_tun_received_packets_total \
	veil_tun_sent_packets_total veil_tun_super_packets_total veil_tun_coalesced_packets_total veil_offload_enabled \
	veil_handshakes_total veil_cookies_sent_total veil_packets_dropped_total \
	veil_admission_refused_total veil_peer_received_bytes_total veil_peer_sent_bytes_total \
	veil_peer_last_handshake_timestamp_seconds veil_peer_up veil_gc_collections_total \
	veil_gc_allocated_bytes_total process_resident_memory_bytes process_cpu_seconds_total \
	process_start_time_seconds; do
	grep -Eq "^${fam}([{ ])" "$TMPD/metrics.txt" || missing+=" $fam"
done
check "/metrics: every family of the contract has a sample" "missing:$missing" test -z "$missing"
M="$TMPD/metrics.txt"
sent=$(metric "$M" veil_sent_bytes_total)
check "veil_sent_bytes_total > 0 after pings" "value '${sent}'" awk -v v="$sent" 'BEGIN { exit !(v + 0 > 0) }'
check "veil_sent_bytes_total is between two status tx_bytes readings around it" \
	"status $tx0 <= metrics '$sent' <= status $tx1 does not hold" \
	awk -v a="$tx0" -v v="$sent" -v b="$tx1" 'BEGIN { exit !(v != "" && a + 0 <= v + 0 && v + 0 <= b + 0) }'
recv=$(metric "$M" veil_received_bytes_total)
check "veil_received_bytes_total > 0" "value '${recv}'" awk -v v="$recv" 'BEGIN { exit !(v + 0 > 0) }'
hs=$(metric "$M" veil_handshakes_total 'result="completed"')
check "veil_handshakes_total{result=\"completed\"} >= 1" "value '${hs}'" awk -v v="$hs" 'BEGIN { exit !(v + 0 >= 1) }'
pub_b=$(pub b)
up=$(metric "$M" veil_peer_up "public_key=\"$pub_b\"")
check "veil_peer_up for b is 1" "value '${up}'" test "$up" = 1
psent=$(metric "$M" veil_peer_sent_bytes_total "public_key=\"$pub_b\"")
check "veil_peer_sent_bytes_total for b > 0" "value '${psent}'" awk -v v="$psent" 'BEGIN { exit !(v + 0 > 0) }'
bi=$(metric "$M" veil_build_info)
check "veil_build_info is 1" "value '${bi}'" test "$bi" = 1
rss=$(metric "$M" process_resident_memory_bytes)
check "process_resident_memory_bytes is plausible (1 MB .. 1 GB)" "value '${rss}'" \
	awk -v v="$rss" 'BEGIN { exit !(v + 0 > 1e6 && v + 0 < 1e9) }'
pup=$(metric "$M" veil_peers 'state="up"')
check "veil_peers{state=\"up\"} is 1" "value '${pup}'" test "$pup" = 1

# ---- /status: the same document as `veil status --json`
r=$(http a GET 127.0.0.1 "$MGMT_PORT" /status "$TMPD/status-http.json")
nsx a timeout --foreground 5 "$VEIL" status --json --control "$(sock a)" >"$TMPD/status-cli.json" 2>&1
check "/status: 200" "got '$r'" test "${r%% *}" = 200
ctype=$(awk '{ print $2 }' <<<"$r")
check "/status: Content-Type application/json" "Content-Type '$ctype'" grep -qi '^application/json' <<<"$ctype"
check "/status: valid JSON" "$(head -c 200 "$TMPD/status-http.json")" quiet jq -e . "$TMPD/status-http.json"
keys_http=$(jq -c 'keys' "$TMPD/status-http.json" 2>/dev/null)
keys_cli=$(jq -c 'keys' "$TMPD/status-cli.json" 2>/dev/null)
check "/status has the same top-level keys as veil status --json" "http $keys_http, cli $keys_cli" \
	test -n "$keys_http" -a "$keys_http" = "$keys_cli"
want='["admission","counters","drops","node","peers","routes","sessions","uptime_seconds","version"]'
# shellcheck disable=SC2016 # $k, $w, $x are jq's
check "/status top-level keys include the contract's" "keys $keys_http" \
	quiet jq -e --argjson w "$want" '(keys) as $k | all($w[]; . as $x | $k | index($x))' "$TMPD/status-http.json"
# the shape: every path with array positions and values left out
shape='[paths | map(if type == "number" then "[]" else . end) | join(".")] | unique'
sh_http=$(jq -c "$shape" "$TMPD/status-http.json" 2>/dev/null)
sh_cli=$(jq -c "$shape" "$TMPD/status-cli.json" 2>/dev/null)
check "/status has the same shape (all nested keys) as veil status --json" \
	"only in http: $(jq -nc --argjson a "${sh_http:-[]}" --argjson b "${sh_cli:-[]}" '$a - $b'), only in cli: $(jq -nc --argjson a "${sh_http:-[]}" --argjson b "${sh_cli:-[]}" '$b - $a')" \
	test -n "$sh_http" -a "$sh_http" = "$sh_cli"
# shellcheck disable=SC2016
check "/status names b as an up peer" "$(jq -c '.peers' "$TMPD/status-http.json" 2>/dev/null | head -c 300)" \
	quiet jq -e --arg k "$pub_b" '.peers | any(.public_key == $k and .state == "up")' "$TMPD/status-http.json"

# ---- other paths and methods
r=$(http_code a GET 127.0.0.1 "$MGMT_PORT" /no-such-path)
check "GET /no-such-path: 404" "got '$r'" test "$r" = 404
r=$(http_code a POST 127.0.0.1 "$MGMT_PORT" /metrics)
check "POST /metrics: 405" "got '$r'" test "$r" = 405

# ---- ACL
r=$(http_code a GET "$UL4_b" "$MGMT_PORT" /healthz)
check "b's mgmt from a's underlay address (outside b's ACL): 403" "got '$r'" test "$r" = 403
r=$(http_code a GET "$UL4_b" "$MGMT_PORT" /metrics)
check "b's /metrics from outside the ACL: 403" "got '$r'" test "$r" = 403
r=$(http_code a GET "$OL4_b" "$MGMT_PORT" /healthz)
check "b's mgmt from a's overlay address $OL4_a (inside the ACL): 200" "got '$r'" test "$r" = 200
r=$(http_code b GET "$UL4_a" "$MGMT_PORT" /healthz)
check "a's mgmt (bound to 127.0.0.1) is not reachable on its underlay address" "got '$r'" test "$r" = refused

# ---- hostile clients (against a)
r=$(nsx a timeout --foreground 15 python3 "$NETNS_DIR/mgmt.py" bigheader 127.0.0.1 "$MGMT_PORT" 16384)
note "16 KiB header: $r"
check "a 16 KiB header gets 431 or a closed connection" "got '$r'" grep -Eq '^(431|closed|reset) ' <<<"$r"
r=$(nsx a timeout --foreground 15 python3 "$NETNS_DIR/mgmt.py" bigheader 127.0.0.1 "$MGMT_PORT" 1048576)
note "1 MiB header: $r"
check "a 1 MiB header gets 431 or a closed connection" "got '$r'" grep -Eq '^(431|closed|reset) ' <<<"$r"
r=$(http_code a GET 127.0.0.1 "$MGMT_PORT" /healthz)
check "/healthz answers after the oversized headers" "got '$r'" test "$r" = 200

r=$(nsx a timeout --foreground 20 python3 "$NETNS_DIR/mgmt.py" idle 127.0.0.1 "$MGMT_PORT" 1 6)
note "1 silent client: $r"
read -r _ hz hz_ms _ ended _ last_ms _ statuses <<<"$r"
check "a silent client does not block /healthz (200 within 1 s)" "got '$r'" \
	test "${hz:-x}" = 200 -a "${hz_ms:-99999}" -lt 1000
check "the server ends a silent client within 4 s (408 or close)" "got '$r'" \
	test "${ended:-}" = 1/1 -a "${last_ms:-99999}" -le 4000
r=$(nsx a timeout --foreground 20 python3 "$NETNS_DIR/mgmt.py" idle 127.0.0.1 "$MGMT_PORT" 8 6)
note "8 silent clients: $r"
read -r _ hz hz_ms _ ended _ last_ms _ statuses <<<"$r"
check "8 silent clients do not block /healthz (200 within 1 s)" "got '$r'" \
	test "${hz:-x}" = 200 -a "${hz_ms:-99999}" -lt 1000
check "the server ends all 8 silent clients within 4 s" "got '$r'" \
	test "${ended:-}" = 8/8 -a "${last_ms:-99999}" -le 4000
note "status codes the silent clients got: $statuses"
# past the daemon's connection cap new connections may be refused while the silent ones are
# held (at most 2 s): reported, not judged; the endpoint must be back once they are gone
r=$(nsx a timeout --foreground 20 python3 "$NETNS_DIR/mgmt.py" idle 127.0.0.1 "$MGMT_PORT" 100 6)
note "100 silent clients: $r"
read -r _ hz hz_ms _ ended _ last_ms _ statuses <<<"$r"
[[ ${hz:-x} == 200 ]] || note "(while 100 silent clients were held /healthz got '$hz': the connection cap is full)"
check "the server ends all 100 silent clients within 5 s" "got '$r'" \
	test "${ended:-}" = 100/100 -a "${last_ms:-99999}" -le 5000
r=$(nsx a timeout --foreground 20 python3 "$NETNS_DIR/mgmt.py" drip 127.0.0.1 "$MGMT_PORT" 0.2 8)
note "a client dripping one header byte every 200 ms: $r"
read -r how ms <<<"$r"
check "a dripping client is ended within 4 s (408 or close)" "got '$r'" \
	test "${how:-open}" != open -a "${ms:-99999}" -le 4000
check "a is alive" "a exited" node_alive a
r=$(http_code a GET 127.0.0.1 "$MGMT_PORT" /healthz)
check "/healthz still 200 after the hostile clients" "got '$r'" test "$r" = 200
check "ping a -> b still works" "no reply within 5 s" ping_ok a "$OL4_b"

# Memory that only grows: 10,000 management and 10,000 control connections, one after another,
# each a full status request. The build sets a 4 MiB gen0 budget and a 256 MiB heap limit, and
# the servers reuse their request buffers, so RSS stays bounded (before both: 64 MB after these).
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/${NODE_PID[a]}/status"; }
rss0=$(rss_kb)
out=$(nsx a timeout --foreground 60 python3 - "$MGMT_PORT" "$(sock a)" <<'PY' 2>&1
import socket, sys
port, path, bad = int(sys.argv[1]), sys.argv[2], 0
def ask(s, req):
    s.sendall(req)
    got = b"".join(iter(lambda: s.recv(65536), b""))
    s.close()
    return got
for _ in range(10000):
    bad += b'"counters"' not in ask(socket.create_connection(("127.0.0.1", port)), b"GET /status HTTP/1.0\r\n\r\n")
for _ in range(10000):
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    bad += b'"counters"' not in ask(s, b"status json\n")
print("bad", bad)
PY
)
rss1=$(rss_kb)
note "a's VmRSS: $rss0 kB before, $rss1 kB after 10,000 management and 10,000 control connections ($out)"
check "every one of the 20,000 status requests was answered" "$out" test "$out" = "bad 0"
check "a's RSS stays <= 32 MiB after 20,000 connections" "VmRSS $rss1 kB" test "${rss1:-999999}" -le 32768

# ---- b with the default ACL: only loopback may ask, even over the tunnel
node_stop b
wait_gone b
node_start b --mgmt "0.0.0.0:$MGMT_PORT"
wait_ready b
wait_mgmt b || die "restarted b's /healthz did not answer 200 within 10 s"
ping_ok a "$OL4_b" 10 || die "no ping a -> restarted b"
r=$(http_code a GET "$OL4_b" "$MGMT_PORT" /healthz)
check "default ACL: b's mgmt from a's overlay address: 403" "got '$r'" test "$r" = 403
r=$(http_code a GET "$UL4_b" "$MGMT_PORT" /status)
check "default ACL: b's /status from a's underlay address: 403" "got '$r'" test "$r" = 403
r=$(http_code b GET 127.0.0.1 "$MGMT_PORT" /healthz)
check "default ACL: b's mgmt from b's loopback: 200" "got '$r'" test "$r" = 200

# ---- --mgmt off: nothing listens
node_stop b
wait_gone b
node_start b --mgmt off
wait_ready b
sleep 0.5
check "--mgmt off: nothing listens on TCP port $MGMT_PORT in b" "$(nsx b ss -Hltn "sport = :$MGMT_PORT")" \
	test -z "$(nsx b ss -Hltn "sport = :$MGMT_PORT")"
finish
