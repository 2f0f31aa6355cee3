#!/bin/sh
# shellcheck shell=dash
# tests/openwrt/run.sh: runs openwrt/veil.init for every sample UCI config (samples/NAME.uci)
# under a shim of rc.common, procd, UCI and jshn (shim.sh), with a fake veil (fake-veil), in
# every shell available (bash, busybox ash, dash). For each, it compares
#   the transcript (procd/json/logger calls, fake veil argv, output, exit status and the
#     files left under /var)        with expected/NAME.log
#   /var/etc/veil.toml              with expected/NAME.toml      (absent: must not exist)
#   /var/etc/veil.new/veil.toml     with expected/NAME.new.toml  (absent: must not exist)
# Then, when a real veil that knows `up --check` is at hand, it runs the command line and
# TOML each sample produced through `veil up ... --check` (key paths moved to a temp dir).
#
# Lines "# test-NAME: VALUE" at the top of a sample say how to run it:
#   verb         start (default), reload, check, ...
#   uci          a file of the repository to use instead of the sample (openwrt/veil.config)
#   check-rc, check-msg, reload-rc, reload-msg   fake veil's exit status and stderr
#   existing-toml  copy expected/VALUE.toml to /var/etc/veil.toml first
#   file         PATH SAMPLE: copy samples/SAMPLE to PATH (under the test root) first (repeatable)
#   real         skip: no real-veil --check for this sample (it is meant to be rejected)
#
# Prints "ok - ..." / "not ok - ..." lines and last "openwrt: N passed, M failed"; exits 1
# if anything failed. POSIX sh: runs under bash, busybox ash and dash.
# Env: VEIL_OWRT_SHELLS  comma-separated shells (default: bash,busybox ash,dash where found)
#      VEIL_BIN          real binary for the --check pass (default <repo>/out/veil; none: skip)
#      VEIL_OWRT_UPDATE  1: write expected/ from the first shell's results (then review the diff)

DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$DIR/../.." && pwd)
INIT=$REPO/openwrt/veil.init
passed=0
failed=0

ok() { passed=$((passed + 1)); echo "ok - $*"; }
not_ok() { failed=$((failed + 1)); echo "not ok - $*"; }
indent() { sed 's/^/#   /'; }

if [ -n "${VEIL_OWRT_SHELLS:-}" ]; then
	shells=$VEIL_OWRT_SHELLS
else
	shells=""
	command -v bash > /dev/null 2>&1 && shells="bash"
	command -v busybox > /dev/null 2>&1 && busybox ash -c : 2> /dev/null && shells="${shells:+$shells,}busybox ash"
	command -v dash > /dev/null 2>&1 && shells="${shells:+$shells,}dash"
	case "$shells" in *busybox*) ;; *) echo "# busybox not found: the init script is not run under busybox ash (apt-get install busybox)" ;; esac
fi

# directive SAMPLE NAME: the value of "# test-NAME: VALUE" in SAMPLE
directive() { sed -n "s/^# test-$2: *//p" "$1" | head -n 1; }

# listing ROOT: what is left under ROOT/var, with modes (but not of /var and /var/etc,
# which the test runner's umask decides)
listing() {
	(cd "$1" && find var | sort) | while IFS= read -r f; do
		case "$f" in
		var | var/etc) echo "dir /$f" ;;
		*)
			if [ -d "$1/$f" ]; then t="dir"; else t="file"; fi
			echo "$t /$f $(stat -c %a "$1/$f")"
			;;
		esac
	done
}

# compare LABEL EXPECTED GOT: diff, or (VEIL_OWRT_UPDATE) copy; both may be absent
compare() {
	if [ "${VEIL_OWRT_UPDATE:-}" = 1 ] && [ "$first" = 1 ]; then
		if [ -f "$3" ]; then cp "$3" "$2"; else rm -f "$2"; fi
		return 0
	fi
	if [ ! -f "$2" ] && [ ! -f "$3" ]; then return 0; fi
	if [ ! -f "$2" ]; then echo "# $1: produced ${2##*/expected/} but no such file is expected:"; indent < "$3"; return 1; fi
	if [ ! -f "$3" ]; then echo "# $1: expected ${2##*/} but the file was not produced"; return 1; fi
	diff -u "$2" "$3" > "$work/diff" 2>&1 && return 0
	echo "# $1: differs from ${2##*/expected/} (- expected, + got):"
	indent < "$work/diff"
	return 1
}

# run_case NAME SHELL: one sample under one shell; leaves the root in $root
run_case() {
	name=$1 sh=$2 sample=$DIR/samples/$1.uci
	root=$work/$name.$(echo "$sh" | tr ' ' _)
	mkdir -p "$root/etc/config" "$root/usr/sbin" "$root/var"
	v=$(directive "$sample" uci)
	cp "${v:+$REPO/}${v:-$sample}" "$root/etc/config/veil"
	cp "$DIR/fake-veil" "$root/usr/sbin/veil"
	chmod 755 "$root/usr/sbin/veil"
	mkdir -p "$root/usr/libexec" "$root/usr/bin"
	install -m 755 "$DIR/fake-uci" "$root/usr/bin/uci"
	install -m 755 "$REPO/openwrt/veil.hotplug" "$root/usr/libexec/veil-hotplug"
	v=$(directive "$sample" existing-toml)
	if [ -n "$v" ]; then
		mkdir -p "$root/var/etc"
		(umask 077 && cp "$DIR/expected/$v.toml" "$root/var/etc/veil.toml")
	fi
	sed -n 's/^# test-file: *//p' "$sample" | while IFS= read -r v; do
		mkdir -p "$root$(dirname "${v% *}")"
		cp "$DIR/samples/${v#* }" "$root${v% *}"
	done
	verb=$(directive "$sample" verb)
	: > "$root/transcript"
	# shellcheck disable=SC2086 # "$sh" may be "busybox ash"
	FAKE_CHECK_RC=$(directive "$sample" check-rc) FAKE_CHECK_MSG=$(directive "$sample" check-msg) \
		FAKE_RELOAD_RC=$(directive "$sample" reload-rc) FAKE_RELOAD_MSG=$(directive "$sample" reload-msg) \
		$sh "$DIR/case.sh" "$DIR/shim.sh" "$INIT" "$root" "${verb:-start}" < /dev/null
	{
		sed "s|$root||g" "$root/transcript"
		listing "$root"
	} > "$root/got.log"
	label="$name [$sh]"
	bad=0
	compare "$label: transcript" "$DIR/expected/$name.log" "$root/got.log" || bad=1
	# a generated file may name paths under the root (the hook program): compared without it
	for v in veil.toml veil.new/veil.toml; do
		[ ! -f "$root/var/etc/$v" ] || sed "s|$root||g" "$root/var/etc/$v" > "$root/got.${v##*/}.${v%%/*}"
	done
	compare "$label: /var/etc/veil.toml" "$DIR/expected/$name.toml" "$root/got.veil.toml.veil.toml" || bad=1
	compare "$label: /var/etc/veil.new/veil.toml" "$DIR/expected/$name.new.toml" "$root/got.veil.toml.veil.new" || bad=1
	if [ "$bad" = 0 ]; then ok "$label: ${verb:-start}"; else not_ok "$label: ${verb:-start}"; fi
}

# real_check NAME ROOT: the command line procd got (or check printed), through the real
# `veil up --check`, with the key, psk and control paths moved to a temp dir
real_check() {
	local cname="$1" croot="$2" line r n prev a arg out
	# the command procd got, or the one `check` printed (its file is still the candidate)
	line=$(sed -n -e 's|^procd_set_param command /usr/sbin/veil ||p' -e 's|^command: /usr/sbin/veil ||p' "$croot/got.log" | tail -n 1)
	[ -n "$line" ] || return 0
	[ "$(directive "$DIR/samples/$cname.uci" real)" != skip ] || return 0
	r=$croot/real
	mkdir -p "$r"
	(umask 077 && "$VEIL_BIN" genkey > "$r/private.key" && "$VEIL_BIN" genpsk > "$r/network.psk")
	eval "set -- $line"
	n=$#
	prev=""
	for a in "$@"; do
		arg=$a
		case "$prev" in
		--key) arg=$r/private.key ;;
		--psk) arg=$r/network.psk ;;
		--control) arg=$r/veil.sock ;;
		--hook) arg=all=$REPO/openwrt/veil.hotplug ;;
		--config)
			if [ -f "$croot$a" ]; then
				arg=$croot$a
			elif [ -f "$croot/var/etc/veil.new/veil.toml" ]; then
				arg=$croot/var/etc/veil.new/veil.toml
			fi
			;;
		esac
		# a peer's own secret (psk_file) names a router's path: a test secret stands in for it;
		# with [[network]] tables the key and the hook are the file's too
		if [ "$prev" = --config ] && grep -q '^psk = \|^key = ' "$arg"; then
			sed -e "s|^psk = .*|psk = \"$r/network.psk\"|" -e "s|^key = .*|key = \"$r/private.key\"|" \
				-e "s|^hook = .*|hook = [\"all=$REPO/openwrt/veil.hotplug\"]|" "$arg" > "$r/veil.toml"
			arg=$r/veil.toml
		fi
		set -- "$@" "$arg"
		prev=$a
	done
	shift "$n"
	if out=$("$VEIL_BIN" "$@" --check 2>&1); then
		ok "$cname: real veil accepts the command line and TOML (up --check)"
	else
		not_ok "$cname: real veil rejects the command line or TOML (up --check, exit $?)"
		echo "# $VEIL_BIN $* --check" | sed "s|$work|\$TMP|g"
		printf '%s\n' "$out" | indent
	fi
}

work=$(mktemp -d "${TMPDIR:-/tmp}/veil-openwrt.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM

VEIL_BIN=${VEIL_BIN:-$REPO/out/veil}
real=0
if [ "$VEIL_BIN" = none ]; then
	:
elif [ ! -x "$VEIL_BIN" ]; then
	echo "# no $VEIL_BIN (make build): the real-veil --check pass is skipped"
elif ! "$VEIL_BIN" help up 2>&1 | grep -q -- '--check'; then
	echo "# $VEIL_BIN does not know 'up --check' yet: the real-veil --check pass is skipped"
else
	real=1
fi

old_ifs=$IFS
IFS=,
# shellcheck disable=SC2086
set -- $shells
IFS=$old_ifs
for sample in "$DIR"/samples/*.uci; do
	name=${sample##*/}
	name=${name%.uci}
	first=1
	for sh in "$@"; do
		run_case "$name" "$sh"
		if [ "$first" = 1 ] && [ "$real" = 1 ]; then real_check "$name" "$root"; fi
		first=0
	done
done

# The event path on a router: veil --hook all=/usr/libexec/veil-hotplug -> hotplug-call veil ->
# /etc/hotplug.d/veil/50-uci-join, which writes a joined peer into UCI. Run under each shell with
# a fake hotplug-call, uci (tests/openwrt/fake-uci) and logger that record their calls.
# join_case SHELL LABEL EXPECT-GREP|none ENV...: sources 50-uci-join as hotplug-call does, in a subshell.
join_case() {
	local sh="$1" label="$2" want="$3"
	shift 3
	# shellcheck disable=SC2086 # "$sh" may be "busybox ash"
	env PATH="$bin:$PATH" SHIM_LOG="$hp/calls" FAKE_UCI_STATE="$hp/state" "$@" \
		$sh -c ". '$REPO/openwrt/veil.uci-join'" >> "$hp/calls" 2>&1
	if { [ "$want" = none ] && ! grep -q '^uci' "$hp/calls"; } || { [ "$want" != none ] && grep -q "$want" "$hp/state" "$hp/calls"; }; then ok "hotplug [$sh]: $label"; else
		not_ok "hotplug [$sh]: $label"
		echo "# wanted /$want/ in:"; indent < "$hp/calls"; indent < "$hp/state"
	fi
}

for sh in "$@"; do
	hp=$work/hotplug.$(echo "$sh" | tr ' ' _)
	bin=$hp/bin
	mkdir -p "$bin"
	cp "$DIR/fake-uci" "$bin/uci"
	# shellcheck disable=SC2016 # the fakes expand their variables when they run
	printf '#!/bin/sh\necho "logger $*" >> "$SHIM_LOG"\n' > "$bin/logger"
	# shellcheck disable=SC2016
	printf '#!/bin/sh\necho "hotplug-call $1 ACTION=$ACTION VEIL_PEER=$VEIL_PEER" >> "$SHIM_LOG"\n' > "$bin/hotplug-call"
	chmod 755 "$bin/logger" "$bin/hotplug-call"
	: > "$hp/calls"
	# shellcheck disable=SC2086
	env SHIM_LOG="$hp/calls" HOTPLUG_CALL="$bin/hotplug-call" VEIL_PEER=laptop $sh "$REPO/openwrt/veil.hotplug" peer_up
	if grep -qx "hotplug-call veil ACTION=peer_up VEIL_PEER=laptop" "$hp/calls"; then ok "hotplug [$sh]: veil-hotplug EVENT runs hotplug-call veil with ACTION=EVENT"; else
		not_ok "hotplug [$sh]: veil-hotplug EVENT runs hotplug-call veil with ACTION=EVENT"; indent < "$hp/calls"; fi

	key=q9mVXPJ2Ydo6QfQb8jpb5vLQh8g0pZ1Fh0YOXpfT1mY=
	: > "$hp/state"; : > "$hp/calls"
	join_case "$sh" "peer_up is not a join: no uci call" none ACTION=peer_up VEIL_PEER=x
	join_case "$sh" "peer_joined: a section named after the peer ('-' and '.' as '_')" "^veil.lap_top_1=peer$" \
		ACTION=peer_joined VEIL_PEER=lap-top.1 VEIL_PUBLIC_KEY=$key VEIL_ALLOWED_IPS=100.64.0.5/32
	want="veil.lap_top_1.name='lap-top.1'
veil.lap_top_1.public_key='$key'
veil.lap_top_1.allowed_ips='100.64.0.5/32'"
	if [ "$(grep '^veil.lap_top_1\.' "$hp/state")" = "$want" ] && grep -q '^uci -q -c /etc/config -t /.* commit veil$' "$hp/calls" &&
		grep -q 'logger -t veil -p daemon.notice joined peer lap-top.1 (100.64.0.5/32) recorded' "$hp/calls"; then
		ok "hotplug [$sh]: name, key and allowed_ips set, committed through a save directory of its own, logged"
	else
		not_ok "hotplug [$sh]: name, key and allowed_ips set, committed, logged"; indent < "$hp/state"; indent < "$hp/calls"
	fi
	join_case "$sh" "the same key again adds nothing" "^veil.lap_top_1=peer$" \
		ACTION=peer_joined VEIL_PEER=lap-top.1 VEIL_PUBLIC_KEY=$key VEIL_ALLOWED_IPS=100.64.0.5/32
	[ "$(grep -c public_key "$hp/state")" = 1 ] || { not_ok "hotplug [$sh]: a second event added a second peer"; indent < "$hp/state"; }
	join_case "$sh" "a taken section name: an anonymous section instead" "^veil.cfg000002.public_key='other'$" \
		ACTION=peer_joined VEIL_PEER=lap_top_1 VEIL_PUBLIC_KEY=other VEIL_ALLOWED_IPS=100.64.0.6/32
	echo "veil.main.config_file='/etc/veil/mine.toml'" >> "$hp/state"
	join_case "$sh" "with a config_file of the user's own: nothing added" "uci -q get veil.main.config_file" \
		ACTION=peer_joined VEIL_PEER=third VEIL_PUBLIC_KEY=third VEIL_ALLOWED_IPS=100.64.0.7/32
	if grep -q "third" "$hp/state"; then not_ok "hotplug [$sh]: a peer added although config_file is set"; fi
	: > "$hp/state"
	join_case "$sh" "a failed commit is logged as an error" "daemon.err could not record joined peer bee in /etc/config/veil" \
		ACTION=peer_joined VEIL_PEER=bee VEIL_PUBLIC_KEY=$key VEIL_ALLOWED_IPS=100.64.0.8/32 FAKE_UCI_COMMIT_RC=1
	# an apply waits for confirm: the file it would roll back to gets the joiner as well
	: > "$hp/state"
	mkdir -p "$hp/rollback"
	: > "$hp/rollback/veil"
	join_case "$sh" "during an apply the kept file gets the joiner too" "^veil.wasp.public_key='$key'$" \
		ACTION=peer_joined VEIL_PEER=wasp VEIL_PUBLIC_KEY=$key VEIL_ALLOWED_IPS=100.64.0.9/32 VEIL_ROLLBACK_DIR="$hp/rollback"
	if ! grep -qx "veil.wasp.public_key='$key'" "$hp/rollback/.fake-state"; then
		not_ok "hotplug [$sh]: the kept file of the apply did not get the joiner"; indent < "$hp/calls"
	fi
	: > "$hp/state"
	mkdir -p "$hp/var" "$hp/keys"
	echo SECRET > "$hp/var/peer-guest.psk"
	join_case "$sh" "an isolated joiner is written down isolated" "^veil.guest.isolated='1'$" \
		ACTION=peer_joined VEIL_PEER=guest VEIL_PUBLIC_KEY=$key VEIL_ALLOWED_IPS=100.64.0.10/32 VEIL_ISOLATED=true VEIL_ROLLBACK_DIR="$hp/none" \
		VEIL_PSK_FILE=peer-guest.psk VEIL_CONF_DIR="$hp/var" VEIL_KEY_DIR="$hp/keys"
	if grep -qx "veil.guest.psk_file='$hp/keys/peer-guest.psk'" "$hp/state" && [ "$(cat "$hp/keys/peer-guest.psk")" = SECRET ] &&
		[ "$(stat -c %a "$hp/keys/peer-guest.psk")" = 600 ]; then ok "hotplug [$sh]: its own secret kept in the key directory (0600) and named"; else
		not_ok "hotplug [$sh]: its own secret kept and named"; indent < "$hp/state"; fi
done

echo "openwrt: $passed passed, $failed failed"
[ "$failed" = 0 ]
