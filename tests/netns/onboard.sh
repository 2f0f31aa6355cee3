#!/usr/bin/env bash
# onboard.sh -- a node joins with `veil invite` / `veil join` alone: a runs from a config made by
# `veil init` (plus a network secret), issues a token, b joins with it (key, config, network
# secret all written by `join`), starts, and pings a. The token works once, a changed token is
# refused, and an expired one too; the joiner names a as a names itself, and a's peer_joined hook
# runs. A pending invite survives a's restart (veil.invites), which also tries --fix-rp-filter
# (rp_filter 1 -> 2 on a's TUN; "all" untouched). Then a runs as --user nobody: its routes still follow reloads
# (CAP_NET_ADMIN kept) and `veil add-peer` + `veil reload` bring a third key in.
#
#   veil-t-$$-a  (inviter)                          veil-t-$$-b  (joiner)
#   veil-a 100.64.0.1/24                            veil-b 100.64.0.2/24 (address from the token)
#   veth0  198.51.100.1:51820  <------ veth ------> veth0  198.51.100.2
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_setup
"$VEIL" init --dir "$TMPD/a" --address "$OL4_a/24" --listen "$UL4_a:$PORT" >/dev/null || die "veil init"
psk_make net
printf 'psk = "%s"\n' "$TMPD/net.psk" >>"$TMPD/a/veil.toml"
# a names itself (the joiner's config calls it that) and records joins with a hook
printf '#!/bin/sh\necho "$1 $VEIL_PEER $VEIL_PUBLIC_KEY $VEIL_ALLOWED_IPS" >> %s/joined.txt\n' "$TMPD" >"$TMPD/hook.sh"
chmod 755 "$TMPD/hook.sh"
printf 'name = "hq"\nhook = ["peer_joined=%s"]\n' "$TMPD/hook.sh" >>"$TMPD/a/veil.toml"
node_run a up --config "$TMPD/a/veil.toml" --tun "$(tun a)" --control "$(sock a)"
wait_log a 'event=started' 10 || die "a did not start"

token=$(nsx a "$VEIL" invite --expires 10m --name laptop --control "$(sock a)") || die "veil invite failed"
check "invite prints a veil1- token" "got '${token:0:20}'" grep -q '^veil1-' <<<"$token"

# a token with one character changed is refused (the tag no longer matches)
bad=${token:0:40}$([[ ${token:40:1} == A ]] && echo B || echo A)${token:41}
check "an altered token is refused" "join accepted it" \
	bash -c "! ip netns exec $(ns b) $VEIL join '$bad' --dir $TMPD/bad --listen $UL4_b:$PORT >/dev/null 2>&1"

out=$(nsx b "$VEIL" join "$token" --dir "$TMPD/b" --name laptop --listen "$UL4_b:$PORT" 2>&1)
check "join succeeds" "$out" grep -q "joined network" <<<"$out"
check "join wrote key (0600), config and the network secret" "files: $(ls -l "$TMPD/b" 2>&1)" \
	test "$(stat -c %a "$TMPD/b/private.key" 2>/dev/null)" = 600 -a -s "$TMPD/b/veil.toml" -a -s "$TMPD/b/network.psk"
check "b got the network secret of a" "psk differs" cmp -s <(tr -d '\n' <"$TMPD/net.psk") <(tr -d '\n' <"$TMPD/b/network.psk")
check "a wrote the joiner into its config" "$(cat "$TMPD/a/veil.toml")" grep -q 'name = "laptop"' "$TMPD/a/veil.toml"
check "the joiner keeps its NAT mapping open: keepalive = 25 for the inviter" "$(cat "$TMPD/b/veil.toml")" grep -q '^keepalive = 25$' "$TMPD/b/veil.toml"
check "the joiner names the inviter as it names itself (hq)" "$(cat "$TMPD/b/veil.toml")" grep -q '^name = "hq"$' "$TMPD/b/veil.toml"
key_b=$(sed -n 's/.*; public key //p' <<<"$out")
wait_until 5 test -s "$TMPD/joined.txt"
check "the peer_joined hook ran with the joiner's name, whole key and address" "$(cat "$TMPD/joined.txt" 2>&1)" \
	grep -qxF "peer_joined laptop $key_b 100.64.0.2/32" "$TMPD/joined.txt"
check "the token works only once" "a second join was accepted" \
	bash -c "! ip netns exec $(ns b) $VEIL join '$token' --dir $TMPD/again --listen $UL4_b:$PORT >/dev/null 2>&1"

node_run b up --config "$TMPD/b/veil.toml" --tun "$(tun b)" --control "$(sock b)"
wait_log b 'event=started' 10 || die "b did not start"
check "the joiner pings the inviter" "no reply" ping_ok b "$OL4_a"
check "the inviter pings the joiner" "no reply" ping_ok a "$OL4_b"

# the control socket answers a malformed or oversized request with an error and changes nothing
reply=$(python3 - "$(sock a)" <<'PY'
import socket, sys
for req in (b"bogus request\n", b"x" * 8000):
    s = socket.socket(socket.AF_UNIX); s.settimeout(3); s.connect(sys.argv[1])
    s.sendall(req); s.shutdown(socket.SHUT_WR)
    print(s.recv(4096).decode().strip()); s.close()
PY
)
check "malformed control requests get an error reply" "reply: $reply" test "$(grep -c '^error:' <<<"$reply")" = 2
check "after them the node still works" "no reply" ping_ok a "$OL4_b"

# Silent control clients hold neither the loop that carries the packets nor the socket: while ten
# connections send nothing, pings cross the tunnel and `veil status` answers at once; each silent
# one is ended within the 2 s request deadline (an error line, or closed when a newer client needed
# its slot). A control server that waited on each in turn would take seconds and stall the pings.
reply=$(python3 - "$(sock a)" "$VEIL" "$(ns a)" "$OL4_b" <<'PY'
import socket, subprocess, sys, time
path, veil, ns, peer = sys.argv[1:5]
silent = []
for _ in range(10):
    s = socket.socket(socket.AF_UNIX); s.connect(path); silent.append(s)
t = time.monotonic()
ok = subprocess.run([veil, "status", "--control", path], capture_output=True, timeout=15).returncode == 0
status_ms = int((time.monotonic() - t) * 1000)
ping = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "5", "-i", "0.2", "-W", "1", "-q", peer], capture_output=True, timeout=15).returncode == 0
ended = 0
for s in silent:
    s.settimeout(4)
    try: s.recv(200); ended += 1
    except OSError: pass
print(f"status={'ok' if ok else 'failed'} status_ms={status_ms} ping={'ok' if ping else 'lost'} ended={ended}/10")
PY
)
check "silent control clients: status answers within 1 s, pings pass, all ten are ended" "$reply" \
	bash -c "[[ '$reply' =~ ^status=ok\ status_ms=([0-9]+)\ ping=ok\ ended=10/10$ ]] && (( BASH_REMATCH[1] < 1000 ))"

expired=$(nsx a "$VEIL" invite --expires 1s --control "$(sock a)") || die "second invite failed"
sleep 1.5
check "an expired token is refused" "join accepted it" \
	bash -c "! ip netns exec $(ns b) $VEIL join '$expired' --dir $TMPD/late --listen $UL4_b:$PORT >/dev/null 2>&1"

# --list names a pending invite; --revoke ends it, and its token is refused from then on
spare=$(nsx a "$VEIL" invite --expires 10m --name spare --control "$(sock a)") || die "third invite failed"
list=$(nsx a "$VEIL" invite --list --control "$(sock a)" 2>&1)
id=$(awk '$3 == "spare" && $4 == "pending" { print $1 }' <<<"$list")
check "invite --list shows the spare invite pending, with the joiner's address" "$list" test -n "$id"
out=$(nsx a "$VEIL" invite --revoke "$id" --control "$(sock a)" 2>&1)
check "invite --revoke ID: ok" "$out" grep -q "^ok: invite $id revoked" <<<"$out"
check "a revoked invite's token is refused" "join accepted it" \
	bash -c "! ip netns exec $(ns b) $VEIL join '$spare' --dir $TMPD/revoked --listen $UL4_b:$PORT >/dev/null 2>&1"
out=$(nsx a "$VEIL" invite --revoke "$id" --control "$(sock a)" 2>&1)
rc=$?
check "revoking it again: exit 2, one line" "exit $rc: $out" test "$rc" = 2 -a "$(grep -c '' <<<"$out")" = 1

# A restart keeps pending invites (a's veil.invites, 0600); --fix-rp-filter loosens a strict
# rp_filter on a's TUN alone.
later=$(nsx a "$VEIL" invite --expires 10m --name later --control "$(sock a)") || die "fourth invite failed"
wait_until 5 grep -q ' later -$' "$TMPD/a/veil.invites"
check "the invites file holds the pending invite (and laptop's, joined), mode 0600" "$(ls -l "$TMPD/a/veil.invites"; cut -c1-20,500- "$TMPD/a/veil.invites")" \
	test "$(stat -c %a "$TMPD/a/veil.invites" 2>/dev/null)" = 600 -a "$(grep -c '^invite veil1-.* later -$' "$TMPD/a/veil.invites")" = 1 -a \
	"$(grep -c "^invite veil1-.* laptop $key_b\$" "$TMPD/a/veil.invites")" = 1
node_stop a
nsx a sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1
node_run a up --config "$TMPD/a/veil.toml" --tun "$(tun a)" --control "$(sock a)" --fix-rp-filter
wait_log a 'event=started' 10 || die "a did not start again"
check "--fix-rp-filter: the TUN's rp_filter 1 -> 2 (logged), all stays 1" "$(grep sysctl "${NODE_LOG[a]}")" \
	test "$(nsx a cat /proc/sys/net/ipv4/conf/all/rp_filter)$(nsx a cat "/proc/sys/net/ipv4/conf/$(tun a)/rp_filter")" = 12 -a \
	"$(grep -c "event=sysctl_set file=/proc/sys/net/ipv4/conf/$(tun a)/rp_filter from=1 to=2 reason=fix_rp_filter" "${NODE_LOG[a]}")" = 1
list=$(nsx a "$VEIL" invite --list --control "$(sock a)" 2>&1)
check "after the restart the invite is still pending" "$list" grep -q '  later  *pending  ' <<<"$list"
out=$(nsx b "$VEIL" join "$later" --dir "$TMPD/b2" --listen "$UL4_b:$PORT" 2>&1)
check "and its token still works" "$out" grep -q "joined network" <<<"$out"
node_stop a
check "at exit rp_filter all is still 1" "$(nsx a cat /proc/sys/net/ipv4/conf/all/rp_filter)" test "$(nsx a cat /proc/sys/net/ipv4/conf/all/rp_filter)" = 1
nsx a sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0

# --user: a restarts unprivileged; reloads still add kernel routes
chmod 755 "$TMPD" "$TMPD/a"
chmod 644 "$TMPD/a/veil.toml"
node_run a up --config "$TMPD/a/veil.toml" --tun "$(tun a)" --control "$(sock a)" --user nobody
wait_log a 'event=started' 10 || die "a did not start as nobody"
uid=$(awk '/^Uid:/ {print $2}' "/proc/${NODE_PID[a]}/status")
check "--user nobody: the daemon runs as uid 65534" "uid $uid" test "$uid" = 65534
check "--user nobody: the tunnel still works" "no reply" ping_ok a "$OL4_b"
keys_make c
chmod 666 "$TMPD/a/veil.toml"
"$VEIL" add-peer --config "$TMPD/a/veil.toml" --peer "$(pub c)@203.0.113.3:$PORT" --allow 100.64.0.9/32 --name third >/dev/null ||
	not_ok "add-peer" "failed"
nsx a "$VEIL" reload --control "$(sock a)" >/dev/null
rc=$?
check "reload as nobody applies the new peer" "exit $rc" test "$rc" = 0
check "its route is in the kernel (CAP_NET_ADMIN kept)" "$(ip -n "$(ns a)" route)" \
	bash -c "ip -n $(ns a) route show dev $(tun a) | grep -q '^100.64.0.9 '"
finish
