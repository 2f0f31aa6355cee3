#!/usr/bin/env bash
# health.sh -- status an operator or a watchdog reads at a glance, from real binaries.
# a starts alone (b configured but not running) with --healthz-grace 4 and --keepalive 1:
# `veil status` and `veil health` exit 3, /healthz answers 200 within the grace time and 503
# with the reason after it. b starts: everything turns healthy (exit 0, 200), the text status
# shows the RTT line, --short one line for b, --dump tab-separated fields awk can read, the
# JSON rtt_ms a number and never-values null; --hook programs run for peer_up, route_added and
# peer_down with the fields in the environment. b is killed: a marks it down after three missed
# keepalives, status exits 3 again, and /healthz returns to 503 once the grace time passed.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

command -v python3 >/dev/null || die "missing python3 (make deps)"

net_setup
keys_make a b
# a hook for three events: argv and environment go to a file (no shell runs it: the program does)
HOOKED="$TMPD/hooked"
printf '#!/bin/sh\necho "$1 $VEIL_EVENT ${VEIL_PEER:-} ${VEIL_PREFIX:-}" >>%s\n' "$HOOKED" >"$TMPD/hook.sh"
chmod 700 "$TMPD/hook.sh"
node_start a --mgmt "127.0.0.1:$MGMT_PORT" --healthz-grace 4 --keepalive 1 \
	--hook "peer_up=$TMPD/hook.sh" --hook "peer_down=$TMPD/hook.sh" --hook "route_added=$TMPD/hook.sh"
wait_ready a
vs() { nsx a timeout --foreground 5 "$VEIL" "$@" --control "$(sock a)"; }
B="$TMPD/body"

# ---- alone: nothing is up
vs status >"$TMPD/st.txt" 2>&1
rc=$?
check "no peer up: veil status exits 3" "exit $rc" test "$rc" = 3
check "no peer up: the text says so" "$(head -c 300 "$TMPD/st.txt")" grep -q '^  warning: no peer up$' "$TMPD/st.txt"
out=$(vs health 2>&1)
rc=$?
check "no peer up: veil health exits 3, 'down: no peer up'" "exit $rc: $out" test "$rc" = 3 -a "${out#down: no peer up}" != "$out"
r=$(http a GET 127.0.0.1 "$MGMT_PORT" /healthz "$B")
check "/healthz within the grace time: 200" "got '$r' ($(head -c 80 "$B"))" test "${r%% *}" = 200
healthz_503() { r=$(http a GET 127.0.0.1 "$MGMT_PORT" /healthz "$B"); [[ ${r%% *} == 503 ]]; }
wait_until 10 healthz_503
check "/healthz after the grace time: 503" "last '$r' after ${WAITED_MS} ms" healthz_503
check "/healthz 503 says why" "body '$(head -c 80 "$B")'" grep -q '^unhealthy: no peer up for [0-9]' "$B"
note "/healthz turned 503 after ${WAITED_MS} ms (grace 4 s from the start)"

# ---- b comes: healthy
node_start b --keepalive 1
wait_ready b
ping_within a "$OL4_b" 10 || die "no ping a -> b"
name_b=$(st a '.peers[0].name')
hooked() { grep -q "^$1" "$HOOKED" 2>/dev/null; }
wait_until 5 hooked "peer_up peer_up $name_b"
check "hook: peer_up ran with the peer's name (argv and VEIL_PEER)" "$(cat "$HOOKED" 2>&1)" hooked "peer_up peer_up $name_b "
check "hook: route_added ran for b's /32 at start" "$(cat "$HOOKED" 2>&1)" hooked "route_added route_added  $OL4_b/32"
vs status >"$TMPD/st.txt" 2>&1
rc=$?
check "b up: veil status exits 0" "exit $rc" test "$rc" = 0
check "b up: 'peers: 1 of 1 up'" "$(head -c 600 "$TMPD/st.txt")" grep -q '^  peers: 1 of 1 up$' "$TMPD/st.txt"
check "b up: the text status has an rtt line" "$(head -c 900 "$TMPD/st.txt")" grep -Eq '^  rtt: [0-9.]+ ms \(latest handshake\)$' "$TMPD/st.txt"
check "b up: transfer in IEC units" "$(grep transfer "$TMPD/st.txt")" \
	grep -Eq '^  transfer: [0-9.]+ (B|KiB|MiB) received, [0-9.]+ (B|KiB|MiB) sent$' "$TMPD/st.txt"
out=$(vs health 2>&1)
check "b up: veil health exits 0" "'$out'" test "$out" = "ok: 1 of 1 peers up"
r=$(http a GET 127.0.0.1 "$MGMT_PORT" /healthz "$B")
check "b up: /healthz 200" "got '$r'" test "${r%% *}" = 200
doc=$(nsx a timeout --foreground 10 "$VEIL" doctor --key "$TMPD/a.key" --address "$OL4_a/24" --listen "$UL4_a:$PORT" --control "$(sock a)" 2>&1)
check "doctor asks the running daemon: its peer is up; the port is the daemon's own" "$doc" \
	bash -c 'grep -q "^ok   daemon: running; 1 of 1 peers up$" <<<"$1" && grep -q "^ok   port: udp '"$PORT"' is used by the running veil" <<<"$1"' _ "$doc"
vs status --short >"$TMPD/short.txt" 2>&1
check "--short: a node line and one line for b, up and direct" "$(cat "$TMPD/short.txt")" \
	awk -v a="$OL4_b" 'NR == 1 && /^# veil-a .*1 of 1 peers up/ { h = 1 } NR == 2 && $1 == a && $3 == "up" && $4 == "direct" { p = 1 } END { exit !(h && p && NR == 2) }' "$TMPD/short.txt"
vs status --dump >"$TMPD/dump.txt" 2>&1
pub_b=$(pub b)
check "--dump: busybox-style awk finds b up with its key and 13 fields" "$(cat -A "$TMPD/dump.txt" | head -c 400)" \
	awk -F'\t' -v k="$pub_b" '$1 == "node" && NF == 8 && $6 == 1 { n = 1 } $1 == "peer" && NF == 13 && $3 == k && $6 == "up" && $11 ~ /^[0-9]+$/ { p = 1 } END { exit !(n && p) }' "$TMPD/dump.txt"
vs status --json >"$TMPD/st.json" 2>/dev/null
check "JSON: rtt_ms a number, peers_up 1, no warnings, the cipher as --cipher spells it" "$(jq -c '{peers_up, warnings, p: .peers[0] | {rtt_ms, aead}}' "$TMPD/st.json" 2>&1)" \
	quiet jq -e '.peers_up == 1 and .warnings == [] and (.peers[0].rtt_ms | type) == "number" and (.peers[0].aead | test("^(chacha20-poly1305|aes-256-gcm)$"))' "$TMPD/st.json"
note "rtt a -> b: $(jq -r '.peers[0].rtt_ms' "$TMPD/st.json") ms"

# ---- b is gone: down again after three missed keepalives, then 503 after the grace time
kill -KILL "${NODE_PID[b]}"
wait "${NODE_PID[b]}" 2>/dev/null
unset "NODE_PID[b]"
status_3() { vs status >/dev/null 2>&1; [[ $? == 3 ]]; }
wait_until 10 status_3
check "b killed: veil status exits 3 again" "after ${WAITED_MS} ms" status_3
wait_until 5 hooked "peer_down peer_down $name_b"
check "hook: peer_down ran once b was marked down" "$(cat "$HOOKED" 2>&1)" hooked "peer_down peer_down $name_b "
r=$(http a GET 127.0.0.1 "$MGMT_PORT" /healthz "$B")
check "b just down: /healthz still 200 (within the grace time)" "got '$r' ($(head -c 80 "$B"))" test "${r%% *}" = 200
wait_until 10 healthz_503
check "b down past the grace time: /healthz 503" "last '$r' after ${WAITED_MS} ms" healthz_503
vs status --json >"$TMPD/st.json" 2>/dev/null
check "b down: the JSON warns 'no peer up', b's state down" "$(jq -c '{warnings, s: .peers[0].state}' "$TMPD/st.json" 2>&1)" \
	quiet jq -e '.warnings == ["no peer up"] and .peers[0].state != "up"' "$TMPD/st.json"
finish
