#!/usr/bin/env bash
# confirm.sh -- safe remote changes: `veil reload --confirm SECONDS` opens a window; what is
# applied in it goes back unless `veil confirm` comes in time (as Junos' commit confirmed).
# a runs from a.toml naming b; b runs from flags. The operator reaches a through the tunnel.
#   (i)  window opened (10 s), then a.toml edited to drop b -- the file watcher applies it and
#        the tunnel to b is gone; nobody confirms: within the window plus a few seconds the
#        daemon writes the old text back, reloads, logs reload_rolled_back, and b answers again
#   (ii) window opened, a.toml edited (a keepalive of 7 s for b), `veil confirm`: past the
#        window the change stays, the file keeps it, nothing is rolled back
#   (iii) `veil confirm` with no window: exit 2; --confirm 5 (under 10 s): exit 2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
keys_make a b
CFG="$TMPD/a.toml"
# cfg_text WITH_B KEEPALIVE
cfg_text() {
	echo "key = \"$TMPD/a.key\""
	echo "listen = \"$UL4_a:$PORT\""
	echo "address = [\"$OL4_a/24\", \"$OL6_a/64\"]"
	echo "tun = \"$TUN_a\""
	echo "control = \"$(sock a)\""
	echo "mgmt = \"off\""
	if [[ $1 == yes ]]; then
		printf '\n[[peer]]\nname = "b"\npublic_key = "%s"\nendpoint = "%s"\nallowed_ips = ["%s/32"]\nkeepalive = %s\n' \
			"$(pub b)" "$UL4_b:$PORT" "$OL4_b" "$2"
	fi
}
cfg_text yes 0 >"$CFG"
ORIGINAL=$(cat "$CFG")
node_run a up --config "$CFG"
node_start b
wait_ready a b
ping_within a "$OL4_b" 10 || die "no ping a -> b"
vc() { nsx a timeout --foreground 15 "$VEIL" "$@" --control "$(sock a)"; }

# ---- (i) not confirmed: rolled back
out=$(vc reload --confirm 10 2>&1)
rc=$?
check "(i) reload --confirm 10: exit 0, says how to keep it" "exit $rc: $out" \
	bash -c '[[ $1 == 0 && $2 == *"confirm within 10 s with '"'"'veil confirm'"'"'"* ]]' _ "$rc" "$out"
cfg_text no 0 >"$CFG"
gone() { ! ping_ok a "$OL4_b" 1; }
wait_until 8 gone
check "(i) the edit that drops b applies by itself: no ping to b" "b still answers after ${WAITED_MS} ms" gone
t0=$(now_ms)
wait_log a 'event=reload_rolled_back' 15
check "(i) not confirmed: the daemon rolls back (reload_rolled_back logged)" "not in the log after $(($(now_ms) - t0)) ms" \
	grep -q 'event=reload_rolled_back' "${NODE_LOG[a]}"
note "(i) rolled back $(($(now_ms) - t0)) ms after b was gone"
ping_within a "$OL4_b" 10
check "(i) after the rollback b answers again" "no ping within 10 s" test $? = 0
check "(i) the file holds the text from before the window" "$(diff <(echo "$ORIGINAL") "$CFG" | head -5)" \
	test "$(cat "$CFG")" = "$ORIGINAL"

# ---- (ii) confirmed: stays
out=$(vc reload --confirm 10 2>&1)
check "(ii) a second window opens" "$out" grep -q 'confirm within 10 s' <<<"$out"
cfg_text yes 7 >"$CFG"
keep7() { [[ $(st a '.peers[] | select(.name == "b") | .keepalive_seconds') == 7 ]]; }
wait_until 8 keep7
check "(ii) the edit (keepalive 7) applies" "keepalive $(st a '.peers[0].keepalive_seconds')" keep7
out=$(vc confirm 2>&1)
rc=$?
check "(ii) veil confirm: exit 0" "exit $rc: $out" test "$rc" = 0
sleep 11
check "(ii) past the window the change stays" "keepalive $(st a '.peers[0].keepalive_seconds')" keep7
check "(ii) nothing was rolled back" "$(grep -c 'event=reload_rolled_back' "${NODE_LOG[a]}") rollbacks in the log" \
	test "$(grep -c 'event=reload_rolled_back' "${NODE_LOG[a]}")" = 1
check "(ii) the file keeps the change" "$(grep keepalive "$CFG")" grep -q '^keepalive = 7$' "$CFG"
ping_within a "$OL4_b" 5
check "(ii) b still answers" "no ping" test $? = 0

# ---- (iii) bad requests change nothing
out=$(vc confirm 2>&1)
rc=$?
check "(iii) confirm without a window: exit 2, one line" "exit $rc: $out" test "$rc/$(grep -c '' <<<"$out")" = 2/1
out=$(vc reload --confirm 5 2>&1)
rc=$?
check "(iii) reload --confirm 5: exit 2 (10 to 3600 s)" "exit $rc: $out" test "$rc" = 2
finish
