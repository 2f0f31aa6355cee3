#!/usr/bin/env bash
# reload.sh -- configuration hot reload. a runs from a TOML file (--config a.toml) that first
# names only b, while a keeps pinging b through the whole scenario:
#   (0) `veil up --config --check` accepts the file and creates nothing; rejects a broken one
#   (i) `veil reload` with the file unchanged: exit 0, b's session is kept (no new handshake,
#       same latest_handshake, the session only grows older)
#  (ii) peer c added to the file, then SIGHUP (the file's mtime is kept, so only the signal can
#       have done it): a reaches c over IPv4 and IPv6, b's session untouched
# (iii) a syntax error, a wrong type and an unknown key: `veil reload` exits 2 naming
#       a.toml:LINE (and the key); the file watcher sees the broken file too; a still
#       talks to b and c exactly as before
#  (iv) a non-reloadable key changed (listen, then tun) next to a reloadable one: exit 3,
#       nothing applied (the reloadable value is not taken, a still listens where it did)
#   (v) the file edited (listen back, handshake_rate, keepalive, log_level) and nothing
#       else done: the daemon picks it up by itself within 6 s
#  (vi) peer c removed, `veil reload`: a no longer reaches c, b untouched
# At the end: the background ping a -> b lost at most one echo in all of this.
#
#   veil-t-$$-b                       veil-t-$$-a                         veil-t-$$-c
#   veil-b 100.64.0.2  <== tunnel ==  veil-a 100.64.0.1  == tunnel ==>   veil-c 100.64.0.3
#   (flags)                           (--config a.toml)                  (flags; a without endpoint)
#   veth0 198.51.100.2 <-- veth -->   veth0 198.51.100.1
#                                     veth1 203.0.113.1  <-- veth -->    veth0 203.0.113.3
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
net_add_c a
keys_make a b c
CFG="$TMPD/a.toml"

# cfg_text [PEERS] -- a.toml with the knobs below; PEERS is "b" or "b c"
C_LISTEN="0.0.0.0:$PORT" C_TUN=$TUN_a C_RATE=100 C_KEEPALIVE=0 C_LOGLEVEL=info C_EXTRA=''
cfg_text() {
	local peers=${1:-b}
	{
		echo "# a.toml -- written by reload.sh"
		echo "key = \"$TMPD/a.key\""
		echo "listen = \"$C_LISTEN\""
		echo "address = [\"$OL4_a/24\", \"$OL6_a/64\"]"
		echo "tun = \"$C_TUN\""
		echo "control = \"$(sock a)\""
		echo "mgmt = \"127.0.0.1:$MGMT_PORT\"   # each namespace has its own loopback"
		echo "keepalive = $C_KEEPALIVE"
		echo "handshake_rate = $C_RATE"
		echo "log_level = \"$C_LOGLEVEL\""
		[[ -n "$C_EXTRA" ]] && printf '%s\n' "$C_EXTRA"
		echo
		echo "[[peer]]"
		echo "name = \"b\""
		echo "public_key = \"$(pub b)\""
		echo "endpoint = \"$UL4_b:$PORT\""
		echo "allowed_ips = [\"$OL4_b/32\", \"$OL6_b/128\"]"
		if [[ $peers == *c* ]]; then
			echo
			echo "[[peer]]  # added by step (ii)"
			echo "name = \"c\""
			echo "public_key = \"$(pub c)\""
			echo "endpoint = \"$UL4_c:$PORT\""
			echo "allowed_ips = [\"$OL4_c/32\", \"$OL6_c/128\"]"
		fi
	}
}
# write_cfg [PEERS] -- a.toml rewritten in place (same inode, in one write)
write_cfg() {
	local text
	text=$(cfg_text "$@")
	printf '%s\n' "$text" >"$CFG"
}
# extra_line -- the line number a C_EXTRA line gets (right after the fixed top-level keys)
extra_line() { echo $(($(C_EXTRA='' cfg_text b | grep -n '^log_level' | cut -d: -f1) + 1)); }

# reload -- `veil reload` for a; sets RL_RC and RL_OUT
reload() {
	RL_OUT=$(nsx a timeout --foreground 10 "$VEIL" reload --control "$(sock a)" 2>&1)
	RL_RC=$?
}
# peer NODE NAME FIELD -- FIELD of the peer called NAME in NODE's status
peer() { st "$1" ".peers[] | select(.name == \"$2\") | .$3"; }
snap_b() { echo "$(peer a b handshakes)/$(peer a b latest_handshake)"; }
snap_c() { echo "$(peer a c handshakes)/$(peer a c latest_handshake)"; }
# shellcheck disable=SC2317 # called through check
# same SNAP0 SNAP1 -- equal handshakes/latest_handshake snapshots of a real session
same() { [[ $1 =~ ^[0-9]+/[1-9][0-9]*$ && $1 == "$2" ]]; }
# shellcheck disable=SC2317
# num_eq A B -- both the same integer
num_eq() { [[ $1 =~ ^[0-9]+$ && $1 == "$2" ]]; }
npeers() { st a '.peers | length'; }
# why S0 S1 -- the reason text for a failed `same`
why() {
	local r="handshakes/latest_handshake $1 -> $2"
	if [[ ${1%%/*} == "${2%%/*}" && -n ${1#*/} && -n ${2#*/} ]] && ((${1#*/} - ${2#*/} == 1 || ${2#*/} - ${1#*/} == 1)); then
		r+=" (same handshake count, latest_handshake moved by 1 s: the Unix time is derived from"
		r+=" the monotonic age and jitters)"
	fi
	echo "$r"
}
# alive STEP -- stop here if a died (what follows would only repeat that)
alive() { node_alive a || die "a exited during step $1 (exit status unknown; see its log)"; }

# ---- (0) --check
write_cfg b
nsx a timeout --foreground 10 "$VEIL" up --config "$CFG" --check >"$TMPD/check.out" 2>&1
rc=$?
check "(0) up --config a.toml --check: exit 0" "exit $rc: $(head -c 300 "$TMPD/check.out")" test "$rc" -eq 0
check "(0) --check created no TUN" "$TUN_a exists" tun_gone a
check "(0) --check created no control socket" "$(sock a) exists" test ! -e "$(sock a)"
L=$(extra_line)
C_EXTRA='mtu = = 1400' write_cfg b
nsx a timeout --foreground 10 "$VEIL" up --config "$CFG" --check >"$TMPD/check.out" 2>&1
rc=$?
check "(0) --check with a syntax error on line $L: exit 2 naming a.toml:$L" "exit $rc: $(head -c 300 "$TMPD/check.out")" \
	test "$rc" -eq 2 -a "$(grep -c "a.toml:$L" "$TMPD/check.out")" -ge 1
write_cfg b

# ---- start: a from the file, b and c from flags (c is not yet a peer of a)
node_start b
# c knows a without an endpoint: it never starts a handshake itself, so every handshake
# between a and c is one a started after learning about c
node_run c up --key "$TMPD/c.key" --listen "$UL4_c:$PORT" --address "$OL4_c/24" --address "$OL6_c/64" \
	--tun "$TUN_c" --peer "$(pub a)" --allow "$OL4_a/32" --allow "$OL6_a/128" \
	--control "$(sock c)" --log-level "${VEIL_LOG_LEVEL:-info}"
node_run a up --config "$CFG"
wait_ready a b c
ping_ok a "$OL4_b" || die "no ping a -> b"
check "a runs from the file: its peer is named b and up" "peer b: '$(peer a b state)'" test "$(peer a b state)" = up

ip netns exec "$NS_a" timeout --foreground 150 ping -O -i 0.2 -W 1 "$OL4_b" >"$TMPD/bgping.out" 2>&1 </dev/null &
bg_ping=$!
sleep 2 # both sides may start a handshake at start-up: let the second one settle

# ---- (i) unchanged file
s0=$(snap_b) hsn0=$(st a '.counters.handshakes_completed')
age0=$(st a '[.sessions[] | select(.peer == "b" and .slot == "current") | .age_seconds][0]')
sleep 1.1 # a whole second, so a kept session is visibly older
reload
check "(i) veil reload, file unchanged: exit 0" "exit $RL_RC: $RL_OUT" test "$RL_RC" -eq 0
sleep 1
s1=$(snap_b) hsn1=$(st a '.counters.handshakes_completed')
age1=$(st a '[.sessions[] | select(.peer == "b" and .slot == "current") | .age_seconds][0]')
check "(i) b: no new handshake, same latest_handshake" "$(why "$s0" "$s1")" same "$s0" "$s1"
check "(i) no handshake completed anywhere" "handshakes_completed $hsn0 -> $hsn1" num_eq "$hsn0" "$hsn1"
check "(i) b's current session kept (older, not renewed)" "age_seconds $age0 -> $age1" \
	test -n "$age0" -a "$age0" != null -a "${age1:-0}" -gt "${age0:-0}" 2>/dev/null
check "(i) ping a -> b" "no reply within 5 s" ping_ok a "$OL4_b"
alive "(i)"

# ---- (ii) peer c added, SIGHUP
mtime=$(stat -c %Y "$CFG")
write_cfg "b c"
touch -d "@$mtime" "$CFG" # only the signal may pick this up
kill -HUP "${NODE_PID[a]}"
sleep 0.2
alive "(ii) (SIGHUP)"
ok_c=0
for ((i = 0; i < 10; i++)); do
	if ping_ok a "$OL4_c" 1; then ok_c=1; break; fi
done
check "(ii) after SIGHUP a reaches the added peer c (IPv4, within 10 s)" "no reply" test "$ok_c" -eq 1
check "(ii) ping a -> c IPv6" "no reply within 5 s" ping_ok a "$OL6_c"
check "(ii) ping c -> a" "no reply within 5 s" ping_ok c "$OL4_a"
check "(ii) a has two peers" "peers: $(st a '[.peers[].name] | join(",")')" test "$(npeers)" = 2
s2=$(snap_b)
check "(ii) b's session untouched" "$(why "$s0" "$s2")" same "$s0" "$s2"
alive "(ii)"
sc=$(snap_c)
sleep 1.1

# ---- (iii) broken files
bad() { # bad LABEL EXTRA-LINE KEY -- write it, veil reload, expect exit 2 naming a.toml:LINE (and KEY)
	local label=$1 line key=$3
	line=$(extra_line)
	C_EXTRA=$2 write_cfg "b c"
	reload
	check "(iii) $label: veil reload exits 2" "exit $RL_RC: $RL_OUT" test "$RL_RC" -eq 2
	check "(iii) $label: the error names a.toml:$line" "said: $RL_OUT" grep -q "a.toml:$line" <<<"$RL_OUT"
	if [[ -n "$key" ]]; then
		check "(iii) $label: the error names the key '$key'" "said: $RL_OUT" grep -q "$key" <<<"$RL_OUT"
	fi
	note "$label: $RL_OUT"
}
bad "syntax error" 'keepalive = = 5' ''
bad "wrong type" 'max_sessions = "many"' max_sessions
bad "unknown key" 'no_such_key = 1' no_such_key
sleep 2.5 # the file watcher (2 s poll) meets the last broken file as well
alive "(iii)"
check "(iii) a still has b and c" "peers: $(st a '[.peers[].name] | join(",")')" test "$(npeers)" = 2
s3=$(snap_b) sc3=$(snap_c)
check "(iii) b's session untouched" "$(why "$s0" "$s3")" same "$s0" "$s3"
check "(iii) c's session untouched" "$(why "$sc" "$sc3")" same "$sc" "$sc3"
check "(iii) ping a -> b" "no reply within 5 s" ping_ok a "$OL4_b"
check "(iii) ping a -> c" "no reply within 5 s" ping_ok a "$OL4_c"
grep -q "a.toml:" "${NODE_LOG[a]}" && note "a's log: $(grep "a.toml:" "${NODE_LOG[a]}" | tail -n 1)"

# ---- (iv) non-reloadable keys
rate0=$(st a '.admission.handshake_rate')
C_LISTEN="0.0.0.0:$((PORT + 1))" C_RATE=55 write_cfg "b c"
reload
check "(iv) listen changed (+ handshake_rate): veil reload exits 3" "exit $RL_RC: $RL_OUT" test "$RL_RC" -eq 3
note "listen changed: $RL_OUT"
grep -q listen <<<"$RL_OUT" || note "(the message does not name 'listen')"
rate1=$(st a '.admission.handshake_rate')
check "(iv) nothing applied: handshake_rate stays $rate0" "handshake_rate $rate0 -> $rate1" num_eq "$rate0" "$rate1"
check "(iv) a still listens on UDP $PORT, not $((PORT + 1))" "$(nsx a ss -Hluan | awk '{ print $4 }' | tr '\n' ' ')" \
	test -n "$(nsx a ss -Hlun "sport = :$PORT")" -a -z "$(nsx a ss -Hlun "sport = :$((PORT + 1))")"
C_LISTEN="0.0.0.0:$PORT" C_TUN=veil-z C_RATE=55 write_cfg "b c"
reload
check "(iv) tun changed: veil reload exits 3" "exit $RL_RC: $RL_OUT" test "$RL_RC" -eq 3
check "(iv) the TUN is still $TUN_a and no veil-z exists" "links: $(ip -n "$NS_a" -br link | awk '{ print $1 }' | tr '\n' ' ')" \
	test -n "$(ip -n "$NS_a" link show dev "$TUN_a" 2>/dev/null)" -a -z "$(ip -n "$NS_a" link show dev veil-z 2>/dev/null)"
rate1=$(st a '.admission.handshake_rate')
check "(iv) handshake_rate still $rate0" "handshake_rate $rate0 -> $rate1" num_eq "$rate0" "$rate1"
s4=$(snap_b)
check "(iv) b's session untouched" "$(why "$s0" "$s4")" same "$s0" "$s4"
check "(iv) ping a -> c" "no reply within 5 s" ping_ok a "$OL4_c"
alive "(iv)"
sleep 1.1

# ---- (v) edit only; the watcher applies it
C_TUN=$TUN_a C_RATE=77 C_KEEPALIVE=9 C_LOGLEVEL=debug write_cfg "b c"
t0=$(now_ms)
seen=0
for ((i = 0; i < 60; i++)); do
	[[ $(st a '.admission.handshake_rate') == 77 ]] && { seen=1; break; }
	sleep 0.1
done
t=$(($(now_ms) - t0))
check "(v) an edited file is applied without a command within 6 s" \
	"handshake_rate still $(st a '.admission.handshake_rate') after ${t} ms" test "$seen" -eq 1
((seen)) && note "the watcher applied the edit after ${t} ms"
ka=$(peer a b keepalive_seconds)
check "(v) keepalive 9 applies to b" "b's keepalive_seconds '$ka'" test "$ka" = 9
s5=$(snap_b)
check "(v) b's session untouched" "$(why "$s0" "$s5")" same "$s0" "$s5"
alive "(v)"
sleep 1.1

# ---- (vi) peer c removed
C_RATE=77 C_KEEPALIVE=9 C_LOGLEVEL=debug write_cfg b
reload
check "(vi) c removed: veil reload exits 0" "exit $RL_RC: $RL_OUT" test "$RL_RC" -eq 0
check "(vi) a has one peer" "peers: $(st a '[.peers[].name] | join(",")')" test "$(npeers)" = 1
check "(vi) a no longer reaches c" "ping a -> c still answered" bash -c "! ip netns exec $NS_a ping -c 2 -i 0.3 -W 1 -q $OL4_c >/dev/null 2>&1"
s6=$(snap_b)
check "(vi) b's session untouched" "$(why "$s0" "$s6")" same "$s0" "$s6"
check "(vi) ping a -> b" "no reply within 5 s" ping_ok a "$OL4_b"

# ---- the background ping
kill -INT "$bg_ping" 2>/dev/null
wait "$bg_ping" 2>/dev/null
sum=$(grep -E 'packets transmitted' "$TMPD/bgping.out")
tx=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' <<<"$sum")
rx=$(sed -n 's/.* \([0-9]*\) received.*/\1/p' <<<"$sum")
note "background ping a -> b: ${sum:-no summary}"
check "background ping a -> b lost at most 1 echo through all reloads" "$sum" \
	test "${tx:-0}" -ge 20 -a $((${tx:-0} - ${rx:-0})) -le 1
check "a is alive at the end" "a exited" node_alive a
note "a's log: $(grep -c 'level=debug' "${NODE_LOG[a]}") debug lines after log_level = \"debug\" (v);" \
	"reload events: $(grep -o 'event=reload[a-z_]* trigger=[a-z_]*' "${NODE_LOG[a]}" | awk '{ print $1 "/" $2 }' | sed 's/event=//; s/trigger=//' | tr '\n' ' ')"
finish
