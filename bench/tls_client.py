#!/usr/bin/env python3
"""STARTTLS set-up cost: closed-loop SMTP sessions with STARTTLS against one server.

--conc worker threads (blocking sockets; OpenSSL releases the GIL during the
handshake) each run sessions back to back for --duration seconds, one new TCP
connection per session, no TLS session resumption (every handshake is a full one):

  handshake  banner, EHLO, STARTTLS, 220, TLS handshake, EHLO again, QUIT
  session    the same, then MAIL, RCPT, DATA (--size bytes), 250, QUIT: a whole SMTP
             transaction over TLS
  plain      session without STARTTLS (the same transaction in clear, for reference)

Reports sessions/s, the handshake time (ClientHello -> handshake done, as the client
sees it) and the session time, median/p90/p99, the protocol/cipher negotiated, errors,
and the CPU seconds the server's process tree (--root-pid and descendants, including
reaped children) and this client used per session.  Prints one JSON line.
"""

import argparse
import json
import os
import resource
import socket
import ssl
import statistics
import sys
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """utime+stime+cutime+cstime (s) over root and its descendants."""
    children: dict[int, list[int]] = {}
    stat: dict[int, list[str]] = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stat[int(e)] = fields
        children.setdefault(int(fields[1]), []).append(int(e))
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        f = stat.get(p)
        if f:  # fields[0] is state: utime = index 11, stime 12, cutime 13, cstime 14
            total += sum(int(x) for x in f[11:15])
        todo.extend(children.get(p, []))
    return total / TICK


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def reply(self) -> bytes:
        """One whole (multi-line) SMTP reply; returns its last line."""
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(16384)
                if not data:
                    raise ConnectionError("server closed the connection")
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            if len(line) < 4 or line[3:4] != b"-":
                return line

    def cmd(self, data: bytes, want: bytes) -> bytes:
        if data:
            self.sock.sendall(data)
        line = self.reply()
        if not line.startswith(want):
            raise RuntimeError(f"{data[:20]!r} -> {line[:80]!r}")
        return line


def one(host: str, port: int, mode: str, ctx: ssl.SSLContext, body: bytes, to: str,
        timeout: float) -> tuple[float | None, str]:
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        c = Conn(sock)
        c.cmd(b"", b"220")
        c.cmd(b"EHLO tls.bench.test\r\n", b"250")
        hs, cipher = None, ""
        if mode != "plain":
            c.cmd(b"STARTTLS\r\n", b"220")
            if c.buf:
                raise RuntimeError("data after 220 to STARTTLS")
            t = time.perf_counter()
            tls = ctx.wrap_socket(sock, server_hostname="bench.test")
            hs = time.perf_counter() - t
            sock = tls
            c = Conn(tls)
            cipher = f"{tls.version()} {tls.cipher()[0]}"
            c.cmd(b"EHLO tls.bench.test\r\n", b"250")
        if mode != "handshake":
            c.cmd(b"MAIL FROM:<s@bench.test>\r\n", b"250")
            c.cmd(f"RCPT TO:<{to}>\r\n".encode(), b"250")
            c.cmd(b"DATA\r\n", b"354")
            c.cmd(body, b"250")
        c.cmd(b"QUIT\r\n", b"221")
        return hs, cipher
    finally:
        try:
            sock.close()
        except OSError:
            pass


def message(size: int) -> bytes:
    head = b"From: s@bench.test\r\nTo: tls@bench.test\r\nSubject: tls bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    n = max(1, (size - len(head)) // len(line))
    return head + line * n + b".\r\n"


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=("handshake", "session", "plain"), default="handshake")
    ap.add_argument("--conc", type=int, default=10)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--to", default="mbench@bench.test")
    ap.add_argument("--root-pid", type=int, default=0, help="server's root process (CPU accounting)")
    ap.add_argument("--label", default="")
    ap.add_argument("--run", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a self-signed test certificate
    body = message(a.size)
    lock = threading.Lock()
    hs_times: list[float] = []
    sess_times: list[float] = []
    errors: dict[str, int] = {}
    ciphers: dict[str, int] = {}
    start = threading.Event()
    t0 = 0.0
    deadline = 0.0

    def worker() -> None:
        start.wait()
        while True:
            t = time.perf_counter()
            if t >= deadline:
                return
            try:
                hs, cipher = one(a.host, a.port, a.mode, ctx, body, a.to, a.timeout)
            except Exception as e:  # noqa: BLE001 - counted and reported
                key = f"{type(e).__name__}: {e}"[:120]
                with lock:
                    errors[key] = errors.get(key, 0) + 1
                time.sleep(0.01)
                continue
            done = time.perf_counter()
            with lock:
                if done <= deadline:
                    sess_times.append(done - t)
                    if hs is not None:
                        hs_times.append(hs)
                    if cipher:
                        ciphers[cipher] = ciphers.get(cipher, 0) + 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.conc)]
    for th in threads:
        th.start()
    cpu0 = tree_cpu(a.root_pid) if a.root_pid else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    deadline = t0 + a.duration
    start.set()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu1 = tree_cpu(a.root_pid) if a.root_pid else None
    n = len(sess_times)
    ms = lambda x: None if x is None else round(1000 * x, 2)  # noqa: E731
    client_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    out = {
        "label": a.label, "run": a.run, "mode": a.mode, "conc": a.conc, "duration_s": round(elapsed, 2),
        "size": a.size if a.mode != "handshake" else 0,
        "sessions": n, "sessions_per_s": round(n / elapsed, 1),
        "errors": sum(errors.values()), "error_kinds": errors, "ciphers": ciphers,
        "handshake_ms": {"median": ms(statistics.median(hs_times)) if hs_times else None,
                         "p90": ms(pct(hs_times, 0.9)), "p99": ms(pct(hs_times, 0.99))},
        "session_ms": {"median": ms(statistics.median(sess_times)) if sess_times else None,
                       "p90": ms(pct(sess_times, 0.9)), "p99": ms(pct(sess_times, 0.99))},
        "server_cpu_s": None if cpu0 is None else round(cpu1 - cpu0, 2),
        "server_cpu_ms_per_session": None if cpu0 is None or not n else round(1000 * (cpu1 - cpu0) / n, 3),
        "client_cpu_ms_per_session": round(1000 * client_cpu / n, 3) if n else None,
        "load_after": open("/proc/loadavg").read().split()[:3],
    }
    print(json.dumps(out))
    sys.stderr.write(f"{a.label:8} {a.mode:9} run {a.run}: {out['sessions_per_s']:7.1f} sessions/s  handshake median "
                     f"{out['handshake_ms']['median']} ms  server CPU {out['server_cpu_ms_per_session']} ms/session  "
                     f"client CPU {out['client_cpu_ms_per_session']} ms/session  errors {out['errors']}  "
                     f"{list(out['ciphers'])}\n")
    sys.exit(0 if n else 1)


if __name__ == "__main__":
    main()
