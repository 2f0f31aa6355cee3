#!/usr/bin/env bash
# service.sh -- `veil service install|uninstall` in a scratch root, with the real systemctl
# (offline: --root) and the unit checked by systemd-analyze verify. No namespace: nothing runs
# (systemd.sh runs the unit under a real systemd).
#   install: the binary copied (0755), /etc/veil created 0700, veil@.service written and
#            veil@lab enabled (the multi-user.target.wants link); the unit verifies cleanly
#   uninstall: the link, the unit and the binary gone; /etc/veil and the key in it kept
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

net_begin
for c in systemctl systemd-analyze; do command -v "$c" >/dev/null || die "missing command $c (make deps: systemd)"; done
R="$TMPD/root"
mkdir -p "$R"
UNIT="$R/etc/systemd/system/veil@.service"
WANTS="$R/etc/systemd/system/multi-user.target.wants/veil@lab.service"

out=$("$VEIL" service install --root "$R" --name lab 2>&1)
check "install exits 0 and says what it did" "$out" \
	bash -c "grep -q '^installed $R/usr/local/bin/veil' <<<'$out' && grep -q '^wrote $UNIT' <<<'$out' && grep -q 'enable veil@lab.service' <<<'$out'"
check "the binary is a copy of this one, mode 755" "$(ls -l "$R/usr/local/bin/veil" 2>&1)" \
	bash -c "cmp -s '$VEIL' '$R/usr/local/bin/veil' && [[ \$(stat -c %a '$R/usr/local/bin/veil') == 755 ]]"
check "/etc/veil is created 0700" "$(stat -c %a "$R/etc/veil" 2>&1)" test "$(stat -c %a "$R/etc/veil" 2>/dev/null)" = 700
check "systemctl enabled veil@lab (multi-user.target.wants)" "$(ls -l "$R/etc/systemd/system/multi-user.target.wants" 2>&1)" \
	test "$(readlink "$WANTS")" = /etc/systemd/system/veil@.service
check "the unit runs with CAP_NET_ADMIN only and restarts on failure" "$(cat "$UNIT")" \
	bash -c "grep -qx 'CapabilityBoundingSet=CAP_NET_ADMIN' '$UNIT' && grep -qx 'AmbientCapabilities=CAP_NET_ADMIN' '$UNIT' && grep -qx 'Restart=on-failure' '$UNIT' && grep -qx 'ExecStart=/usr/local/bin/veil up --config /etc/veil/%i.toml' '$UNIT'"
# verify needs the binary where ExecStart says: an instance of the unit pointing into the root
sed "s|/usr/local/bin/veil|$R/usr/local/bin/veil|" "$UNIT" >"$TMPD/veil@lab.service"
verify=$(systemd-analyze verify "$TMPD/veil@lab.service" 2>&1)
check "systemd-analyze verify: no complaint" "$verify" test -z "$verify"

# the user's files survive everything
printf 'key = "/etc/veil/private.key"\n' >"$R/etc/veil/lab.toml"
"$VEIL" genkey >"$R/etc/veil/private.key"
chmod 600 "$R/etc/veil/private.key"
key_sum=$(sha256sum <"$R/etc/veil/private.key")
out=$("$VEIL" service install --root "$R" --name lab 2>&1)
check "a second install succeeds and points at the config" "$out" grep -q 'start: systemctl start veil@lab.service' <<<"$out"

out=$("$VEIL" service uninstall --root "$R" 2>&1)
check "uninstall exits 0, removes unit, link and binary" "$out; left: $(find "$R" -not -type d)" \
	bash -c "[[ ! -e '$UNIT' && ! -L '$WANTS' && ! -e '$R/usr/local/bin/veil' ]] && grep -q '^kept $R/etc/veil' <<<'$out'"
check "the config and the key are kept, unchanged" "key changed or gone" \
	bash -c "[[ -f '$R/etc/veil/lab.toml' && \$(sha256sum <'$R/etc/veil/private.key') == '$key_sum' ]]"

# a unit someone else wrote is left alone
mkdir -p "$(dirname "$UNIT")"
printf '[Service]\nExecStart=/usr/bin/true\n' >"$UNIT"
out=$("$VEIL" service install --root "$R" 2>&1)
rc=$?
check "install refuses a foreign unit (exit 2) and changes nothing" "rc=$rc: $out" \
	bash -c "(($rc == 2)) && [[ ! -e '$R/usr/local/bin/veil' && \$(cat '$UNIT') == *'/usr/bin/true'* ]]"
finish
