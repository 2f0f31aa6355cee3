# shellcheck shell=bash
# nebula: Nebula from Debian (1.6: IPv4-only overlay). A throwaway CA and one certificate per node
# from nebula-cert, no lighthouse (static_host_map names the peer's underlay endpoint), firewall
# open, AES-256-GCM ("cipher: aes"; NEBULA_CIPHER=chachapoly for ChaCha20-Poly1305), tun MTU 1420.
UDP_PORT=4242

neb_config() { # neb_config SIDE DEV LISTEN PEER-OL4 PEER-ENDPOINT
	cat <<YAML
pki: {ca: "$STATE/ca.crt", cert: "$STATE/$1.crt", key: "$STATE/$1.key"}
static_host_map: {"$4": ["$5:$UDP_PORT"]}
lighthouse: {am_lighthouse: false, interval: 60, hosts: []}
listen: {host: "$3", port: $UDP_PORT}
punchy: {punch: false}
cipher: ${NEBULA_CIPHER:-aes}
tun: {disabled: false, dev: "$2", mtu: 1420, tx_queue: 500, drop_local_broadcast: false, drop_multicast: false}
logging: {level: warning, format: text}
firewall:
  outbound: [{port: any, proto: any, host: any}]
  inbound: [{port: any, proto: any, host: any}]
YAML
}

impl_up() {
	command -v nebula >/dev/null && command -v nebula-cert >/dev/null || fail "nebula or nebula-cert missing"
	(
		umask 077 && cd "$STATE" &&
			nebula-cert ca -name "veil bench $RUN_ID" -duration 2h -out-crt ca.crt -out-key ca.key &&
			nebula-cert sign -ca-crt ca.crt -ca-key ca.key -name a -ip "$OL4_A/$OL4_LEN" -out-crt a.crt -out-key a.key &&
			nebula-cert sign -ca-crt ca.crt -ca-key ca.key -name b -ip "$OL4_B/$OL4_LEN" -out-crt b.crt -out-key b.key
	) >"$STATE/certs.log" 2>&1 || { cat "$STATE/certs.log" >&2; fail "nebula-cert"; }
	neb_config a neb-a "$UL4_A" "$OL4_B" "$EP_OF_B" >"$STATE/a.yml"
	neb_config b neb-b "$UL4_B" "$OL4_A" "$EP_OF_A" >"$STATE/b.yml"
	spawn nebula-a "$NS_A" nebula -config "$STATE/a.yml"
	spawn nebula-b "$NS_B" nebula -config "$STATE/b.yml"
	# nebula puts the certificate's address on its device itself
	until_ok 100 has_addr "$NS_A" neb-a "$OL4_A" && until_ok 100 has_addr "$NS_B" neb-b "$OL4_B" ||
		{ show_logs; fail "nebula did not bring up neb-a/neb-b within 10 s"; }
}
