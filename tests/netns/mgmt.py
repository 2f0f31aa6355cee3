#!/usr/bin/env python3
"""HTTP probes for the management endpoint (standard library only; run inside a namespace).

Every command prints one line and exits 0; the shell scripts judge the line.
A result that is not an HTTP status is one of: refused, reset, closed, timeout, error:TEXT.

  mgmt.py get METHOD HOST PORT PATH BODYFILE
      one HTTP/1.1 request (Connection: close). Prints "STATUS CONTENT-TYPE MS"
      (CONTENT-TYPE with spaces removed, "-" if none); the body goes to BODYFILE.
  mgmt.py bigheader HOST PORT SIZE
      GET /healthz with one header line of SIZE bytes. Prints "RESULT MS": RESULT is
      the status code, or how the connection ended without one.
  mgmt.py idle HOST PORT N WAIT
      opens N connections that send nothing; while they are open, times one
      GET /healthz on a further connection. Then waits up to WAIT seconds for the server
      to end the idle ones. Prints
      "healthz RESULT MS idle_ended K/N last_ms MS statuses S" (S: the status codes the
      idle connections got, comma-separated, "-" if none).
  mgmt.py drip HOST PORT INTERVAL WAIT
      starts a request and sends one more header byte every INTERVAL seconds, never
      finishing it. Prints "RESULT MS" when the server ends it (RESULT: status code or
      how it ended) or "open MS" after WAIT seconds.
"""
import socket
import sys
import time


def now_ms():
    return int(time.monotonic() * 1000)


def connect(host, port, timeout=5.0):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    return s


def classify(exc):
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    return "error:" + type(exc).__name__


def read_response(s, deadline):
    """Reads until the server closes (or the deadline). Returns (status|None, headers, body, how)."""
    data = b""
    how = "closed"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            how = "timeout"
            break
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except Exception as e:  # noqa: BLE001 -- reported, not raised
            how = classify(e)
            break
        if not chunk:
            break
        data += chunk
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:  # stop early once Content-Length bytes are in
            headers = parse_headers(data[:head_end])
            cl = headers.get("content-length")
            if cl is not None and cl.isdigit() and len(data) - head_end - 4 >= int(cl):
                break
    head_end = data.find(b"\r\n\r\n")
    if not data.startswith(b"HTTP/") or head_end < 0:
        return None, {}, b"", how
    first = data[:data.find(b"\r\n")].split(b" ")
    try:
        status = int(first[1])
    except (IndexError, ValueError):
        return None, {}, b"", "error:bad-status-line"
    headers = parse_headers(data[:head_end])
    body = data[head_end + 4:]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    elif headers.get("content-length", "").isdigit():
        body = body[:int(headers["content-length"])]
    return status, headers, body, how


def parse_headers(head):
    out = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        out[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    return out


def dechunk(b):
    out = b""
    while b:
        line, _, rest = b.partition(b"\r\n")
        n = int(line.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out += rest[:n]
        b = rest[n + 2:]
    return out


def get(method, host, port, path, bodyfile):
    t0 = now_ms()
    try:
        s = connect(host, port)
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: veil-netns-test\r\n"
                  f"Accept: */*\r\nConnection: close\r\n\r\n".encode())
        status, headers, body, how = read_response(s, time.monotonic() + 5)
        s.close()
    except Exception as e:  # noqa: BLE001
        print(f"{classify(e)} - {now_ms() - t0}")
        return
    with open(bodyfile, "wb") as f:
        f.write(body)
    if status is None:
        print(f"{how} - {now_ms() - t0}")
        return
    ctype = headers.get("content-type", "-").replace(" ", "") or "-"
    print(f"{status} {ctype} {now_ms() - t0}")


def bigheader(host, port, size):
    t0 = now_ms()
    try:
        s = connect(host, port)
    except Exception as e:  # noqa: BLE001
        print(f"{classify(e)} {now_ms() - t0}")
        return
    req = (f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Filler: ".encode() + b"a" * size +
           b"\r\nConnection: close\r\n\r\n")
    try:
        s.sendall(req)
    except Exception:  # noqa: BLE001 -- the server may stop reading early; read what it said
        pass
    status, _, _, how = read_response(s, time.monotonic() + 5)
    s.close()
    print(f"{status if status is not None else how} {now_ms() - t0}")


def ended(s):
    """None while the connection is open and silent, else the status code or how it ended."""
    s.setblocking(False)
    try:
        data = s.recv(65536)
    except BlockingIOError:
        return None
    except Exception as e:  # noqa: BLE001
        return classify(e)
    if not data:
        return "closed"
    if data.startswith(b"HTTP/"):
        try:
            return data.split(b" ")[1].decode()
        except IndexError:
            return "garbled"
    return "garbled"


def idle(host, port, n, wait):
    conns = []
    for _ in range(n):
        try:
            conns.append(connect(host, port))
        except Exception as e:  # noqa: BLE001
            print(f"healthz not-tried 0 idle_ended 0/{n} last_ms 0 statuses connect-{classify(e)}")
            return
    t_open = now_ms()
    t0 = now_ms()
    try:
        s = connect(host, port)
        s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        status, _, _, how = read_response(s, time.monotonic() + 5)
        s.close()
        hz = status if status is not None else how
    except Exception as e:  # noqa: BLE001
        hz = classify(e)
    hz_ms = now_ms() - t0
    pending = list(conns)
    statuses = []
    last = 0
    deadline = time.monotonic() + wait
    while pending and time.monotonic() < deadline:
        still = []
        for c in pending:
            r = ended(c)
            if r is None:
                still.append(c)
            else:
                last = now_ms() - t_open
                if r.isdigit():
                    statuses.append(r)
                c.close()
        pending = still
        time.sleep(0.05)
    for c in pending:
        c.close()
    st = ",".join(sorted(set(statuses))) or "-"
    print(f"healthz {hz} {hz_ms} idle_ended {n - len(pending)}/{n} last_ms {last} statuses {st}")


def drip(host, port, interval, wait):
    t0 = now_ms()
    try:
        s = connect(host, port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    except Exception as e:  # noqa: BLE001
        print(f"{classify(e)} {now_ms() - t0}")
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        r = ended(s)
        if r is not None:
            print(f"{r} {now_ms() - t0}")
            return
        s.setblocking(True)
        try:
            s.send(b"z")
        except Exception as e:  # noqa: BLE001
            r = ended(s)
            print(f"{r or classify(e)} {now_ms() - t0}")
            return
        time.sleep(interval)
    print(f"open {now_ms() - t0}")


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "get" and len(argv) == 7:
        get(argv[2], argv[3], int(argv[4]), argv[5], argv[6])
    elif cmd == "bigheader" and len(argv) == 5:
        bigheader(argv[2], int(argv[3]), int(argv[4]))
    elif cmd == "idle" and len(argv) == 6:
        idle(argv[2], int(argv[3]), int(argv[4]), float(argv[5]))
    elif cmd == "drip" and len(argv) == 6:
        drip(argv[2], int(argv[3]), float(argv[4]), float(argv[5]))
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
