# shellcheck shell=dash disable=SC1090,SC2034
# case.sh SHIM INIT ROOT VERB: runs one rc.common verb (start, reload, check, ...) of the
# init script INIT under SHIM, in whichever shell runs this file, with the init script's
# paths moved under ROOT (the fake veil is ROOT/usr/sbin/veil; UCI files are in
# ROOT/etc/config). Its stdout and stderr, then "exit N", go to the transcript ROOT/transcript.
SHIM=$1 INIT=$2 ROOT=$3 VERB=$4
SHIM_LOG=$ROOT/transcript
UCI_CONFIG_DIR=$ROOT/etc/config
export SHIM_LOG

. "$SHIM"
initscript=/etc/init.d/veil
. "$INIT"
PROG=$ROOT/usr/sbin/veil
TOML=$ROOT/var/etc/veil.toml
CANDIDATE=$ROOT/var/etc/veil.new/veil.toml
HOTPLUG=$ROOT/usr/libexec/veil-hotplug
UCI_FILE=$UCI_CONFIG_DIR/veil
ROLLBACK=$ROOT/var/run/veil.rollback.d
PATH=$ROOT/usr/bin:$PATH            # uci: tests/openwrt/fake-uci
FAKE_UCI_STATE=$ROOT/uci.state
export FAKE_UCI_STATE
# the rollback timer is recorded, not started; apply's ID is fixed
veil_timer() { shim_rec veil_timer "$@"; }
veil_apply_id() { echo 7-1700000000; }

# shellcheck disable=SC2086 # VERB may carry arguments ("apply 30")
$VERB >> "$SHIM_LOG" 2>&1
echo "exit $?" >> "$SHIM_LOG"
