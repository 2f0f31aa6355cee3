#!/usr/bin/env bash
# rounds.sh [--runs N] [--seconds S] [--out FILE] [--lossy "NAME=RELAY_ARGS;..." [--lossy-seconds S]
#           [--lossy-impls "IMPL..."]] IMPL...
# Interleaved rounds: round 1 measures every IMPL once (measure.sh), then round 2, ... so the drift
# of a busy machine hits all implementations alike. With --lossy, each round then measures the
# lossy-impls (default: veil wireguard-go, those of them in IMPL...) once more per link through
# relay.c started with that link's RELAY_ARGS (e.g. "loss=-d 10 -l 2": 10 ms each way, 2 % random
# loss each way); its metrics are named lossy_NAME_... (relay.c is compiled with cc -O2 into a
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

lossy_names=() lossy_relay=() lossy_list=()
if [[ -n $LOSSY ]]; then
	IFS=';' read -r -a links <<<"$LOSSY"
	for l in "${links[@]}"; do
		[[ $l =~ ^([a-z0-9_]+)=([-0-9.\ a-z]+)$ ]] || { echo "rounds.sh: --lossy wants \"NAME=RELAY_ARGS;...\", not \"$l\"" >&2; exit 2; }
		lossy_names+=("${BASH_REMATCH[1]}") lossy_relay+=("${BASH_REMATCH[2]}")
	done
	command -v cc >/dev/null || { echo "rounds.sh: no C compiler (cc) for relay.c" >&2; exit 2; }
	cc -O2 -Wall -o "$scratch/relay" "$HERE/relay.c" || { echo "rounds.sh: relay.c did not compile" >&2; exit 2; }
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
	for k in "${!lossy_names[@]}"; do
		for impl in "${lossy_list[@]}"; do
			one "$r" "$impl" --seconds "$LOSSY_SECS" --relay "$scratch/relay" --relay-args "${lossy_relay[$k]}" \
				--relay-name "${lossy_names[$k]}"
		done
	done
done
((ok > 0))
