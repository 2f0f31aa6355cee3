#!/usr/bin/env bash
# badflags.sh -- every bad flag, file or value: exit status 2, exactly one line on
# stderr, and nothing created (no TUN, no control socket). Runs veil up inside
# namespace a; the peer address 198.51.100.2 is b's, where nothing listens.
#
#   veil-t-$$-a                              veil-t-$$-b
#   veil up <bad flags> (must not start)     (idle)
#   veth0 198.51.100.1             <-veth->  veth0 198.51.100.2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
keys_make a b
BAD_TUN=veil-bad
SOCK="$TMPD/bad.sock"
KEY="$TMPD/a.key"
PEER="$(pub b)@$UL4_b:$PORT"
ERR="$TMPD/stderr"
printf 'AAAA\n' >"$TMPD/short.key" && chmod 600 "$TMPD/short.key"
cp "$KEY" "$TMPD/open.key" && chmod 644 "$TMPD/open.key"
"$VEIL" genpsk >"$TMPD/open.psk" && chmod 644 "$TMPD/open.psk"

links() { ip -n "$NS_a" -o link show | awk -F': ' '{ print $2 }' | sort | tr '\n' ' '; }
BASE_LINKS=$(links)

# up_with ARGS... -- veil up with ARGS, in namespace a, bounded to 5 s; sets RC
up_with() {
	nsx a timeout --foreground 5 "$VEIL" up "$@" >/dev/null 2>"$ERR"
	RC=$?
}

# leftovers -- describe whatever the last run left behind (empty if nothing)
leftovers() {
	local l=''
	[[ "$(links)" == "$BASE_LINKS" ]] || l+="links now: $(links); "
	[[ -e $SOCK ]] && l+="control socket $SOCK exists; "
	printf '%s' "$l"
}

# bad NAME ARGS... -- veil up ARGS must fail cleanly
bad() {
	local name=$1; shift
	up_with "$@"
	local lines why=''
	lines=$(grep -c '' "$ERR")
	((RC == 2)) || why+="exit status $RC (want 2); "
	((lines == 1)) || why+="$lines stderr lines (want 1); "
	why+=$(leftovers)
	if [[ -z $why ]]; then
		ok "$name"
		note "  $(head -n 1 "$ERR")"
	else
		not_ok "$name" "${why%; }"
		sed 's/^/#   stderr: /' "$ERR" | head -n 5
		ip -n "$NS_a" link del "$BAD_TUN" 2>/dev/null
		rm -f "$SOCK"
	fi
}

# the baseline must be accepted, or every case below would fail for the wrong reason
up_with --key "$KEY" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --allow 100.64.0.2/32 --control "$SOCK"
check "valid flags start the daemon (runs until timeout)" "exit status $RC, stderr: $(head -n 1 "$ERR")" \
	test "$RC" -eq 124
check "valid run leaves nothing behind after SIGTERM" "$(leftovers)" test -z "$(leftovers)"
rm -f "$SOCK"

bad "unknown flag" --key "$KEY" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --control "$SOCK" --frobnicate
bad "missing --key" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --control "$SOCK"
bad "key file mode 0644" --key "$TMPD/open.key" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --control "$SOCK"
bad "malformed key file" --key "$TMPD/short.key" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --control "$SOCK"
bad "missing key file" --key "$TMPD/nonexistent.key" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --control "$SOCK"
bad "psk file mode 0644" --key "$KEY" --psk "$TMPD/open.psk" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --control "$SOCK"
bad "--address 100.64.0.1/33" --key "$KEY" --address 100.64.0.1/33 --tun "$BAD_TUN" --peer "$PEER" --control "$SOCK"
bad "--allow foo" --key "$KEY" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --allow foo --control "$SOCK"
bad "--allow before any --peer" --key "$KEY" --address 100.64.0.1/24 --tun "$BAD_TUN" --allow 100.64.0.2/32 --peer "$PEER" --control "$SOCK"
bad "--peer without port" --key "$KEY" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$(pub b)@$UL4_b" --control "$SOCK"
bad "--peer with broken brackets" --key "$KEY" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$(pub b)@[$UL6_b:$PORT" --control "$SOCK"
bad "--peer with a malformed public key" --key "$KEY" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "not-a-key@$UL4_b:$PORT" --control "$SOCK"
bad "--mtu 10" --key "$KEY" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --mtu 10 --control "$SOCK"
bad "--log-level loud" --key "$KEY" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --log-level loud --control "$SOCK"
bad "--listen port 99999" --key "$KEY" --listen 192.0.2.1:99999 --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --control "$SOCK"
bad "--rekey-after abc" --key "$KEY" --address 100.64.0.1/24 --tun "$BAD_TUN" --peer "$PEER" --rekey-after abc --control "$SOCK"

size=$(stat -c %s "$VEIL")
check "the binary is at most 4 MiB (a router's flash)" "$size bytes" test "$size" -le 4194304
# other verbs
nsx a timeout --foreground 5 "$VEIL" frobnicate >/dev/null 2>"$ERR"
rc=$? lines=$(grep -c '' "$ERR")
check "unknown command: exit 2, one stderr line" "exit $rc, $lines lines" test "$rc/$lines" = 2/1
nsx a timeout --foreground 5 "$VEIL" status --frobnicate --control "$SOCK" >/dev/null 2>"$ERR"
rc=$? lines=$(grep -c '' "$ERR")
check "status with an unknown flag: exit 2, one stderr line" "exit $rc, $lines lines" test "$rc/$lines" = 2/1
nsx a timeout --foreground 5 "$VEIL" status --control "$TMPD/nobody.sock" >/dev/null 2>"$ERR"
rc=$?
check "status without a daemon: exit 1" "exit $rc" test "$rc" -eq 1
finish
