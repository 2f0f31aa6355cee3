#!/usr/bin/env bash
# make bench: this folder's harness (rounds.sh -> measure.sh -> impl/*.sh, see common.sh) for veil
# and the anchors in one interleaved run, then medians, ratios veil/each, lossy-link rows (veil and
# wireguard-go through relay.c: delay, loss, reordering, duplicates and corruption), and veil's footprint: binary size, RSS idle and under load,
# GC collections during the run, and AEAD cost per 1420-byte record against `openssl speed`.
#   BENCH_IMPLS   implementations (default: veil veil-tap plain wireguard-go nebula fastd; any of impl/*.sh;
#                 veil-tap is veil with --mode tap, reported as a ratio to veil)
#   BENCH_RUNS    rounds (default 3)        BENCH_SECONDS  iperf3 seconds per test (default 5)
#   BENCH_LOSSY   the lossy links, "NAME=RELAY_ARGS;..." (relay.c's options, each way; default below;
#                 off: none)
#   BENCH_LOSSY_SECONDS  iperf3 seconds of each lossy row (default 10)
#   BENCH_RAW     keep the raw rows (run, impl, metric, value, unit; TSV) in this file
# Numbers are only comparable within one run: the machine is busy (other work) and noisy.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
HARNESS=$REPO/tests/bench
IMPLS=${BENCH_IMPLS:-veil veil-tap plain wireguard-go nebula fastd}
RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECONDS:-5}
LOSSY=${BENCH_LOSSY:-delay=-d 10;loss=-d 10 -l 2;reorder=-d 10 -r 5 -h 10;loss_reorder=-d 10 -l 2 -r 5 -h 10;dup_corrupt=-d 10 -u 1 -c 0.1}
[[ $LOSSY == off ]] && LOSSY=''
LOSSY_SECS=${BENCH_LOSSY_SECONDS:-10}
[[ -x out/veil ]] || { echo "bench: out/veil missing (make build)" >&2; exit 2; }
for i in $IMPLS; do [[ -f $HARNESS/impl/$i.sh ]] || { echo "bench: no implementation $i in $HARNESS/impl" >&2; exit 2; }; done

need=()
for c in iperf3:iperf3 jq:jq ping:iputils-ping openssl:openssl ss:iproute2; do command -v "${c%%:*}" >/dev/null || need+=("${c#*:}"); done
for i in $IMPLS; do
	case $i in
	wireguard-go) command -v wireguard-go >/dev/null && command -v wg >/dev/null || need+=(wireguard-go wireguard-tools) ;;
	nebula*) command -v nebula >/dev/null || need+=(nebula) ;;
	fastd) command -v fastd >/dev/null || need+=(fastd) ;;
	esac
done
[[ -n $LOSSY ]] && ! command -v cc >/dev/null && need+=(gcc)
if ((${#need[@]})); then
	echo "bench: installing ${need[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-upgrade "${need[@]}" </dev/null
fi

work=$(mktemp -d)
export VEIL_BIN=$REPO/out/veil BENCH_STATE_ROOT=$work/state
mkdir -p "$BENCH_STATE_ROOT"
# The sampler must not disturb what it measures: it is one process for the whole run (a `veil
# status` and a jq started twice a second, only during veil's rounds, put millisecond stalls into
# veil's ping and UDP loss on these 2 cores), it reads RSS from /proc and asks the control sockets
# itself, and it asks nothing while a daemon is younger than 4 s, since the harness measures idle
# ping latency in the first second after the tunnel is up.
python3 - "$BENCH_STATE_ROOT/veil" 4 >"$work/samples" <<'SAMPLER' &
import json, os, socket, sys, time
state, quiet = sys.argv[1], float(sys.argv[2])
born = {}
while True:
    daemons = {}                                   # side (a, b) -> pid, from the harness's pids file
    try:
        for line in open(os.path.join(state, "pids")):
            f = line.split()
            if len(f) >= 2: daemons[f[1].removeprefix("veil-")] = f[0]
    except OSError: pass
    now = time.monotonic()
    for pid in daemons.values():
        born.setdefault(pid, now)
        try:
            rss = next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
            print("rss", pid, rss, f"{now - born[pid]:.1f}", flush=True)
        except (OSError, StopIteration): pass
    if all(now - born[pid] >= quiet for pid in daemons.values()):
        for side, pid in daemons.items():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(os.path.join(state, side + ".sock"))
                    s.sendall(b"status json\n")
                    reply = b"".join(iter(lambda: s.recv(65536), b""))
                c = json.loads(reply)["counters"]
                print("gc", pid, *c["gc_collections"], c["tx_bytes"], flush=True)
            except (OSError, ValueError, KeyError): pass
    time.sleep(0.5)
SAMPLER
spid=$!
trap 'kill $spid 2>/dev/null || true; rm -rf "$work"' EXIT

lossy=()
[[ -n $LOSSY ]] && lossy=(--lossy "$LOSSY" --lossy-seconds "$LOSSY_SECS")
# shellcheck disable=SC2086
"$HARNESS/rounds.sh" --runs "$RUNS" --seconds "$SECS" --out "$work/raw.tsv" "${lossy[@]}" $IMPLS 2>"$work/rounds.err" || {
	tail -30 "$work/rounds.err" >&2; echo "bench: the harness failed" >&2; exit 1; }
kill $spid 2>/dev/null || true
wait $spid 2>/dev/null || true
if grep -q $'\tfailed\t' "$work/raw.tsv"; then
	echo "bench: some runs failed (their medians use the other rounds):" >&2
	grep -A20 'failed (exit' "$work/rounds.err" >&2 || true
fi
[[ -n ${BENCH_RAW:-} ]] && cp "$work/raw.tsv" "$BENCH_RAW"

python3 - "$work/raw.tsv" "$work/samples" "$IMPLS" "$LOSSY" <<'PY'
import sys, statistics, collections
raw, samples, impls, lossy = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4]
vals = collections.defaultdict(list)
words = {}
for line in open(raw):
    f = line.rstrip("\n").split("\t")           # run, impl, metric, value, unit
    if len(f) >= 4:
        try: vals[(f[1], f[2])].append(float(f[3]))
        except ValueError: words[f[2]] = f[3]
metrics = ["tcp_ab_1_mbps", "tcp_ba_1_mbps", "tcp_ab_P4_mbps", "tcp_ab_1_mbps_per_vpn_core", "tcp_ba_1_mbps_per_vpn_core", "ping_avg_ms", "ping_p99_ms",
           "ping_loaded_p50_ms", "ping_loaded_p99_ms", "udp_ab_loss_pct"]
med = {(i, m): statistics.median(vals[(i, m)]) for i in impls for m in metrics if vals[(i, m)]}
print("| metric | " + " | ".join(impls) + " |")
print("|---" * (len(impls) + 1) + "|")
for m in metrics:
    print(f"| {m} | " + " | ".join(f"{med[(i, m)]:g}" if (i, m) in med else "–" for i in impls) + " |")
if "veil" in impls and any(i not in ("veil", "veil-tap", "plain") for i in impls):
    print("\nratios veil / other (medians of this run; for ping a ratio below 1 is better):")
    for m in metrics[:9]:
        parts = [f"{i} {med[('veil', m)] / med[(i, m)]:.2f}x" for i in impls
                 if i not in ("veil", "veil-tap", "plain") and ("veil", m) in med and (i, m) in med and med[(i, m)] > 0]
        if parts: print(f"  {m}: " + ", ".join(parts))
if "veil" in impls and "veil-tap" in impls:
    parts = [f"{m} {med[('veil-tap', m)] / med[('veil', m)]:.2f}x" for m in ("tcp_ab_1_mbps", "tcp_ba_1_mbps", "tcp_ab_P4_mbps")
             if ("veil", m) in med and ("veil-tap", m) in med and med[("veil", m)] > 0]
    if parts: print("\ntap row: veil --mode tap / --mode tun (medians of this run; target >= 0.8x): " + ", ".join(parts))
if lossy:
    links = [l.split("=", 1) for l in lossy.split(";")]
    print(f"\nlossy links (relay.c, each way; TCP congestion control {words.get('lossy_delay_tcp_cc', words.get('tcp_cc', '?'))}): "
          "single-stream TCP a->b, median Mbit/s")
    print("| link | relay.c | veil | wireguard-go | veil / wireguard-go | veil / veil on the delay link | veil parity % of bytes | relay dropped % | idle ping ms |")
    print("|---" * 9 + "|")
    def m(i, name, metric):
        v = vals[(i, f"lossy_{name}_{metric}")]
        return statistics.median(v) if v else None
    base = m("veil", "delay", "tcp_ab_1_mbps")
    for name, args in links:
        v, w = m("veil", name, "tcp_ab_1_mbps"), m("wireguard-go", name, "tcp_ab_1_mbps")
        drop = [x for i in ("veil", "wireguard-go") for x in vals[(i, f"lossy_{name}_relay_drop_pct")]]
        rtt = m("veil", name, "ping_avg_ms")
        f = lambda x: "–" if x is None else f"{x:g}"
        print(f"| {name} | `{args}` | {f(v)} | {f(w)} | " + (f"{v / w:.2f}x" if v and w else "–") + " | "
              + (f"{v / base:.2f}" if v and base else "–") + f" | {f(m('veil', name, 'parity_pct'))} | "
              + (f"{statistics.median(drop):.2f}" if drop else "–") + f" | {f(rtt)} |")
rss = [(int(l.split()[2]), float(l.split()[3])) for l in open(samples) if l.startswith("rss ")]
# idle: up and running (at least 1 s old) but before the harness loads it (younger than 4 s: its ping phase)
idle = [kb for kb, age in rss if 1 <= age < 4] or [kb for kb, _ in rss]
gc = collections.defaultdict(list)
for l in open(samples):
    if l.startswith("gc "):
        f = l.split(); gc[f[1]].append((int(f[2]), int(f[3]), int(f[4]), int(f[5])))
if rss:
    print(f"\nveil RSS: idle {max(idle)/1024:.1f} MiB (highest 1-4 s after start), highest under load {max(kb for kb, _ in rss)/1024:.1f} MiB ({len(rss)} samples)")
if gc:
    # per daemon (one per side and round): the counts between its first and last sample, and since it started
    during = [sum(s[-1][g] - s[0][g] for s in gc.values()) for g in range(3)]
    since = [sum(s[-1][g] for s in gc.values()) for g in range(3)]
    sent = sum(s[-1][3] - s[0][3] for s in gc.values()) / 1e9
    print(f"veil GC collections, {len(gc)} daemons: gen0 {during[0]}, gen1 {during[1]}, gen2 {during[2]} while sampled under load "
          f"({sent:.1f} GB sent); since start gen0 {since[0]}, gen1 {since[1]}, gen2 {since[2]}")
PY
echo "veil binary: $(stat -c %s out/veil) bytes ($(file -b out/veil | cut -d, -f1-2))"
# AEAD cost per 1420-byte record: each of three rounds times veil's seal and then `openssl speed`
# right after it, and the ratio is the median of the rounds, since this machine's speed drifts by
# tens of percent from one minute to the next. Plain `speed -evp` streams one long message (no
# per-record nonce, AAD or tag); `-aead` sets up each record as TLS does, which is what a record of
# Veil costs, but OpenSSL 3.0's speed honours it for AES-GCM only and streams ChaCha20-Poly1305.
for round in 1 2 3; do
	"$VEIL_BIN" bench 0.3 >"$work/micro"
	for kind in chacha20-poly1305:ChaCha20Poly1305 aes-256-gcm:Aes256Gcm; do
		evp=${kind%%:*} name=${kind#*:}
		ours=$(awk -v n="$name" '$2 == n && $3 == 1420 {gsub(/[()]/, "", $8); print $8}' "$work/micro")
		for flag in -evp -aead; do
			args=(-evp "$evp"); [[ $flag == -aead ]] && args=(-aead "${args[@]}")
			kbps=$(openssl speed "${args[@]}" -bytes 1420 -seconds 1 2>/dev/null | awk '$NF ~ /k$/ {v=$NF} END {sub(/k$/, "", v); print v}')
			[[ -n "$kbps" && -n "$ours" ]] && echo "$name $flag $ours $kbps $round" >>"$work/aead"
		done
	done
done
awk '{ ossl = 1e6 / ($4 * 1000 / 1420); k = $1 " " $2; n[k]++; r[k, n[k]] = $3 / ossl; o[k, n[k]] = $3; s[k, n[k]] = ossl }
	END { for (k in n) { split(k, f, " ")
		# medians of three (sorted by ratio; the round with the median ratio gives the times shown)
		m = 1; for (i = 1; i <= n[k]; i++) { c = 0; for (j = 1; j <= n[k]; j++) if (r[k, j] < r[k, i] || (r[k, j] == r[k, i] && j < i)) c++; if (c == int((n[k] - 1) / 2)) m = i }
		printf "aead %s per 1420-byte record: veil seal %.2f us, openssl speed %s %.2f us, ratio %.2fx (median of %d rounds)\n",
			f[1], o[k, m], f[2] == "-evp" ? "-evp (stream)" : "-aead", s[k, m], r[k, m], n[k] } }' "$work/aead" | sort
grep -E "trie|handshake|x25519" "$work/micro"
