#!/usr/bin/env python3
"""Packet tools for the namespace tests (standard library only; run inside a namespace).

  pkt.py garbage SRC DST PORT COUNT SEED
      send COUNT random UDP datagrams from SRC to DST:PORT: random bytes of length
      0..1500, and some that open like TLS records (16 03 03 / 17 03 03 + a plausible
      length). Prints "sent N replies M" where M counts datagrams that came back.
  pkt.py capture IFACE SRC PORT SECONDS MAX OUTFILE READYFILE
      sniff (AF_PACKET) frames arriving on IFACE from SRC to UDP port PORT whose payload
      is a record (17 03 03); write them as hex lines to OUTFILE (UDP checksum filled in). Touches READYFILE once
      the socket is bound. Stops after SECONDS or MAX frames.
  pkt.py replay IFACE FILE TIMES
      send every frame in FILE (hex lines) out of IFACE, TIMES times over.
  pkt.py udpgso SRC DST PORT COUNT SEGMENT PER
      send COUNT super-datagrams of PER segments of SEGMENT bytes each with UDP_SEGMENT (the
      kernel, or a TUN with USO, cuts them); segment k of send n carries n, k and a pattern.
      Prints "sent N datagrams M".
  pkt.py udpsink BIND PORT SECONDS EXPECT READYFILE
      receive datagrams on BIND:PORT until EXPECT arrived or SECONDS passed; check each one's
      pattern. Touches READYFILE once bound. Prints "got N bad M bytes B".
  pkt.py l2send IFACE DST SRC TAG COUNT [VLAN]
      send COUNT Ethernet frames out of IFACE (AF_PACKET) from MAC SRC to MAC DST, of the
      local experimental type 88b5, the payload starting with TAG; with VLAN, behind an
      802.1Q tag with that VLAN id. SRC "random": a fresh random unicast MAC per frame.
  pkt.py l2sink IFACE SECONDS READYFILE
      count the frames of type 88b5 (tagged or not) that arrive on IFACE for SECONDS; prints
      one line per payload TAG seen: "TAG COUNT", sorted, TAG followed by "@vlanN" for a
      tagged frame. Touches READYFILE once bound.
"""
import random
import select
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0


def garbage(src, dst, port, count, seed):
    rng = random.Random(seed)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)  # big ones fragment
    s.bind((src, 0))
    s.setblocking(False)
    sent = replies = 0
    for _ in range(count):
        kind = rng.random()
        n = rng.randint(0, 1500)
        body = rng.randbytes(n)
        if kind < 0.15 and n >= 5:  # handshake-looking
            body = b"\x16\x03\x03" + struct.pack(">H", n - 5) + body[5:]
        elif kind < 0.30 and n >= 5:  # record-looking, length right or a little off
            length = n - 5 if rng.random() < 0.8 else rng.randint(0, 0xFFFF)
            body = b"\x17\x03\x03" + struct.pack(">H", length) + body[5:]
        for _attempt in range(100):  # the socket buffer may be full for a moment
            try:
                s.sendto(body, (dst, port))
                sent += 1
                break
            except BlockingIOError:
                select.select([], [s], [], 0.01)
        replies += drain(s)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # anything sent back arrives within a second
        select.select([s], [], [], 0.1)
        replies += drain(s)
    print(f"sent {sent} replies {replies}")


def drain(s):
    n = 0
    while True:
        try:
            s.recv(65535)
            n += 1
        except (BlockingIOError, ConnectionRefusedError):
            return n


def capture(iface, src, port, seconds, limit, outfile, readyfile):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    open(readyfile, "w").close()
    src_b = socket.inet_aton(src)
    frames = []
    deadline = time.monotonic() + seconds
    while len(frames) < limit:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        frame, addr = s.recvfrom(65535)
        if addr[2] == PACKET_OUTGOING or len(frame) < 14 + 20 + 8:
            continue
        if struct.unpack(">H", frame[12:14])[0] != ETH_P_IP:
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != socket.IPPROTO_UDP or ip[12:16] != src_b or len(ip) < ihl + 8 + 3:
            continue
        if struct.unpack(">H", ip[ihl + 2:ihl + 4])[0] != port:
            continue
        if ip[ihl + 8:ihl + 11] == b"\x17\x03\x03":
            frames.append(with_udp_checksum(frame, ihl))
    with open(outfile, "w") as f:
        for fr in frames:
            f.write(fr.hex() + "\n")
    print(f"captured {len(frames)}")


def with_udp_checksum(frame, ihl):
    """The frame with its UDP checksum filled in: a sender on a veth leaves it to
    offload, so the captured copy may carry only the pseudo-header sum, which the
    receiver rejects when the frame is sent again from user space."""
    ip = frame[14:]
    total = struct.unpack(">H", ip[2:4])[0]
    udp = bytearray(ip[ihl:total])
    udp[6:8] = b"\0\0"
    pseudo = ip[12:20] + struct.pack(">BBH", 0, socket.IPPROTO_UDP, len(udp))
    data = pseudo + bytes(udp) + (b"\0" if len(udp) % 2 else b"")
    acc = sum(struct.unpack(f">{len(data) // 2}H", data))
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    csum = (~acc & 0xFFFF) or 0xFFFF
    udp[6:8] = struct.pack(">H", csum)
    return frame[:14] + ip[:ihl] + bytes(udp) + frame[14 + total:]


def replay(iface, path, times):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    with open(path) as f:
        frames = [bytes.fromhex(line.strip()) for line in f if line.strip()]
    n = 0
    for _ in range(times):
        for fr in frames:
            s.send(fr)
            n += 1
    print(f"replayed {n}")


UDP_SEGMENT = 103


def pattern(n, k, size):
    head = struct.pack("!II", n, k)
    return head + bytes((n * 31 + k * 7 + i) & 0xFF for i in range(size - len(head)))


def udpgso(src, dst, port, count, segment, per):
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.setsockopt(socket.SOL_UDP, UDP_SEGMENT, segment)
    sent = 0
    for n in range(count):
        s.sendto(b"".join(pattern(n, k, segment) for k in range(per)), (dst, port))
        sent += per
        time.sleep(0.002)   # paced: the check is about cutting, not about queue sizes
    print(f"sent {count} datagrams {sent}")


def udpsink(bind, port, seconds, expect, readyfile):
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((bind, port))
    open(readyfile, "w").close()
    got = bad = nbytes = 0
    seen = set()
    end = time.monotonic() + seconds
    while got < expect and time.monotonic() < end:
        r, _, _ = select.select([s], [], [], 0.2)
        if not r:
            continue
        d = s.recv(65535)
        nbytes += len(d)
        if len(d) < 8:
            bad += 1
            continue
        n, k = struct.unpack("!II", d[:8])
        if d != pattern(n, k, len(d)) or (n, k) in seen:
            bad += 1
            continue
        seen.add((n, k))
        got += 1
    print(f"got {got} bad {bad} bytes {nbytes}")


ETH_P_L2TEST = 0x88B5
PACKET_OUTGOING_TYPE = 4


def mac_bytes(text):
    return bytes(int(x, 16) for x in text.split(":"))


def l2send(iface, dst, src, tag, count, vlan=0):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    rng = random.Random(tag)
    tci = struct.pack("!HH", 0x8100, 0x2000 | vlan) if vlan else b""   # priority 1
    for _ in range(count):
        mac = bytes([0x02]) + rng.randbytes(5) if src == "random" else mac_bytes(src)
        payload = tag.encode().ljust(46, b"\0")
        s.send(mac_bytes(dst) + mac + tci + struct.pack("!H", ETH_P_L2TEST) + payload)
        if count > 1:
            time.sleep(0.0005)
    print(f"sent {count}")


SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10


def l2sink(iface, seconds, readyfile):
    # Every frame: the kernel may take an 802.1Q tag off into the auxiliary data.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    s.bind((iface, 0))
    open(readyfile, "w").close()
    seen = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        r, _, _ = select.select([s], [], [], 0.1)
        if not r:
            continue
        d, anc, _, addr = s.recvmsg(65535, 256)
        if addr[2] == PACKET_OUTGOING_TYPE or len(d) < 15:
            continue
        vlan, at = 0, 12
        if struct.unpack_from("!H", d, 12)[0] == 0x8100 and len(d) >= 19:
            vlan, at = struct.unpack_from("!H", d, 14)[0] & 0xFFF, 16
        for level, kind, data in anc:
            if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= 20:
                status, tci = struct.unpack_from("=I", data, 0)[0], struct.unpack_from("=H", data, 16)[0]
                if status & TP_STATUS_VLAN_VALID:
                    vlan = tci & 0xFFF
        if struct.unpack_from("!H", d, at)[0] != ETH_P_L2TEST:
            continue
        tag = d[at + 2:].split(b"\0")[0].decode(errors="replace") + (f"@vlan{vlan}" if vlan else "")
        seen[tag] = seen.get(tag, 0) + 1
    for tag in sorted(seen):
        print(f"{tag} {seen[tag]}")


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "garbage" and len(argv) == 7:
        garbage(argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6]))
    elif cmd == "capture" and len(argv) == 9:
        capture(argv[2], argv[3], int(argv[4]), float(argv[5]), int(argv[6]), argv[7], argv[8])
    elif cmd == "replay" and len(argv) == 5:
        replay(argv[2], argv[3], int(argv[4]))
    elif cmd == "udpgso" and len(argv) == 8:
        udpgso(argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6]), int(argv[7]))
    elif cmd == "l2send" and len(argv) in (7, 8):
        l2send(argv[2], argv[3], argv[4], argv[5], int(argv[6]), int(argv[7]) if len(argv) == 8 else 0)
    elif cmd == "l2sink" and len(argv) == 5:
        l2sink(argv[2], float(argv[3]), argv[4])
    elif cmd == "udpsink" and len(argv) == 7:
        udpsink(argv[2], int(argv[3]), float(argv[4]), int(argv[5]), argv[6])
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
