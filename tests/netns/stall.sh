#!/usr/bin/env bash
# stall.sh -- slow control-plane work never holds up packets. a runs from a config file and its
# DNS server (in a's namespace) answers every query after 5 s. While a pings b every 50 ms:
#   (i)  a peer whose endpoint is a host name is added to the file and `veil reload` asked for:
#        the reload resolves the name (5 s) and says ok, `veil status` answers at once meanwhile,
#        and no ping is delayed by more than 100 ms over the quiet baseline or lost;
#   (ii) a node joins with `veil join`: a writes it into its file and reloads (the 5 s name again)
#        before it answers; the join succeeds and again no ping is delayed or lost.
# Before the control plane moved off the node's lock, each step stalled every packet for 5 s.
#
#   veil-t-$$-a  (--config a.toml, resolver 127.0.0.53)      veil-t-$$-b
#   veil-a 100.64.0.1   <============ tunnel ============>   veil-b 100.64.0.2
#   veth0  198.51.100.1 <------------- veth ------------->   veth0  198.51.100.2
#   ghost.veil.test resolves (slowly) to 198.51.100.9, where nothing answers.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

DNS_DELAY_S=5
GHOST_IP=198.51.100.9

net_setup
keys_make a b ghost
CFG="$TMPD/a.toml"
cat >"$CFG" <<EOF
key = "$TMPD/a.key"
listen = "$UL4_a:$PORT"
address = ["$OL4_a/24"]
tun = "$TUN_a"
control = "$(sock a)"

[[peer]]
name = "b"
public_key = "$(pub b)"
endpoint = "$UL4_b:$PORT"
allowed_ips = ["$OL4_b/32"]
EOF

# a's own resolver: its files bind-mounted over the system's in a private mount namespace, so
# nothing outside the test sees them.
printf 'nameserver 127.0.0.53\noptions timeout:15 attempts:1\n' >"$TMPD/resolv.conf"
printf 'hosts: files dns\n' >"$TMPD/nsswitch.conf"
cat >"$TMPD/veil-dns" <<EOF
#!/bin/sh
mount --bind "$TMPD/resolv.conf" /etc/resolv.conf && mount --bind "$TMPD/nsswitch.conf" /etc/nsswitch.conf && exec "$VEIL" "\$@"
EOF
chmod 700 "$TMPD/veil-dns"

nsx a python3 - "$DNS_DELAY_S" "$GHOST_IP" "$TMPD/dns.log" <<'PY' &
import socket, sys, threading, time
delay, answer, log = float(sys.argv[1]), socket.inet_aton(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.53", 53))
def name_end(q):
    i = 12
    while q[i]: i += q[i] + 1
    return i + 1
def reply(q, peer):
    time.sleep(delay)
    end = name_end(q)
    labels, i = [], 12
    while q[i]: labels.append(q[i + 1:i + 1 + q[i]].decode()); i += q[i] + 1
    qtype = int.from_bytes(q[end:end + 2], "big")
    hit = ".".join(labels).lower() == "ghost.veil.test" and qtype == 1
    head = q[:2] + b"\x81\x80\x00\x01" + (b"\x00\x01" if hit else b"\x00\x00") + b"\x00\x00\x00\x00"
    body = q[12:end + 4] + (b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + answer if hit else b"")
    s.sendto(head + body, peer)
    log.write(f"{'.'.join(labels)} type={qtype} answered_after_s={delay}\n")
while True:
    q, peer = s.recvfrom(512)
    if len(q) > 12: threading.Thread(target=reply, args=(q, peer), daemon=True).start()
PY

VEIL=unshare node_run a -m --propagation private "$TMPD/veil-dns" up --config "$CFG"
node_start b
wait_log a 'event=started' 10 || die "a did not start"
wait_log b 'event=started' 10 || die "b did not start"
ping_within a "$OL4_b" 10 || die "no tunnel a -> b"

# pings N -- N pings a -> b, 50 ms apart; prints "RECEIVED MAX_RTT_MS"
pings() {
	local out
	out=$(nsx a timeout --foreground 60 ping -c "$1" -i 0.05 -W 2 "$OL4_b" 2>&1)
	printf '%s %s\n' "$(sed -n 's/.* \([0-9]*\) received.*/\1/p' <<<"$out")" \
		"$(sed -n 's|^rtt [^=]*= [0-9.]*/[0-9.]*/\([0-9.]*\)/.*|\1|p' <<<"$out" | cut -d. -f1)"
}
read -r base_rx base_max <<<"$(pings 40)"
note "quiet baseline: $base_rx/40 answered, max rtt ${base_max:-?} ms"
LIMIT_MS=$((${base_max:-0} + 100))

# (i) a reload that resolves a slow name
cat >>"$CFG" <<EOF

[[peer]]
name = "ghost"
public_key = "$(pub ghost)"
endpoint = "ghost.veil.test:$PORT"
allowed_ips = ["100.64.0.9/32"]
EOF
pings 120 >"$TMPD/pings1" &
ping_pid=$!
sleep 0.5
t0=$(now_ms)
nsx a "$VEIL" reload --control "$(sock a)" >"$TMPD/reload.out" 2>&1 &
reload_pid=$!
sleep 1
t1=$(now_ms)
status_ok=no
nsx a timeout --foreground 5 "$VEIL" status --control "$(sock a)" >/dev/null 2>&1 && status_ok=yes
status_ms=$(($(now_ms) - t1))
wait "$reload_pid"
reload_rc=$? reload_ms=$(($(now_ms) - t0))
wait "$ping_pid"
read -r rx1 max1 <"$TMPD/pings1"
check "(i) the reload resolved the slow name and said ok" \
	"rc=$reload_rc after ${reload_ms} ms: $(cat "$TMPD/reload.out"); dns: $(cat "$TMPD/dns.log" 2>/dev/null)" \
	bash -c "(($reload_rc == 0 && $reload_ms >= ($DNS_DELAY_S - 1) * 1000)) && grep -q '^ok: reloaded' '$TMPD/reload.out' && grep -q '^ghost.veil.test type=1' '$TMPD/dns.log'"
check "(i) veil status answers during the reload" "status=$status_ok after ${status_ms} ms" \
	test "$status_ok" = yes -a "$status_ms" -lt 1000
check "(i) no ping lost or delayed past ${LIMIT_MS} ms during the reload" "answered ${rx1:-0}/120, max rtt ${max1:-?} ms" \
	test "${rx1:-0}" -eq 120 -a "${max1:-999999}" -le "$LIMIT_MS"
check "(i) the name's address reached the new peer" "$(nsx a "$VEIL" peers --control "$(sock a)" 2>&1 | grep -A3 ghost)" \
	wait_until 10 bash -c "ip netns exec $(ns a) $VEIL peers --json --control $(sock a) | jq -e '.[] | select(.name == \"ghost\") | .endpoint == \"$GHOST_IP:$PORT\"' >/dev/null"

# (ii) a join: a writes the joiner into its file and reloads it before answering
token=$(nsx a "$VEIL" invite --expires 10m --name joiner --control "$(sock a)") || die "veil invite failed"
pings 120 >"$TMPD/pings2" &
ping_pid=$!
sleep 0.5
t0=$(now_ms)
join_out=$(nsx b timeout --foreground 30 "$VEIL" join "$token" --dir "$TMPD/j" --listen "$UL4_b:51821" 2>&1)
join_rc=$? join_ms=$(($(now_ms) - t0))
wait "$ping_pid"
read -r rx2 max2 <"$TMPD/pings2"
check "(ii) the join succeeded after a wrote it down and reloaded" "rc=$join_rc after ${join_ms} ms: $join_out" \
	bash -c "(($join_rc == 0 && $join_ms >= ($DNS_DELAY_S - 1) * 1000)) && grep -q 'joined network' <<<'$join_out' && grep -qF \"\$(sed -n 's/.*public key //p' <<<'$join_out')\" '$CFG' && grep -q 'event=reloaded trigger=join' '${NODE_LOG[a]}'"
check "(ii) no ping lost or delayed past ${LIMIT_MS} ms during the join" "answered ${rx2:-0}/120, max rtt ${max2:-?} ms" \
	test "${rx2:-0}" -eq 120 -a "${max2:-999999}" -le "$LIMIT_MS"
finish
