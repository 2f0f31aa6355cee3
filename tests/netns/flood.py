#!/usr/bin/env python3
"""Handshake-flood tools for flood.sh (standard library only; run inside a namespace).

  flood.py capture-hello IFACE SRC PORT SECONDS MAX OUTFILE READYFILE
      sniff (AF_PACKET) ClientHellos (UDP payload of 154 bytes opening 16 03 03 00 95 01)
      from SRC to UDP port PORT on IFACE, in either direction; write their UDP payloads
      as hex lines to OUTFILE. Touches READYFILE once the socket is bound. Stops after
      SECONDS or MAX hellos. Prints "captured N".
  flood.py flood SRC-BASE NSRC DST PORT PUBKEY SECONDS PPS HELLOFILE
      for SECONDS (or until SIGTERM/SIGINT), send ClientHello-sized datagrams to DST:PORT
      from NSRC consecutive source addresses starting at SRC-BASE (IPv4), 4 source ports
      each, round-robin over three kinds:
        junk   154 bytes opening 16 03 03 00 95 01, random rest (MAC1 wrong)
        mac1   the same with a correct MAC1 for PUBKEY (base64): the receiver cannot
               drop it before its Diffie-Hellman unless its admission limiter does
        replay the real ClientHellos in HELLOFILE (hex lines; "-" for none), re-sent as
               they are from every source
      PPS 0 sends as fast as the sockets take them. Counts what comes back by
      handshake type. Prints one line:
      "sent N junk J mac1 M replay R secs S pps P bytes_out O replies K server_hello H
       cookie C other X bytes_in I"
  flood.py spoof SRC DST PORT PUBKEY SECONDS PPS
      for SECONDS (or until SIGTERM/SIGINT), send ClientHellos with a correct MAC1 for
      PUBKEY and a forged IPv4 source address SRC (random source ports) to DST:PORT through
      a raw socket, PPS a second. Replies go to the real SRC, not here.
      Prints "spoofed N from SRC secs S pps P".
"""
import base64
import hashlib
import hmac
import ipaddress
import os
import select
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
HELLO_HEAD = b"\x16\x03\x03\x00\x95\x01"
HELLO_LEN = 154
MAC1_AT = 122
PORTS_PER_SRC = 4
POOL = 2048


class Stop(Exception):
    pass


def capture_hello(iface, src, port, seconds, limit, outfile, readyfile):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    open(readyfile, "w").close()
    src_b = socket.inet_aton(src)
    hellos = []
    deadline = time.monotonic() + seconds
    while len(hellos) < limit:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        frame = s.recv(65535)
        if len(frame) < 14 + 20 + 8 or struct.unpack(">H", frame[12:14])[0] != ETH_P_IP:
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != socket.IPPROTO_UDP or ip[12:16] != src_b:
            continue
        if struct.unpack(">H", ip[ihl + 2:ihl + 4])[0] != port:
            continue
        payload = ip[ihl + 8:struct.unpack(">H", ip[2:4])[0]]
        if len(payload) == HELLO_LEN and payload.startswith(HELLO_HEAD) and payload not in hellos:
            hellos.append(payload)
    with open(outfile, "w") as f:
        for h in hellos:
            f.write(h.hex() + "\n")
    print(f"captured {len(hellos)}")


def make_pool(pubkey):
    mac1_key = hashlib.sha256(b"mac1----" + pubkey).digest()
    junk, mac1 = [], []
    for _ in range(POOL):
        body = bytearray(HELLO_HEAD + os.urandom(HELLO_LEN - len(HELLO_HEAD)))
        body[MAC1_AT + 16:] = bytes(16)  # MAC2 zero: no cookie held
        junk.append(bytes(body))
        m = bytearray(HELLO_HEAD + os.urandom(HELLO_LEN - len(HELLO_HEAD)))
        m[MAC1_AT:MAC1_AT + 16] = hmac.new(mac1_key, bytes(m[:MAC1_AT]), hashlib.sha256).digest()[:16]
        m[MAC1_AT + 16:] = bytes(16)
        mac1.append(bytes(m))
    return junk, mac1


def flood(src_base, nsrc, dst, port, pubkey_b64, seconds, pps, hellofile):
    pubkey = base64.b64decode(pubkey_b64)
    if len(pubkey) != 32:
        sys.exit("flood.py: PUBKEY is not 32 bytes of base64")
    junk, mac1 = make_pool(pubkey)
    replays = []
    if hellofile != "-":
        with open(hellofile) as f:
            replays = [bytes.fromhex(line.strip()) for line in f if line.strip()]
    kinds = [("junk", junk), ("mac1", mac1)] + ([("replay", replays)] if replays else [])
    base = ipaddress.IPv4Address(src_base)
    socks = []
    for i in range(nsrc):
        for _ in range(PORTS_PER_SRC):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((str(base + i), 0))
            s.setblocking(False)
            socks.append(s)
    counts = {"junk": 0, "mac1": 0, "replay": 0}
    replies = {"server_hello": 0, "cookie": 0, "other": 0}
    bytes_out = bytes_in = 0

    def on_signal(_sig, _frm):
        raise Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def drain():
        nonlocal bytes_in
        readable = select.select(socks, [], [], 0)[0]
        for s in readable:
            while True:
                try:
                    d = s.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                bytes_in += len(d)
                t = d[5] if len(d) > 5 and d[0] == 0x16 else -1
                replies["server_hello" if t == 2 else "cookie" if t == 3 else "other"] += 1

    t0 = time.monotonic()
    deadline = t0 + seconds
    n = 0
    k = 0
    try:
        while time.monotonic() < deadline:
            batch = 256
            tb = time.monotonic()
            for _ in range(batch):
                name, pool = kinds[n % len(kinds)]
                body = pool[(n // len(kinds)) % len(pool)]
                s = socks[k % len(socks)]
                k += 1
                try:
                    s.sendto(body, (dst, port))
                except BlockingIOError:
                    select.select([], [s], [], 0.005)
                    continue
                except OSError:
                    continue
                n += 1
                counts[name] += 1
                bytes_out += len(body)
            drain()
            if pps > 0:  # pace: this batch should take batch/pps seconds
                spare = batch / pps - (time.monotonic() - tb)
                if spare > 0:
                    time.sleep(spare)
    except Stop:
        pass
    secs = time.monotonic() - t0
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # answers still in flight
        drain()
        time.sleep(0.05)
    print(f"sent {n} junk {counts['junk']} mac1 {counts['mac1']} replay {counts['replay']} "
          f"secs {secs:.1f} pps {int(n / secs) if secs > 0 else 0} bytes_out {bytes_out} "
          f"replies {sum(replies.values())} server_hello {replies['server_hello']} "
          f"cookie {replies['cookie']} other {replies['other']} bytes_in {bytes_in}", flush=True)


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    acc = sum(struct.unpack(f">{len(data) // 2}H", data))
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return ~acc & 0xFFFF


def spoof(src, dst, port, pubkey_b64, seconds, pps):
    """MAC1-valid ClientHellos with a forged IPv4 source address (raw socket, IP_HDRINCL)."""
    pubkey = base64.b64decode(pubkey_b64)
    _, mac1 = make_pool(pubkey)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL implied
    src_b, dst_b = socket.inet_aton(src), socket.inet_aton(dst)

    def on_signal(_sig, _frm):
        raise Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    n = 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    try:
        while time.monotonic() < deadline:
            body = mac1[n % len(mac1)]
            sport = 1024 + (n * 7919) % 60000
            udp_len = 8 + len(body)
            pseudo = src_b + dst_b + struct.pack(">BBH", 0, socket.IPPROTO_UDP, udp_len)
            udp = struct.pack(">HHHH", sport, port, udp_len, 0) + body
            csum = checksum(pseudo + udp) or 0xFFFF
            udp = udp[:6] + struct.pack(">H", csum) + udp[8:]
            ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, n & 0xFFFF, 0, 64, socket.IPPROTO_UDP, 0,
                             src_b, dst_b)
            ip = ip[:10] + struct.pack(">H", checksum(ip)) + ip[12:]
            try:
                s.sendto(ip + udp, (dst, 0))
                n += 1
            except OSError:
                pass
            if pps > 0:
                ahead = n / pps - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
    except Stop:
        pass
    secs = time.monotonic() - t0
    print(f"spoofed {n} from {src} secs {secs:.1f} pps {int(n / secs) if secs > 0 else 0}", flush=True)


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "capture-hello" and len(argv) == 9:
        capture_hello(argv[2], argv[3], int(argv[4]), float(argv[5]), int(argv[6]), argv[7], argv[8])
    elif cmd == "flood" and len(argv) == 10:
        flood(argv[2], int(argv[3]), argv[4], int(argv[5]), argv[6], float(argv[7]), int(argv[8]), argv[9])
    elif cmd == "spoof" and len(argv) == 8:
        spoof(argv[2], argv[3], int(argv[4]), argv[5], float(argv[6]), int(argv[7]))
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
