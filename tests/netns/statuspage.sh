#!/usr/bin/env bash
# statuspage.sh -- the management endpoint's HTML status page (GET /). b serves --mgmt on
# 0.0.0.0:7777 with --mgmt-acl 127.0.0.0/8,100.64.0.1/32; with the tunnel up, curl checks GET /
# (200, text/html, the exact Content-Security-Policy with the hashes of the page's one <script>
# and one <style>, nosniff, no-store, <= 8 KiB, no http(s):// reference) and the ACL (403 from
# a's underlay address, 200 over the tunnel). Then Debian's headless Chromium, inside b's
# namespace, loads the page: the DOM (after 5 s of virtual time) names a as an up peer, shows a
# traffic rate (two /status samples) and no error; a 1024x768 screenshot is not one flat colour;
# Chromium logs no Content Security Policy violation. Two controls on a python3 server in b
# prove the checks can fail: the page with its script and style altered (the hashes no longer
# match) must log violations, and the page with /status answering 503 must say "cannot reach".
# No Chromium that runs here: exit 77 (skipped), after the curl checks.
#
#   veil-t-$$-a                                      veil-t-$$-b
#                                                    chromium --headless -> 127.0.0.1:7777/
#   veil-a 100.64.0.1  ========= tunnel =========>   veil-b mgmt 0.0.0.0:7777      (allowed: 200)
#   veth0 198.51.100.1 ---------- veth ---------->   veth0 198.51.100.2:7777       (not allowed: 403)
#                                                    control server 127.0.0.1:7780 (python3)
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

CHROMIUM=/usr/bin/chromium
CTRL_PORT=7780
CSP_FMT="default-src 'none'; script-src '%s'; style-src '%s'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
for c in python3 curl; do command -v "$c" >/dev/null || die "missing $c (make deps)"; done
# shellcheck disable=SC2317 # these run through check and wait_until
lacks() { ! grep -qi -- "$1" "$2"; } # lacks REGEX FILE -- FILE has no line matching REGEX

net_setup
keys_make a b
node_start a
node_start b --mgmt "0.0.0.0:$MGMT_PORT" --mgmt-acl "127.0.0.0/8,$OL4_a/32"
wait_ready a b
wait_mgmt b || die "b's /healthz on 127.0.0.1:$MGMT_PORT did not answer 200 within 10 s"
ping_within a "$OL4_b" 10 || die "no ping a -> b within 10 s"
# shellcheck disable=SC2317
peer_up() { [[ $(st b "[.peers[] | select(.state == \"up\")] | length") == 1 ]]; }
wait_until 10 peer_up || die "b does not show a as up within 10 s"
NAME_A=$(nsx b timeout --foreground 5 curl -sS "http://127.0.0.1:$MGMT_PORT/status" |
	jq -r --arg k "$(pub a)" '.peers[] | select(.public_key == $k) | .name')
[[ -n $NAME_A ]] || die "b's /status does not list a"
note "a's name in b's /status: $NAME_A"

# ---- GET / with curl: status, headers, body
URL="http://127.0.0.1:$MGMT_PORT/"
H="$TMPD/head.txt" B="$TMPD/page.html"
code=$(nsx b timeout --foreground 10 curl -sS -D "$H" -o "$B" -w '%{http_code}' "$URL")
check "GET /: 200" "got '$code'" test "$code" = 200
tr -d '\r' <"$H" >"$H.lf"
# hdr NAME -- the value of response header NAME (case-insensitive name, first one)
hdr() { awk -v n="$(tr '[:upper:]' '[:lower:]' <<<"$1")" 'BEGIN { FS = ": " } NR > 1 && tolower($1) == n { sub(/^[^:]*: */, ""); print; exit }' "$H.lf"; }
check "GET /: Content-Type text/html; charset=utf-8" "Content-Type '$(hdr Content-Type)'" \
	test "$(hdr Content-Type)" = "text/html; charset=utf-8"
check "GET /: X-Content-Type-Options nosniff" "got '$(hdr X-Content-Type-Options)'" test "$(hdr X-Content-Type-Options)" = nosniff
check "GET /: Cache-Control no-store" "got '$(hdr Cache-Control)'" test "$(hdr Cache-Control)" = no-store
size=$(wc -c <"$B")
check "GET /: body is 1 .. 8192 bytes" "$size bytes" test "$size" -gt 0 -a "$size" -le 8192
check "GET /: Content-Length is the body's size" "Content-Length '$(hdr Content-Length)', body $size" \
	test "$(hdr Content-Length)" = "$size"
check "GET /: no http:// or https:// in the body" "$(grep -oi 'https\?://[^"'\'' >]*' "$B" | head -n 3 | tr '\n' ' ')" \
	lacks 'https\?://' "$B"
# the hashes CSP computes: SHA-256 of each element's exact text, base64; one <script>, one <style>,
# no style= attribute and no on*= handler (the policy would block them)
hashes=$(python3 - "$B" 2>&1 <<'PY'
import base64, hashlib, re, sys
s = open(sys.argv[1], "rb").read().decode("utf-8")
out = []
for tag in ("script", "style"):
    found = re.findall(r"<%s>(.*?)</%s>" % (tag, tag), s, re.S)
    if len(found) != 1 or len(re.findall(r"<%s[\s>]" % tag, s)) != 1:
        sys.exit("%d <%s> elements" % (len(re.findall(r"<%s[\s>]" % tag, s)), tag))
    out.append("sha256-%s" % base64.b64encode(hashlib.sha256(found[0].encode()).digest()).decode())
if re.search(r"<[^>]*\s(style|on[a-z]+)\s*=", s, re.I):
    sys.exit("a style= attribute or an inline event handler")
print(*out)
PY
)
check "GET /: one inline <script>, one <style>, no style= or on*= attribute" "$hashes" test "${hashes:0:7}" = sha256-
read -r h_script h_style <<<"$hashes"
# shellcheck disable=SC2059 # the format is the policy
want_csp=$(printf "$CSP_FMT" "$h_script" "$h_style")
check "GET /: Content-Security-Policy is the policy with the page's own hashes" \
	"got '$(hdr Content-Security-Policy)', want '$want_csp'" test "$(hdr Content-Security-Policy)" = "$want_csp"
note "page: $size bytes, script $h_script, style $h_style"
code=$(nsx b timeout --foreground 10 curl -sS -I -o /dev/null -w '%{http_code} %{content_type}' "$URL")
check "HEAD /: 200 text/html" "got '$code'" test "$code" = "200 text/html; charset=utf-8"

# ---- the ACL covers / too
code=$(nsx a timeout --foreground 10 curl -sS -o /dev/null -w '%{http_code}' "http://$UL4_b:$MGMT_PORT/")
check "GET / from a's underlay address (outside b's ACL): 403" "got '$code'" test "$code" = 403
code=$(nsx a timeout --foreground 10 curl -sS -o /dev/null -w '%{http_code}' "http://$OL4_b:$MGMT_PORT/")
check "GET / from a's overlay address (inside b's ACL): 200" "got '$code'" test "$code" = 200

# ---- headless Chromium in b's namespace
# chrome OUT URL FLAGS... -- one headless run (stdout OUT.out, stderr OUT.err), bounded to 40 s;
# its own profile and HOME under $TMPD, console messages on stderr
chrome() {
	local out=$1 url=$2 prof; shift 2
	prof=$(mktemp -d "$TMPD/chrome.XXXXXX")
	nsx b env HOME="$prof" DBUS_SESSION_BUS_ADDRESS=disabled: timeout --foreground -k 5 40 "$CHROMIUM" \
		--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
		--disable-component-update --disable-sync --user-data-dir="$prof/profile" --enable-logging=stderr --v=0 \
		"$@" "$url" >"$out.out" 2>"$out.err" </dev/null
}
csp_errors() { grep -h 'Content Security Policy' "$@" 2>/dev/null; }
# can Chromium run here at all? If not, the curl checks above stand and the rest is skipped
if [[ ! -x $CHROMIUM ]]; then
	why="$CHROMIUM not installed (Debian package chromium; make deps)"
elif chrome "$TMPD/probe" about:blank --dump-dom; prc=$?; ! grep -q '<html' "$TMPD/probe.out"; then
	why="headless $CHROMIUM does not run here (exit $prc): $(grep -v '^$' "$TMPD/probe.err" | grep -iv dbus | tail -n 3 | tr '\n' ' ')"
fi
if [[ -n ${why:-} ]]; then
	((FAILS)) && finish
	printf 'ok - %s # SKIP %s\n' "$T_NAME browser checks" "$why"
	exit 77
fi
note "$("$CHROMIUM" --version 2>/dev/null | head -n 1)"

# traffic for the chart while the page runs
nsx a timeout --foreground 30 ping -c 100 -i 0.2 -s 1200 -q "$OL4_b" >/dev/null 2>&1 &
ping_pid=$!
chrome "$TMPD/dom" "$URL" --virtual-time-budget=5000 --dump-dom
D="$TMPD/dom.out"
names=$(grep -o '<td class="name"[^>]*>[^<]*</td>' "$D" | sed 's|.*>\([^<]*\)</td>$|\1|')
check "chromium: the DOM has a name cell for a ($NAME_A)" "name cells: '$(tr '\n' ' ' <<<"$names")'" grep -qxF -- "$NAME_A" <<<"$names"
check "chromium: the DOM shows a's state up" "$(grep -o '<td class="state[^<]*</td>' "$D" | head -n 3)" \
	grep -qF '<td class="state up">up</td>' "$D"
check "chromium: the DOM shows b's own public key" "no <code id=\"key\">$(pub b)</code>" grep -qF "<code id=\"key\">$(pub b)</code>" "$D"
check "chromium: the DOM shows a traffic rate (two /status samples)" "$(grep -o '<span class="rx"[^<]*</span>' "$D")" \
	grep -Eq '<span class="rx" id="rxr">rx [0-9.]+ (B|KiB|MiB|GiB)/s</span>' "$D"
check "chromium: the error line is hidden and empty" "$(grep -o '<p id="err"[^<]*</p>' "$D")" grep -qF '<p id="err" hidden=""></p>' "$D"
sed -z 's|<script>.*</script>||' "$D" >"$TMPD/dom-text.html" # the script's own text says "cannot reach"
check "chromium: no 'cannot reach' in the DOM outside the script" "$(grep -o 'cannot reach[^<]*' "$TMPD/dom-text.html")" \
	lacks 'cannot reach' "$TMPD/dom-text.html"

chrome "$TMPD/shot" "$URL" --virtual-time-budget=5000 --window-size=1024,768 --screenshot="$TMPD/shot.png"
# png FILE -- "WIDTH HEIGHT COLOURS" of an 8-bit RGB(A) PNG (filters undone, colours counted up to 10000)
png() {
	python3 - "$1" <<'PY'
import struct, sys, zlib
d = open(sys.argv[1], "rb").read()
assert d[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
i, idat = 8, b""
while i < len(d):
    n, t = struct.unpack(">I4s", d[i:i + 8]); c = d[i + 8:i + 8 + n]; i += 12 + n
    if t == b"IHDR": w, h, depth, ctype = struct.unpack(">IIBB", c[:10])
    if t == b"IDAT": idat += c
assert depth == 8 and ctype in (2, 6), "unsupported PNG (depth %d, colour type %d)" % (depth, ctype)
bpp = 3 if ctype == 2 else 4
raw, stride, prev, colours = zlib.decompress(idat), w * bpp, bytearray(w * bpp), set()
for y in range(h):
    f, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for x in range(stride):
        a = row[x - bpp] if x >= bpp else 0
        b, c = prev[x], prev[x - bpp] if x >= bpp else 0
        if f == 1: row[x] = (row[x] + a) & 255
        elif f == 2: row[x] = (row[x] + b) & 255
        elif f == 3: row[x] = (row[x] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            row[x] = (row[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    if len(colours) < 10000: colours.update(bytes(row[x:x + bpp]) for x in range(0, stride, bpp))
    prev = row
print(w, h, len(colours))
PY
}
if [[ -s $TMPD/shot.png ]]; then
	read -r pw ph pc <<<"$(png "$TMPD/shot.png" 2>&1)"
	note "screenshot: $(wc -c <"$TMPD/shot.png") bytes, ${pw}x${ph}, $pc colours"
	check "chromium: the screenshot is 1024x768" "got '$pw $ph $pc'" test "$pw $ph" = "1024 768"
	[[ $pc =~ ^[0-9]+$ ]] || pc=0
	check "chromium: the screenshot is not one flat colour" "$pc colours" test "$pc" -gt 1
else
	not_ok "chromium: a screenshot" "no PNG written: $(grep -v '^$' "$TMPD/shot.err" | grep -iv dbus | tail -n 2 | tr '\n' ' ')"
fi
check "chromium: no Content Security Policy violation in its log" "$(csp_errors "$TMPD/dom.err" "$TMPD/shot.err" | head -n 2)" \
	test -z "$(csp_errors "$TMPD/dom.err" "$TMPD/shot.err")"

# ---- controls on a python3 server in b: the served page and policy, /bad with the script and
# style altered (hashes off), /status 503. Both must show what the checks above look for.
nsx b timeout --foreground 60 python3 - "$CTRL_PORT" "$B" "$(hdr Content-Security-Policy)" >"$TMPD/ctrl.log" 2>&1 <<'PY' &
import http.server, sys
port, page, csp = int(sys.argv[1]), open(sys.argv[2], "rb").read(), sys.argv[3]
bad = page.replace(b"<script>", b"<script> ").replace(b"<style>", b"<style> ")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/": page, "/bad": bad}.get(self.path)
        self.send_response(200 if body else 503)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Security-Policy", csp)
        self.end_headers()
        self.wfile.write(body or b"")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
ctrl_pid=$!
wait_until 5 quiet nsx b curl -sf -o /dev/null "http://127.0.0.1:$CTRL_PORT/" || die "the control server did not start"
chrome "$TMPD/bad" "http://127.0.0.1:$CTRL_PORT/bad" --virtual-time-budget=2000 --dump-dom
check "control: an altered script and style are refused and logged as CSP violations" \
	"$(csp_errors "$TMPD/bad.err" | grep -c 'inline script') script and $(csp_errors "$TMPD/bad.err" | grep -c 'inline style') style violations logged" \
	test "$(csp_errors "$TMPD/bad.err" | grep -c 'inline script')" -ge 1 -a "$(csp_errors "$TMPD/bad.err" | grep -c 'inline style')" -ge 1
chrome "$TMPD/dead" "http://127.0.0.1:$CTRL_PORT/" --virtual-time-budget=5000 --dump-dom
check "control: /status answering 503 shows 'cannot reach /status'" "$(grep -o '<p id="err"[^<]*</p>' "$TMPD/dead.out")" \
	grep -q '<p id="err">cannot reach /status' "$TMPD/dead.out"
# shellcheck disable=SC2317
both_alive() { node_alive a && node_alive b; }
check "a and b are alive" "one exited" both_alive
kill -TERM "$ping_pid" "$ctrl_pid" 2>/dev/null
wait "$ping_pid" "$ctrl_pid" 2>/dev/null
finish
