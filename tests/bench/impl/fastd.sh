# shellcheck shell=bash
# fastd: fastd (Debian's, v22) in TUN mode with one peer, its recommended method salsa2012+umac
# (FASTD_METHOD overrides, e.g. aes128-gcm), "secure handshakes", MTU 1420. The anchor with the
# lowest idle latency in the shared runs (issue 14's latency targets compare against it).
UDP_PORT=10000
FD_A=fdb${RUN_ID}a FD_B=fdb${RUN_ID}b

fastd_conf() { # fastd_conf SIDE DEV LOCAL REMOTE PEER-SIDE
	cat <<CONF
log level warn;
interface "$2";
mode tun;
method "${FASTD_METHOD:-salsa2012+umac}";
secure handshakes yes;
secret "$(<"$STATE/$1.secret")";
bind $3:$UDP_PORT;
mtu 1420;
peer "$5" {
	key "$(<"$STATE/$5.pub")";
	remote $4:$UDP_PORT;
}
CONF
}

fastd_side() { # fastd_side NS DEV OL4 OL6
	until_ok 100 ip -n "$1" link show dev "$2" || { show_logs; fail "fastd did not create $2"; }
	ip -n "$1" addr add "$3/$OL4_LEN" dev "$2"
	ip -n "$1" -6 addr add "$4/$OL6_LEN" dev "$2" nodad
	ip -n "$1" link set "$2" up
}

impl_up() {
	command -v fastd >/dev/null || fail "fastd missing (apt-get install fastd)"
	local s
	for s in a b; do
		(umask 077 && fastd --generate-key --machine-readable >"$STATE/$s.secret") || fail "fastd --generate-key"
		printf 'secret "%s";\n' "$(<"$STATE/$s.secret")" >"$STATE/$s.key.conf"
		fastd --config "$STATE/$s.key.conf" --show-key --machine-readable >"$STATE/$s.pub" || fail "fastd --show-key"
	done
	fastd_conf a "$FD_A" "$UL4_A" "$EP_OF_B" b >"$STATE/a.conf"
	fastd_conf b "$FD_B" "$UL4_B" "$EP_OF_A" a >"$STATE/b.conf"
	# b first, and listening, before a: a handshake that finds no socket is retried only after ~20 s
	spawn fastd-b "$NS_B" fastd --config "$STATE/b.conf"
	until_ok 50 bash -c "ip netns exec $NS_B ss -Hlun 'sport = :$UDP_PORT' | grep -q ." || { show_logs; fail "fastd b does not listen"; }
	spawn fastd-a "$NS_A" fastd --config "$STATE/a.conf"
	fastd_side "$NS_A" "$FD_A" "$OL4_A" "$OL6_A"
	fastd_side "$NS_B" "$FD_B" "$OL4_B" "$OL6_B"
}
