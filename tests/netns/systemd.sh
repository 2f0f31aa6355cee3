#!/usr/bin/env bash
# systemd.sh -- `veil service install` on a running systemd: the host's own /lib/systemd/systemd
# booted as PID 1 of a throw-away container, and veil@lab driven with the real systemctl.
#   boot: systemd reaches its (minimal) default target; is-system-running says running
#   install: the binary, the unit and the enable link; live, so daemon-reload ran
#   start: active; the TUN with its address in the container's netns (not the host's); veil
#          status answers on the default control socket; the daemon is systemd's main PID in
#          veil@lab.service's cgroup with CapEff = CapBnd = CAP_NET_ADMIN alone, NoNewPrivs
#   reload: SIGHUP, veil logs event=reloaded, same PID
#   stop: inactive, Result=success, exit status 0, the TUN gone
#   kill -9: auto-restart, then active again after RestartSec with a new PID (NRestarts=1)
#   config error: exit 2 -> failed, no auto-restart, still failed after RestartSec + 1 s
#   uninstall: stops the instance, disables it, removes unit and binary, keeps /etc/veil
#   host: its /etc/systemd/system, /etc/veil, /usr/local/bin/veil, machine-id, fstab and hostname
#         as they were; no TUN there
#
# The container (every namespace named veil-sd-$$; run-all.sh's sweep owns veil-t-*):
#   netns veil-sd-$$ (lo only) + unshare --pid --mount --uts --ipc --cgroup (--kill-child)
#   cgroup <host cgroup2>/veil-sd-$$, a cgroup namespace rooted there, a fresh cgroup2 on
#     /sys/fs/cgroup: systemd sees a unified hierarchy it owns (the host's may be hybrid)
#   /        overlay: lower = the host's / (read only through it), upper = tmpfs
#   /proc    fresh (pid ns), /proc/sys read-only; /sys fresh (netns) and read-only
#   /dev     tmpfs with null zero full random urandom tty net/tun, devpts, shm (no console)
#   /run /tmp  tmpfs
#   /etc/systemd/system: the host's enabled units (*.wants, *.requires) removed, every generator
#     off, units that would reach the kernel masked (modules, sysctl, binfmt, udev, apparmor,
#     clock, random seed, repart, TPM); default target veil-sd.target (sysinit only); own
#     machine-id and hostname; journal in /run. Bounding set without sys_module, sys_rawio,
#     sys_time, syslog, mac_*, wake_alarm, block_suspend, audit_*.
# The mounts live only in the container's mount namespace: when its PID 1 dies (cleanup: SIGKILL;
# unshare --kill-child does it too if this script dies), all of it goes; the cgroup is removed.
# Exit 77 (SKIP) only when this machine cannot boot a container systemd at all (not root, no
# cgroup2/overlay, namespaces refused); a missing systemd binary is a failure (make deps).
# shellcheck disable=SC2016,SC2317 # checks run eval '...' and functions by name (trap, wait_until)
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

skip() { printf 'ok - %s # SKIP %s\n' "$T_NAME" "$1"; exit 77; }
[[ $EUID -eq 0 ]] || skip "not root: booting systemd in namespaces needs root"
SYSTEMD=/lib/systemd/systemd
[[ -x $SYSTEMD ]] || die "missing $SYSTEMD (make deps: systemd)"
for c in systemctl unshare nsenter setpriv pivot_root findmnt; do command -v "$c" >/dev/null || die "missing command $c (make deps)"; done
grep -qw cgroup2 /proc/filesystems || skip "the kernel has no cgroup2 (systemd $(systemctl --version | awk 'NR==1{print $2}') needs a unified hierarchy here)"
# overlay may be a module the first mount loads
grep -qw overlay /proc/filesystems || [[ -n $(find "/lib/modules/$(uname -r)" -name 'overlay.ko*' 2>/dev/null) ]] ||
	skip "the kernel has no overlayfs (the container's root)"
CG_HOST=$(findmnt -n -t cgroup2 -o TARGET | head -n 1)
[[ -n $CG_HOST ]] || skip "no cgroup2 hierarchy mounted on the host"
err=$(unshare --pid --fork --mount --uts --ipc --cgroup --net true 2>&1) || skip "namespaces refused: $err"

# leftovers of an earlier run that was killed (its PID gone): namespace and cgroup
for n in $(ip netns list 2>/dev/null | awk '$1 ~ /^veil-sd-[0-9]+$/ { print $1 }'); do
	kill -0 "${n#veil-sd-}" 2>/dev/null && continue
	for p in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done # a container orphaned by a SIGKILL
	sleep 0.2
	ip netns del "$n" 2>/dev/null && note "removed stale namespace $n"
done
for d in "$CG_HOST"/veil-sd-*; do
	[[ -d $d ]] || continue
	kill -0 "${d##*-}" 2>/dev/null && continue
	find "$d" -depth -type d -exec rmdir {} + 2>/dev/null && note "removed stale cgroup $d"
done

net_begin
SD_NS=veil-sd-$$
SD_CG=$CG_HOST/veil-sd-$$
SD_UNSHARE='' SD_PID=''
CAPS_DROP=-sys_module,-sys_rawio,-sys_time,-syslog,-mac_admin,-mac_override,-wake_alarm,-block_suspend,-audit_control,-audit_read,-audit_write
TUN=veil-sd0 ADDR=100.64.0.1/24

# The container goes first (its PID 1 killed, its cgroup removed), then lib.sh's cleanup
# (the netns, the temp dir). Bounded: SIGKILL to a pid namespace's init ends all of it.
sd_cleanup() {
	local rc=$? i
	trap - EXIT
	if [[ -n $SD_PID ]] && ((rc != 0 || FAILS != 0)); then
		sdx journalctl -b --no-pager -o short-monotonic 2>&1 | tail -n 60 >"$TMPD/sd-journal.log"
	fi
	# unshare reaps its child and exits; it is killed only if it does not
	[[ -n $SD_PID ]] && kill -KILL "$SD_PID" 2>/dev/null
	if [[ -n $SD_UNSHARE ]]; then
		for ((i = 0; i < 50; i++)); do kill -0 "$SD_UNSHARE" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$SD_UNSHARE" 2>/dev/null
	fi
	if [[ -d $SD_CG ]]; then
		for ((i = 0; i < 30; i++)); do
			find "$SD_CG" -depth -type d -exec rmdir {} + 2>/dev/null
			[[ -d $SD_CG ]] || break
			sleep 0.1
		done
		[[ -d $SD_CG ]] && echo "# could not remove cgroup $SD_CG"
	fi
	(exit "$rc")
	cleanup
}
trap sd_cleanup EXIT

# sd_init W VEIL MACHINE_ID -- runs as PID 1 of the new namespaces (already in the
# netns and the cgroup namespace): builds the root under W, pivots into it, execs systemd
sd_init() {
	set -eu
	local W=$1 VEIL_SRC=$2 MID=$3 R g u p
	umask 022
	mount --make-rprivate /
	mount -t tmpfs -o mode=755 veil-sd "$W"
	mkdir "$W/upper" "$W/work" "$W/root"
	R=$W/root
	mount -t overlay veil-sd -o "lowerdir=/,upperdir=$W/upper,workdir=$W/work" "$R"
	mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
	for p in sys sysrq-trigger; do
		[[ -e $R/proc/$p ]] || continue
		mount --bind "$R/proc/$p" "$R/proc/$p"
		mount -o remount,bind,ro "$R/proc/$p"
	done
	mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
	mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
	mount -t tmpfs -o mode=755,nosuid dev "$R/dev"
	mknod -m 666 "$R/dev/null" c 1 3
	mknod -m 666 "$R/dev/zero" c 1 5
	mknod -m 666 "$R/dev/full" c 1 7
	mknod -m 666 "$R/dev/random" c 1 8
	mknod -m 666 "$R/dev/urandom" c 1 9
	mknod -m 666 "$R/dev/tty" c 5 0
	mkdir -m 755 "$R/dev/net" "$R/dev/pts"
	mknod -m 666 "$R/dev/net/tun" c 10 200
	mkdir -m 1777 "$R/dev/shm"
	mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
	ln -s pts/ptmx "$R/dev/ptmx"
	ln -s /proc/self/fd "$R/dev/fd"
	ln -s /proc/self/fd/0 "$R/dev/stdin"
	ln -s /proc/self/fd/1 "$R/dev/stdout"
	ln -s /proc/self/fd/2 "$R/dev/stderr"
	mount -t tmpfs -o mode=755,nosuid,nodev run "$R/run"
	mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"
	# from here on, writes go to the overlay's upper layer (tmpfs): the host's files stay as they are
	rm -rf "$R"/etc/systemd/system/*.wants "$R"/etc/systemd/system/*.requires
	mkdir -p "$R/etc/systemd/system-generators" "$R/etc/systemd/journald.conf.d"
	for g in "$R"/usr/lib/systemd/system-generators/*; do ln -sf /dev/null "$R/etc/systemd/system-generators/${g##*/}"; done
	for u in systemd-modules-load.service systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
		systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service systemd-udevd-control.socket \
		systemd-udevd-kernel.socket kmod-static-nodes.service apparmor.service systemd-timesyncd.service \
		systemd-random-seed.service systemd-repart.service systemd-pcrphase.service systemd-pcrphase-sysinit.service \
		systemd-journald-audit.socket systemd-firstboot.service systemd-pstore.service systemd-hwdb-update.service \
		sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount \
		dev-hugepages.mount; do
		ln -sf /dev/null "$R/etc/systemd/system/$u"
	done
	printf '[Unit]\nDescription=veil systemd test (sysinit only)\nRequires=sysinit.target\nAfter=sysinit.target\nAllowIsolate=yes\n' \
		>"$R/etc/systemd/system/veil-sd.target"
	ln -sf veil-sd.target "$R/etc/systemd/system/default.target"
	printf '[Journal]\nStorage=volatile\n' >"$R/etc/systemd/journald.conf.d/veil-sd.conf"
	: >"$R/etc/fstab"
	echo "$MID" >"$R/etc/machine-id"
	echo veil-sd >"$R/etc/hostname"
	hostname veil-sd
	mkdir -p "$R/opt/veil-sd"
	cp "$VEIL_SRC" "$R/opt/veil-sd/veil"
	cd "$R"
	pivot_root . .
	umount -l .
	exec setpriv --bounding-set "$CAPS_DROP" env -i container=veil-sd PATH=/usr/sbin:/usr/bin:/sbin:/bin \
		"$SYSTEMD" --unit=veil-sd.target --show-status=no
}

# sdx CMD... -- CMD inside the container (all its namespaces, its root), a clean environment
sdx() {
	timeout --foreground 20 nsenter -t "$SD_PID" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		LANG=C.UTF-8 SYSTEMD_PAGER='' SYSTEMD_COLORS=0 "$@"
}
# prop NAME... -- veil@lab's properties as NAME=VALUE words on one line
props() { local a=() p; for p in "$@"; do a+=(-p "$p"); done; sdx systemctl show "${a[@]}" veil@lab.service | sort | tr '\n' ' '; }
prop() { sdx systemctl show -P "$1" veil@lab.service; }
main_pid() { prop MainPID; }
# state_is ACTIVE SUB -- veil@lab is in that state
state_is() { [[ $(prop ActiveState) == "$1" && $(prop SubState) == "$2" ]]; }
tun_up() { local a; a=$(ip -n "$SD_NS" -o addr show dev "$TUN" 2>/dev/null) && [[ $a == *" $ADDR "* ]]; }
tun_absent() { ! ip -n "$SD_NS" link show dev "$TUN" >/dev/null 2>&1; }
host_state() {
	{
		find /etc/systemd/system /etc/veil /usr/local/bin/veil -printf '%p %y %m %s %T@ %l\n' 2>/dev/null | sort
		cat /etc/machine-id /etc/hostname /etc/fstab
		hostname
	} | sha256sum
}

# ---- boot -------------------------------------------------------------------------------------
host0=$(host_state)
NS_ALL+=("$SD_NS")
ip netns add "$SD_NS" || die "ip netns add $SD_NS"
ip -n "$SD_NS" link set lo up || die "lo up in $SD_NS"
mkdir "$SD_CG" || die "mkdir $SD_CG"
mkdir "$TMPD/sd"
mid=$(tr -d '-' </proc/sys/kernel/random/uuid)
t0=$(now_ms)
# the launcher joins the cgroup, then becomes nsenter, then unshare: $! is unshare's PID
bash -c 'echo $$ >"$1/cgroup.procs" && exec nsenter --net="/run/netns/$2" unshare --pid --fork --kill-child \
	--mount --uts --ipc --cgroup bash -c "$3" sd_init "${@:4}"' launcher \
	"$SD_CG" "$SD_NS" "SYSTEMD=$SYSTEMD CAPS_DROP=$CAPS_DROP; $(declare -f sd_init); sd_init \"\$@\"" \
	"$TMPD/sd" "$VEIL" "$mid" >"$TMPD/sd-init.log" 2>&1 </dev/null &
SD_UNSHARE=$!
disown "$SD_UNSHARE" # cleanup kills it: no "Killed" job notice
for ((i = 0; i < 50; i++)); do
	SD_PID=$(awk '{ print $1 }' "/proc/$SD_UNSHARE/task/$SD_UNSHARE/children" 2>/dev/null)
	[[ -n $SD_PID && $(cat "/proc/$SD_PID/comm" 2>/dev/null) == systemd ]] && break
	kill -0 "$SD_UNSHARE" 2>/dev/null || break
	SD_PID=''
	sleep 0.1
done
[[ -n $SD_PID ]] || die "systemd did not start in the container: $(tr '\n' '|' <"$TMPD/sd-init.log")"
# running, or degraded if a unit of the host's sysinit failed in here (named, not fatal: veil's is the unit under test)
booted() { [[ $(sdx systemctl is-system-running 2>/dev/null) =~ ^(running|degraded)$ ]]; }
wait_until 20 booted || die "systemd (PID $SD_PID) not up within 20 s: $(sdx systemctl is-system-running 2>&1); failed: $(sdx systemctl --failed --plain --no-legend 2>&1 | tr '\n' '|')"
boot_ms=$(($(now_ms) - t0))
ok "systemd boots as PID 1 of the container ($(systemctl --version | head -n 1 | cut -d' ' -f1-2), $(sdx systemctl is-system-running) after ${boot_ms} ms)"
bad=$(sdx systemctl --failed --plain --no-legend 2>&1 | awk '{ print $1 }' | tr '\n' ' ')
[[ -z $bad ]] || note "failed in the container (not veil's): $bad"
inside=$(sdx sh -c 'cat /proc/1/comm; grep "^0::" /proc/1/cgroup; stat -fc %T /sys/fs/cgroup' 2>&1 | tr '\n' ' ')
check "it is PID 1 there, in init.scope of its own cgroup namespace, on a unified hierarchy" "$inside" \
	test "$inside" = "systemd 0::/init.scope cgroup2fs "
started=$(sdx systemctl list-units --state=active --plain --no-legend --type=service 2>&1 | awk '{ print $1 }' | tr '\n' ' ')
note "services active after boot: $started"
check "nothing but journald's and sysinit's one-shot services came up" "$started" \
	eval '! grep -Eq "getty|udev|network|logind|dbus|cron|ssh|postgres|prometheus" <<<"$started"'

# ---- install ----------------------------------------------------------------------------------
out=$(sdx /opt/veil-sd/veil service install --name lab 2>&1)
rc=$?
check "veil service install --name lab: exit 0, live (daemon-reload, enable)" "rc=$rc: $out" \
	eval '((rc == 0)) && grep -qx "systemctl daemon-reload" <<<"$out" && grep -qx "systemctl enable veil@lab.service" <<<"$out"'
check "systemctl is-enabled veil@lab: enabled" "$(sdx systemctl is-enabled veil@lab 2>&1)" \
	test "$(sdx systemctl is-enabled veil@lab 2>&1)" = enabled
check "the unit is loaded from /etc/systemd/system/veil@.service, no reload pending" "$(props LoadState FragmentPath NeedDaemonReload)" \
	test "$(props LoadState FragmentPath NeedDaemonReload)" = "FragmentPath=/etc/systemd/system/veil@.service LoadState=loaded NeedDaemonReload=no "
note "unit: $(props Restart RestartUSec RestartPreventExitStatus CapabilityBoundingSet AmbientCapabilities)"

sdx sh -c 'umask 077; veil genkey >/etc/veil/lab.key && [ -s /etc/veil/lab.key ]' || die "veil genkey >/etc/veil/lab.key in the container failed"
# the default control socket (/var/run/veil.sock) and mgmt (127.0.0.1:7777), in the container's netns
printf 'key = "/etc/veil/lab.key"\nlisten = "127.0.0.1:51820"\naddress = ["%s"]\ntun = "%s"\n' "$ADDR" "$TUN" >"$TMPD/lab.toml"
sdx sh -c 'umask 077; cat >/etc/veil/lab.toml' <"$TMPD/lab.toml" || die "write /etc/veil/lab.toml"
check "/etc/veil is 0700, the key 0600" "$(sdx stat -c '%n %a' /etc/veil /etc/veil/lab.key 2>&1 | tr '\n' ' ')" \
	test "$(sdx stat -c %a /etc/veil /etc/veil/lab.key 2>&1 | tr '\n' ' ')" = "700 600 "

# ---- start ------------------------------------------------------------------------------------
sdx systemctl start veil@lab || die "systemctl start veil@lab failed: $(sdx journalctl -u veil@lab --no-pager -n 20 2>&1 | tr '\n' '|')"
wait_until 10 tun_up
check "systemctl start veil@lab: is-active says active" "$(sdx systemctl is-active veil@lab 2>&1)" \
	test "$(sdx systemctl is-active veil@lab 2>&1)" = active
check "the TUN $TUN with $ADDR is in the container's netns (after ${WAITED_MS} ms)" "$(ip -n "$SD_NS" -br addr 2>&1 | tr '\n' '|')" tun_up
check "and not in the host's" "the host has $TUN" eval '! ip link show dev "$TUN" >/dev/null 2>&1'
st_out=$(sdx /usr/local/bin/veil status 2>&1)
check "veil status answers on the default control socket" "$st_out" \
	eval 'grep -q "^interface: $TUN" <<<"$st_out" && grep -q "addresses: $ADDR" <<<"$st_out"'
mp=$(main_pid)
hpid=''
for p in $(ip netns pids "$SD_NS" 2>/dev/null); do
	[[ $(cat "/proc/$p/comm" 2>/dev/null) == veil && $(awk '/^NSpid:/ { print $NF }' "/proc/$p/status" 2>/dev/null) == "$mp" ]] && hpid=$p
done
st=$(sdx cat "/proc/$mp/status" 2>/dev/null)
caps=$(grep -E '^(CapEff|CapBnd|CapPrm|CapAmb|NoNewPrivs):' <<<"$st" | tr -s '\t' ' ' | tr '\n' ' ')
note "veil: MainPID $mp (host PID ${hpid:-?}), $caps"
cmd=$(sdx cat "/proc/$mp/cmdline" 2>&1 | tr '\0' ' ')
cg=$(sdx grep '^0::' "/proc/$mp/cgroup" 2>&1)
check "the main PID is veil up --config /etc/veil/lab.toml, in veil@lab.service's cgroup" "$cmd / $cg" \
	test "$cmd/$cg" = "/usr/local/bin/veil up --config /etc/veil/lab.toml /0::/system.slice/system-veil.slice/veil@lab.service"
check "CapEff and CapBnd are CAP_NET_ADMIN alone (0x1000), NoNewPrivs 1" "$caps" \
	eval 'grep -qx "CapEff:[[:space:]]*0000000000001000" <<<"$st" && grep -qx "CapBnd:[[:space:]]*0000000000001000" <<<"$st" && grep -qx "NoNewPrivs:[[:space:]]*1" <<<"$st"'

# ---- reload: SIGHUP (ExecReload), same process --------------------------------------------------
sdx systemctl reload veil@lab
reloaded() { local j; j=$(sdx journalctl -u veil@lab --no-pager -o cat 2>/dev/null); [[ $j == *'event=reloaded trigger=signal'* ]]; }
wait_until 5 reloaded
check "systemctl reload: veil re-reads its config (event=reloaded trigger=signal), same PID, active" "$(props ActiveState MainPID)" \
	eval 'reloaded && [[ $(main_pid) == "$mp" ]] && state_is active running'

# ---- stop -------------------------------------------------------------------------------------
t1=$(now_ms)
sdx systemctl stop veil@lab
stop_ms=$(($(now_ms) - t1))
p=$(props ActiveState Result ExecMainCode ExecMainStatus)
check "systemctl stop: inactive, Result=success, exited with status 0 (${stop_ms} ms)" "$p" \
	test "$p" = "ActiveState=inactive ExecMainCode=1 ExecMainStatus=0 Result=success "
check "the TUN is gone with it" "$TUN still there" tun_absent

# ---- kill -9: restarted ------------------------------------------------------------------------
sdx systemctl start veil@lab
wait_until 10 tun_up || die "veil@lab did not come back up after start: $(props ActiveState SubState Result)"
mp0=$(main_pid)
n0=$(prop NRestarts)
sdx kill -KILL "$mp0"
t1=$(now_ms)
auto_restart() { state_is activating auto-restart; }
wait_until 5 auto_restart
p=$(props Result ExecMainCode ExecMainStatus SubState)
check "kill -9: systemd records the signal and schedules a restart" "$p" \
	test "$p" = "ExecMainCode=2 ExecMainStatus=9 Result=signal SubState=auto-restart "
restarted() { state_is active running && [[ $(main_pid) != "$mp0" && $(main_pid) != 0 ]] && tun_up; }
wait_until 15 restarted
rs_ms=$(($(now_ms) - t1))
mp1=$(main_pid) n1=$(prop NRestarts)
check "and restarts it (Restart=on-failure, RestartSec $(prop RestartUSec)): active after ${rs_ms} ms, PID $mp0 -> $mp1, NRestarts $n0 -> $n1" \
	"$(props ActiveState SubState NRestarts MainPID)" eval 'restarted && ((n1 == n0 + 1))'
st_out=$(sdx /usr/local/bin/veil status 2>&1)
check "the restarted daemon answers veil status" "$st_out" grep -q "^interface: $TUN" <<<"$st_out"

# ---- a config error (exit 2): not restarted -----------------------------------------------------
sdx sh -c 'cp /etc/veil/lab.toml /etc/veil/lab.toml.good && echo "no_such_key = 1" >>/etc/veil/lab.toml'
sdx systemctl restart veil@lab
t1=$(now_ms)
failed() { state_is failed failed; }
wait_until 10 failed
p=$(props ActiveState SubState Result ExecMainCode ExecMainStatus)
check "a config error: veil exits 2, the unit is failed, no restart scheduled" "$p" \
	test "$p" = "ActiveState=failed ExecMainCode=1 ExecMainStatus=2 Result=exit-code SubState=failed "
# a restart would come RestartSec (5 s) after the exit: wait that long and a second more
rsec=$(prop RestartUSec)
rsec_s=${rsec%s}
[[ $rsec_s =~ ^[0-9]+$ ]] || rsec_s=5
while (($(now_ms) - t1 < (rsec_s + 1) * 1000)); do sleep 0.2; done
p=$(props ActiveState SubState NRestarts MainPID)
check "still failed $((($(now_ms) - t1) / 100))00 ms later (RestartPreventExitStatus=$(prop RestartPreventExitStatus | tr -d ' '))" "$p" \
	test "$p" = "ActiveState=failed MainPID=0 NRestarts=0 SubState=failed "
j=$(sdx journalctl -u veil@lab --no-pager -o cat 2>&1)
check "and the journal says why" "$(tail -n 5 <<<"$j" | tr '\n' '|')" grep -q "unknown key 'no_such_key'" <<<"$j"
sdx sh -c 'mv /etc/veil/lab.toml.good /etc/veil/lab.toml'
sdx systemctl start veil@lab
wait_until 10 tun_up
check "fixed config: systemctl start brings it back" "$(props ActiveState SubState Result)" state_is active running

# ---- uninstall --------------------------------------------------------------------------------
out=$(sdx /usr/local/bin/veil service uninstall 2>&1)
rc=$?
check "veil service uninstall: exit 0, stops and disables (live)" "rc=$rc: $out" \
	eval '((rc == 0)) && grep -qxF "systemctl stop veil@*.service" <<<"$out" && grep -qxF "systemctl disable veil@.service" <<<"$out" && grep -qx "systemctl daemon-reload" <<<"$out"'
p=$(props ActiveState LoadState Result)
check "veil@lab stopped cleanly (Result=success), its unit gone" "$p" \
	test "$p" = "ActiveState=inactive LoadState=not-found Result=success "
left=$(sdx sh -c 'for f in /etc/systemd/system/multi-user.target.wants/veil@lab.service /etc/systemd/system/veil@.service /usr/local/bin/veil /etc/veil/lab.toml /etc/veil/lab.key; do [ -e "$f" ] && echo "$f"; done' | tr '\n' ' ')
check "its TUN gone; enable link, unit and binary removed; /etc/veil/lab.toml and the key kept" "left: $left" \
	eval 'tun_absent && test "$left" = "/etc/veil/lab.toml /etc/veil/lab.key "'

# ---- the host ---------------------------------------------------------------------------------
check "the host's /etc/systemd/system, /etc/veil, /usr/local/bin/veil, machine-id, fstab and hostname are as they were" \
	"host state changed" test "$(host_state)" = "$host0"
note "boot ${boot_ms} ms, stop ${stop_ms} ms, kill -9 to running again ${rs_ms} ms"
finish
