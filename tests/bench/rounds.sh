#!/usr/bin/env bash
# rounds.sh [--runs N] [--seconds S] [--out FILE] [--lossy "DELAY_MS LOSS_PCT" [--lossy-seconds S]
#           [--lossy-impls "IMPL..."]] IMPL...
# Interleaved rounds: round 1 measures every IMPL once (measure.sh), then round 2, ... so the drift
# of a busy machine hits all implementations alike. With --lossy, each round then measures the
# lossy-impls (default: veil wireguard-go, those of them in IMPL...) once more through relay.c:
# DELAY_MS each way and LOSS_PCT random loss each way (relay.c is compiled with cc -O2 into a
# scratch directory first). Appends "run<TAB>impl<TAB>metric<TAB>value<TAB>unit" rows to FILE
# (default: stdout); a run that fails adds "run impl failed 1 bool" and the last lines of its log
# go to stderr. Exit status 0 if at least one run succeeded.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=3 SECS=5 OUT=/dev/stdout LOSSY='' LOSSY_SECS=10 LOSSY_IMPLS='veil wireguard-go'
IMPLS=()
while (($#)); do
	case $1 in
	--runs) RUNS=$2; shift 2 ;;
	--seconds) SECS=$2; shift 2 ;;
	--out) OUT=$2; shift 2 ;;
	--lossy) LOSSY=$2; shift 2 ;;
	--lossy-seconds) LOSSY_SECS=$2; shift 2 ;;
	--lossy-impls) LOSSY_IMPLS=$2; shift 2 ;;
	-*) echo "rounds.sh: unknown option $1" >&2; exit 2 ;;
	*) IMPLS+=("$1"); shift ;;
	esac
done
((${#IMPLS[@]})) || { sed -n '2,3p' "$0" >&2; exit 2; }
[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1 && RUNS <= 50)) || { echo "rounds.sh: --runs must be 1..50" >&2; exit 2; }

scratch=$(mktemp -d)
child=''
# measure.sh cleans up after itself on TERM; pass ours on and wait for it (bounded by its own trap)
finish() {
	local rc=$?
	trap - EXIT INT TERM
	set +e # a failing wait must not end the trap before the scratch directory is gone
	if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi
	rm -rf "$scratch"
	exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

lossy_args=() lossy_list=()
if [[ -n $LOSSY ]]; then
	read -r delay loss <<<"$LOSSY"
	[[ $delay =~ ^[0-9.]+$ && $loss =~ ^[0-9.]+$ ]] || { echo "rounds.sh: --lossy wants \"DELAY_MS LOSS_PCT\"" >&2; exit 2; }
	command -v cc >/dev/null || { echo "rounds.sh: no C compiler (cc) for relay.c" >&2; exit 2; }
	cc -O2 -Wall -o "$scratch/relay" "$HERE/relay.c" || { echo "rounds.sh: relay.c did not compile" >&2; exit 2; }
	lossy_args=(--seconds "$LOSSY_SECS" --relay "$scratch/relay" --relay-args "-d $delay -l $loss")
	for i in $LOSSY_IMPLS; do [[ " ${IMPLS[*]} " == *" $i "* ]] && lossy_list+=("$i"); done
fi

ok=0
# one RUN IMPL MEASURE-ARGS... -- one measurement, its rows appended to OUT
one() {
	local run=$1 impl=$2 rc=0; shift 2
	echo "bench: round $run/$RUNS: $impl $*" >&2
	# measure.sh bounds each of its own waits; this timeout is the last resort
	timeout 600 "$HERE/measure.sh" "$impl" "$@" >"$scratch/rows" 2>"$scratch/log" &
	child=$!
	wait "$child" || rc=$?
	child=''
	awk -F'\t' -v r="$run" 'NF == 4 {print r "\t" $0}' "$scratch/rows" >>"$OUT"
	if ((rc)); then
		printf '%s\t%s\tfailed\t1\tbool\n' "$run" "$impl" >>"$OUT"
		echo "bench: round $run: $impl failed (exit $rc):" >&2
		tail -n 20 "$scratch/log" >&2
	else
		ok=$((ok + 1))
	fi
}

for ((r = 1; r <= RUNS; r++)); do
	for impl in "${IMPLS[@]}"; do one "$r" "$impl" --seconds "$SECS"; done
	for impl in "${lossy_list[@]}"; do one "$r" "$impl" "${lossy_args[@]}"; done
done
((ok > 0))
