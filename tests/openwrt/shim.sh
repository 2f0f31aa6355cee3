# shellcheck shell=dash disable=SC1090
# shim.sh: just enough of OpenWrt's rc.common, /lib/functions.sh (UCI), procd.sh and jshn.sh
# to run openwrt/veil.init outside OpenWrt. Sourced by case.sh; written for this test (it
# follows the documented behaviour of those functions, not their code).
#
# Every procd_*, json_* and logger call is written to $SHIM_LOG, one line per call, each
# argument shell-quoted when it needs to be. Calls in the wrong place (a param outside an
# instance, an instance outside a service, unbalanced json) are written as "SHIM ERROR: ...".
#
# config_load NAME reads $UCI_CONFIG_DIR/NAME. Like the real one (which evaluates the output
# of `uci export`), it runs the file with config/option/list defined as functions, so the
# samples must use uci export syntax: one statement per line, values in single quotes.

# shim_q WORD: WORD, single-quoted if it holds anything but [A-Za-z0-9_./:=@,+%-].
shim_q() {
	case "$1" in
	'' | *[!A-Za-z0-9_./:=@,+%-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
	*) printf '%s' "$1" ;;
	esac
}

shim_rec() {
	local line="" w
	for w in "$@"; do
		line="$line${line:+ }$(shim_q "$w")"
	done
	printf '%s\n' "$line" >> "$SHIM_LOG"
}

shim_error() {
	printf 'SHIM ERROR: %s\n' "$*" >> "$SHIM_LOG"
}

shim_name_ok() {
	case "$1" in
	'' | *[!A-Za-z0-9_]*) shim_error "invalid UCI name '$1'"; return 1 ;;
	esac
}

# ---- /lib/functions.sh: UCI ---------------------------------------------------------------

SHIM_VARS=""        # CONFIG_* variables set by the last config_load
SHIM_SECTIONS=""    # its section names, in file order
SHIM_CUR=""
SHIM_ANON=0

shim_set() {
	eval "CONFIG_$1=\$2"
	SHIM_VARS="$SHIM_VARS CONFIG_$1"
}

config() {
	local name="$2"
	shim_name_ok "$1" || return 1
	if [ -z "$name" ]; then
		SHIM_ANON=$((SHIM_ANON + 1))
		name="cfg$SHIM_ANON"
	fi
	shim_name_ok "$name" || return 1
	SHIM_CUR="$name"
	SHIM_SECTIONS="$SHIM_SECTIONS $name"
	shim_set "${name}_TYPE" "$1"
}

option() {
	shim_name_ok "$1" || return 1
	shim_set "${SHIM_CUR}_$1" "$2"
}

# A list item: appended to the space-separated value (what config_get returns) and kept as
# _ITEMn / _LENGTH (what config_list_foreach walks).
list() {
	local len old
	shim_name_ok "$1" || return 1
	eval "len=\${CONFIG_${SHIM_CUR}_${1}_LENGTH:-0} old=\${CONFIG_${SHIM_CUR}_${1}}"
	len=$((len + 1))
	shim_set "${SHIM_CUR}_${1}_ITEM$len" "$2"
	shim_set "${SHIM_CUR}_${1}_LENGTH" "$len"
	shim_set "${SHIM_CUR}_$1" "${old:+$old }$2"
}

config_load() {
	local v
	for v in $SHIM_VARS; do unset "$v"; done
	SHIM_VARS="" SHIM_SECTIONS="" SHIM_CUR="" SHIM_ANON=0
	[ -f "$UCI_CONFIG_DIR/$1" ] || return 1
	. "$UCI_CONFIG_DIR/$1"
}

# config_get VAR SECTION OPTION [DEFAULT]  (an empty value counts as unset, as on OpenWrt)
# config_get SECTION OPTION                (prints the value)
config_get() {
	if [ $# -le 2 ]; then
		shim_name_ok "$1$2" || return 1
		eval "printf '%s\n' \"\${CONFIG_${1}_${2}}\""
		return 0
	fi
	shim_name_ok "$1$2$3" || return 1
	eval "export $1=\"\${CONFIG_${2}_${3}:-\$4}\""
}

config_get_bool() {
	local _v
	config_get _v "$2" "$3" "$4"
	case "$_v" in
	1 | on | true | yes | enabled) _v=1 ;;
	0 | off | false | no | disabled) _v=0 ;;
	*) _v="$4" ;;
	esac
	eval "export $1=\$_v"
}

# config_foreach FUNCTION [TYPE [ARGS...]]
config_foreach() {
	local _fn="$1" _type="$2" _s _t
	shift
	[ $# -gt 0 ] && shift
	for _s in $SHIM_SECTIONS; do
		eval "_t=\$CONFIG_${_s}_TYPE"
		[ -z "$_type" ] || [ "$_t" = "$_type" ] || continue
		"$_fn" "$_s" "$@"
	done
}

# config_list_foreach SECTION OPTION FUNCTION [ARGS...]: a plain option is not a list.
config_list_foreach() {
	local _s="$1" _o="$2" _fn="$3" _len _i=1 _v
	shift 3
	config_get _len "$_s" "${_o}_LENGTH"
	[ -n "$_len" ] || return 0
	while [ "$_i" -le "$_len" ]; do
		config_get _v "$_s" "${_o}_ITEM$_i"
		"$_fn" "$_v" "$@"
		_i=$((_i + 1))
	done
}

# ---- logger, jshn.sh, procd.sh -----------------------------------------------------------

logger() { shim_rec logger "$@"; }

SHIM_SERVICE=0 SHIM_INSTANCE=0 SHIM_DATA=0 SHIM_JSON=0 SHIM_COMMAND=0

shim_json() {
	[ "$SHIM_DATA" = 1 ] || shim_error "$1 outside procd_open_data"
	shim_rec "$@"
}
json_add_array() { shim_json json_add_array "$@"; SHIM_JSON=$((SHIM_JSON + 1)); }
json_add_object() { shim_json json_add_object "$@"; SHIM_JSON=$((SHIM_JSON + 1)); }
json_close_array() { shim_json json_close_array "$@"; SHIM_JSON=$((SHIM_JSON - 1)); }
json_close_object() { shim_json json_close_object "$@"; SHIM_JSON=$((SHIM_JSON - 1)); }
json_add_string() { shim_json json_add_string "$@"; }
json_add_int() { shim_json json_add_int "$@"; }
json_add_boolean() { shim_json json_add_boolean "$@"; }

procd_open_service() {
	[ "$SHIM_SERVICE" = 0 ] || shim_error "procd_open_service inside a service"
	SHIM_SERVICE=1
	shim_rec procd_open_service "$@"
}

# Like procd.sh: closing the service collects the triggers, then sends it to procd.
procd_close_service() {
	[ "$SHIM_SERVICE" = 1 ] || shim_error "procd_close_service without procd_open_service"
	[ "$SHIM_INSTANCE" = 0 ] || shim_error "procd_close_service with an open instance"
	shim_rec procd_open_trigger
	service_triggers
	shim_rec procd_close_trigger
	shim_rec procd_close_service "$@"
	SHIM_SERVICE=0
}

procd_open_instance() {
	[ "$SHIM_SERVICE" = 1 ] || shim_error "procd_open_instance outside a service"
	[ "$SHIM_INSTANCE" = 0 ] || shim_error "procd_open_instance inside an instance"
	SHIM_INSTANCE=1 SHIM_COMMAND=0
	shim_rec procd_open_instance "$@"
}

procd_set_param() {
	[ "$SHIM_INSTANCE" = 1 ] || shim_error "procd_set_param outside an instance"
	[ "$1" != command ] || SHIM_COMMAND=1
	shim_rec procd_set_param "$@"
}

procd_append_param() {
	[ "$SHIM_INSTANCE" = 1 ] || shim_error "procd_append_param outside an instance"
	shim_rec procd_append_param "$@"
}

procd_close_instance() {
	[ "$SHIM_INSTANCE" = 1 ] || shim_error "procd_close_instance without procd_open_instance"
	[ "$SHIM_COMMAND" = 1 ] || shim_error "instance without a command"
	[ "$SHIM_DATA" = 0 ] || shim_error "procd_close_instance with open data"
	SHIM_INSTANCE=0
	shim_rec procd_close_instance "$@"
}

procd_open_data() {
	[ "$SHIM_INSTANCE" = 1 ] || shim_error "procd_open_data outside an instance"
	SHIM_DATA=1
	shim_rec procd_open_data "$@"
}

procd_close_data() {
	[ "$SHIM_DATA" = 1 ] || shim_error "procd_close_data without procd_open_data"
	[ "$SHIM_JSON" = 0 ] || shim_error "procd_close_data with $SHIM_JSON unclosed json arrays/objects"
	SHIM_DATA=0
	shim_rec procd_close_data "$@"
}

procd_add_reload_trigger() {
	[ "$SHIM_SERVICE" = 1 ] || shim_error "procd_add_reload_trigger outside service_triggers"
	shim_rec procd_add_reload_trigger "$@"
}

procd_add_interface_trigger() {
	[ "$SHIM_SERVICE" = 1 ] || shim_error "procd_add_interface_trigger outside service_triggers"
	shim_rec procd_add_interface_trigger "$@"
}

procd_set_config_changed() { shim_rec procd_set_config_changed "$@"; }
procd_kill() { shim_rec procd_kill "$@"; }

# ---- rc.common (USE_PROCD) ---------------------------------------------------------------
# Defaults first; the init script, sourced after this file, overrides them.

start_service() { return 0; }
stop_service() { return 0; }
service_triggers() { return 0; }

extra_command() { EXTRA_COMMANDS="${EXTRA_COMMANDS:+$EXTRA_COMMANDS }$1"; }

rc_procd() {
	local method=set
	[ -n "$2" ] && method=add
	procd_open_service veil /etc/init.d/veil
	"$@"
	procd_close_service "$method"
}

# The exit status of start is that of service_started, not of start_service (as on OpenWrt).
start() {
	rc_procd start_service "$@"
	if type service_started > /dev/null 2>&1; then
		service_started
	fi
}

stop() {
	stop_service "$@"
	procd_kill veil "$1"
	if type service_stopped > /dev/null 2>&1; then
		service_stopped
	fi
}

restart() {
	stop "$@"
	start "$@"
}

reload() {
	if type reload_service > /dev/null 2>&1; then
		reload_service "$@"
	else
		start
	fi
}
