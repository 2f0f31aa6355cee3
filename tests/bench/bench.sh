#!/usr/bin/env bash
# make bench: the shared harness (../shared/bench) for veil and the anchors in one interleaved run,
# then medians, ratios veil/each, and veil's footprint: binary size, RSS idle and under load,
# GC collections during the run, and AEAD cost per 1420-byte record against `openssl speed`.
#   BENCH_IMPLS   implementations (default: veil plain wireguard-go nebula)
#   BENCH_RUNS    rounds (default 3)        BENCH_SECONDS  iperf3 seconds per test (default 5)
# Numbers are only comparable within one run: the machine is shared and noisy.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
HARNESS=${VEIL_BENCH_DIR:-$REPO/../shared/bench}
IMPLS=${BENCH_IMPLS:-veil plain wireguard-go nebula}
RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECONDS:-5}
[[ -x out/veil ]] || { echo "bench: out/veil missing (make build)" >&2; exit 2; }
[[ -x "$HARNESS/matrix.sh" ]] || { echo "bench: harness not found at $HARNESS" >&2; exit 2; }

need=()
for c in iperf3:iperf3 jq:jq ping:iputils-ping openssl:openssl; do command -v "${c%%:*}" >/dev/null || need+=("${c#*:}"); done
for i in $IMPLS; do
	case $i in
	wireguard-go) command -v wireguard-go >/dev/null && command -v wg >/dev/null || need+=(wireguard-go wireguard-tools) ;;
	nebula*) command -v nebula >/dev/null || need+=(nebula) ;;
	esac
done
if ((${#need[@]})); then
	echo "bench: installing ${need[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-upgrade "${need[@]}" </dev/null
fi

work=$(mktemp -d)
export VEIL_BIN=$REPO/out/veil BENCH_STATE_ROOT=$work/state
mkdir -p "$BENCH_STATE_ROOT"
sampler() {   # RSS of every veil daemon and its GC counts, twice a second, until killed
	while :; do
		for p in $(pgrep -x veil || true); do
			rss=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
			[[ -n "$rss" ]] && echo "rss $p $rss"
		done
		for s in "$BENCH_STATE_ROOT"/veil/*.sock; do
			[[ -S "$s" ]] && timeout 2 "$VEIL_BIN" status --json --control "$s" 2>/dev/null |
				jq -r --arg s "$s" '"gc \($s) \(.counters.gc_collections | join(" ")) \(.counters.tx_bytes)"' 2>/dev/null || true
		done
		sleep 0.5
	done
}
sampler >"$work/samples" &
spid=$!
trap 'kill $spid 2>/dev/null || true; rm -rf "$work"' EXIT

# shellcheck disable=SC2086
"$HARNESS/matrix.sh" --runs "$RUNS" --out "$work/raw.tsv" $IMPLS -- --seconds "$SECS" >"$work/matrix.out" 2>"$work/matrix.err" || {
	tail -20 "$work/matrix.err" >&2; echo "bench: the harness failed" >&2; exit 1; }
kill $spid 2>/dev/null || true
wait $spid 2>/dev/null || true

python3 - "$work/raw.tsv" "$work/samples" "$IMPLS" <<'PY'
import sys, statistics, collections
raw, samples, impls = sys.argv[1], sys.argv[2], sys.argv[3].split()
vals = collections.defaultdict(list)
for line in open(raw):
    f = line.rstrip("\n").split("\t")           # run, impl, metric, value, unit
    if len(f) >= 4:
        try: vals[(f[1], f[2])].append(float(f[3]))
        except ValueError: pass
metrics = ["tcp_ab_1_mbps", "tcp_ba_1_mbps", "tcp_ab_P4_mbps", "tcp_ab_1_mbps_per_vpn_core", "tcp_ba_1_mbps_per_vpn_core", "ping_avg_ms", "ping_p99_ms", "udp_ab_loss_pct"]
med = {(i, m): statistics.median(vals[(i, m)]) for i in impls for m in metrics if vals[(i, m)]}
print("| metric | " + " | ".join(impls) + " |")
print("|---" * (len(impls) + 1) + "|")
for m in metrics:
    print(f"| {m} | " + " | ".join(f"{med[(i, m)]:g}" if (i, m) in med else "–" for i in impls) + " |")
if "veil" in impls:
    print("\nratios veil / other (medians of this run; for ping a ratio below 1 is better):")
    for m in metrics[:5] + ["ping_avg_ms"]:
        parts = [f"{i} {med[('veil', m)] / med[(i, m)]:.2f}x" for i in impls
                 if i not in ("veil", "plain") and ("veil", m) in med and (i, m) in med and med[(i, m)] > 0]
        if parts: print(f"  {m}: " + ", ".join(parts))
rss = [int(l.split()[2]) for l in open(samples) if l.startswith("rss ")]
gc = collections.defaultdict(list)
for l in open(samples):
    if l.startswith("gc "):
        f = l.split(); gc[f[1]].append((int(f[2]), int(f[3]), int(f[4]), int(f[5])))
if rss:
    print(f"\nveil RSS: idle {min(rss)/1024:.1f} MiB, highest under load {max(rss)/1024:.1f} MiB ({len(rss)} samples)")
for sock, s in gc.items():
    first, last = s[0], s[-1]
    print(f"veil GC collections during the run ({sock.split('/')[-1]}): gen0 {last[0]-first[0]}, gen1 {last[1]-first[1]}, gen2 {last[2]-first[2]} over {(last[3]-first[3])/1e9:.1f} GB sent")
PY
echo "veil binary: $(stat -c %s out/veil) bytes ($(file -b out/veil | cut -d, -f1-2))"
"$VEIL_BIN" bench 0.5 | grep -E "1420 B|handshake|x25519|trie" >"$work/micro"
for kind in chacha20-poly1305:ChaCha20Poly1305 aes-256-gcm:Aes256Gcm; do
	evp=${kind%%:*} name=${kind#*:}
	ours=$(awk -v n="$name" '$2 == n && $3 == 1420 {gsub(/[()]/, "", $8); print $8}' "$work/micro")
	# Plain `speed -evp` streams one long message (no per-record nonce, AAD or tag); `-aead` sets
	# up each record as TLS does, which is what a record of Veil costs. Both are printed.
	for mode in stream aead; do
		flag=""; [[ $mode == aead ]] && flag=-aead
		# shellcheck disable=SC2086
		kbps=$(openssl speed $flag -evp "$evp" -bytes 1420 -seconds 1 2>/dev/null | awk '$NF ~ /k$/ {v=$NF} END {sub(/k$/, "", v); print v}')
		if [[ -n "$kbps" && -n "$ours" ]]; then
			ossl=$(awk -v k="$kbps" 'BEGIN {printf "%.2f", 1e6 / (k * 1000 / 1420)}')
			echo "aead $name per 1420-byte record: veil seal $ours us, openssl speed ${flag:--evp stream} $ossl us, ratio $(awk -v a="$ours" -v b="$ossl" 'BEGIN {printf "%.2f", a / b}')x"
		fi
	done
done
grep -E "trie|handshake|x25519" "$work/micro"
