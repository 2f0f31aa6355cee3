#!/usr/bin/env python3
"""stun.py IP PORT -- a minimal STUN (RFC 5389) binding responder, for miniupnpd in nat.sh.

miniupnpd refuses to map ports while its WAN address is a documentation (reserved) one, unless a
STUN server tells it that this is its public address. Every Binding Request is answered from the
same socket with MAPPED-ADDRESS and XOR-MAPPED-ADDRESS; CHANGE-REQUEST is ignored, which tells
miniupnpd it sits behind no filtering NAT."""
import socket
import struct
import sys

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, (ip, port) = s.recvfrom(2048)
    if len(data) < 20 or data[0:2] != b"\x00\x01":
        continue
    addr = socket.inet_aton(ip)
    mapped = struct.pack("!HHBBH", 0x0001, 8, 0, 1, port) + addr
    xor = struct.pack("!HHBBH", 0x0020, 8, 0, 1, port ^ 0x2112) + bytes(a ^ b for a, b in zip(addr, b"\x21\x12\xa4\x42"))
    s.sendto(struct.pack("!HH", 0x0101, len(mapped + xor)) + data[4:20] + mapped + xor, (ip, port))
