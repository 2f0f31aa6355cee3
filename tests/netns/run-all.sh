#!/usr/bin/env bash
# run-all.sh [SCENARIO...] -- run the namespace scenarios (all, or those named), one
# after the other, each under a time limit; print "netns: N passed, M failed" and exit
# nonzero if any failed. A scenario that leaves a namespace behind has failed; the
# leftover is removed here. A scenario that exits 77 was skipped (it says why: this machine
# cannot run it at all); it counts as neither passed nor failed and is named at the end.
# Env: VEIL_BIN (default <repo>/out/veil), VEIL_LOG_LEVEL (default info).
set -uo pipefail

DIR=$(cd "$(dirname "$0")" && pwd)
ALL=(badflags ping iperf fec rekey restart shutdown wrongkey garbage replay metrics health prometheus statuspage reload routes exit autoaddr isolate isolated filter tap networks confirm stall revoke flood spoof onboard mesh workers service systemd arm64 nat)
declare -A LIMIT_S=([rekey]=90 [ping]=60 [wrongkey]=60 [metrics]=60 [prometheus]=60 [statuspage]=60 [reload]=90 [confirm]=90 [stall]=60 [revoke]=60 [flood]=60 [spoof]=60 [onboard]=90 [mesh]=120 [workers]=60 [arm64]=120 [nat]=300 [systemd]=60 [exit]=90 [routes]=60 [isolated]=90 [fec]=90 [tap]=60 [networks]=90)
DEFAULT_LIMIT_S=45

scenarios=("$@")
((${#scenarios[@]})) || scenarios=("${ALL[@]}")

our_namespaces() { ip netns list 2>/dev/null | awk '$1 ~ /^veil-t-/ { print $1 }' | sort; }

# sweep BEFORE -- remove veil-t-* namespaces that did not exist before the scenario
sweep() {
	local ns pid left=0
	for ns in $(comm -13 <(printf '%s\n' "$1") <(our_namespaces)); do
		left=1
		echo "# leftover namespace $ns: removing it"
		for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
		ip netns del "$ns" 2>/dev/null
	done
	return "$left"
}

passed=0 failed=0 failed_names=() skipped_names=()
start=$SECONDS
for s in "${scenarios[@]}"; do
	if [[ ! -f "$DIR/$s.sh" ]]; then
		echo "not ok - $s: no such scenario ($DIR/$s.sh)"
		failed=$((failed + 1)) failed_names+=("$s")
		continue
	fi
	limit=${LIMIT_S[$s]:-$DEFAULT_LIMIT_S}
	before=$(our_namespaces)
	t0=$SECONDS
	echo "# ---- $s (limit ${limit}s)"
	timeout -k 10 "$limit" bash "$DIR/$s.sh" </dev/null
	rc=$?
	((rc == 124 || rc == 137)) && echo "not ok - $s: timed out after ${limit}s"
	sweep "$before" || { echo "not ok - $s: left a namespace behind"; rc=1; }
	if ((rc == 77)); then
		skipped_names+=("$s")
		echo "# SKIP $s ($((SECONDS - t0))s)"
	elif ((rc == 0)); then
		passed=$((passed + 1))
		echo "# PASS $s ($((SECONDS - t0))s)"
	else
		failed=$((failed + 1)) failed_names+=("$s")
		echo "# FAIL $s (exit $rc, $((SECONDS - t0))s)"
	fi
done
((${#skipped_names[@]})) && echo "# skipped: ${skipped_names[*]}"
((failed)) && echo "# failed: ${failed_names[*]}"
echo "# total $((SECONDS - start))s"
echo "netns: $passed passed, $failed failed"
((failed == 0))
