#!/usr/bin/env python3
"""Delivery latency at a steady offered load: end of DATA -> file in Maildir/new.

An open-loop generator starts one SMTP session (new TCP connection) every 1/RATE
seconds for DURATION seconds; each message carries ``X-Bench-Seq: <n>``.  For message n:

  t_dot  client has written the final ``\\r\\n.\\r\\n`` (end of DATA)
  t_250  client read the 250 reply to it (acceptance latency = t_250 - t_dot)
  t_file the file appeared in --maildir/new (inotify IN_CREATE/IN_MOVED_TO, seen by a
         separate watcher process so the client's event loop does not delay it)

Delivery latency = t_file - t_dot (CLOCK_MONOTONIC is system-wide, so the two processes
compare).  Prints one JSON line with median/p90/p99/max and every loss (250 received
but no file within --grace seconds).
"""

import argparse
import asyncio
import ctypes
import ctypes.util
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time

IN_CREATE = 0x100
IN_MOVED_TO = 0x80


def watcher(newdir: str, q: "mp.Queue[tuple[str, float]]", ready: "mp.Event", stop: "mp.Event") -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    if fd < 0 or libc.inotify_add_watch(fd, newdir.encode(), IN_CREATE | IN_MOVED_TO) < 0:
        raise OSError(ctypes.get_errno(), "inotify")
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ready.set()
    seen = []
    while not stop.is_set():
        if not poller.poll(100):
            continue
        now = time.monotonic()
        try:
            buf = os.read(fd, 65536)
        except BlockingIOError:
            continue
        i = 0
        while i < len(buf):
            _wd, _mask, _cookie, ln = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16 : i + 16 + ln].rstrip(b"\0").decode(errors="replace")
            i += 16 + ln
            if name and not name.startswith("."):
                seen.append((name, now))
    q.put(seen)


def make_message(seq: int, size: int) -> bytes:
    head = (f"From: sender@bench.test\r\nTo: rcpt@bench.test\r\nSubject: latency {seq}\r\n"
            f"X-Bench-Seq: {seq}\r\n\r\n").encode()
    line = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopq\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body + b".\r\n"


async def one(seq: int, a, res: dict) -> None:
    try:
        r, w = await asyncio.open_connection(a.host, a.port)

        async def reply() -> bytes:
            while True:
                line = await r.readline()
                if not line:
                    raise ConnectionError("closed")
                if line[3:4] != b"-":
                    return line

        await reply()
        w.write(b"HELO lat.bench.test\r\n")
        await reply()
        w.write(f"MAIL FROM:<{a.sender}>\r\n".encode())
        await reply()
        w.write(f"RCPT TO:<{a.to}>\r\n".encode())
        if not (await reply()).startswith(b"250"):
            raise ConnectionError("rcpt refused")
        w.write(b"DATA\r\n")
        await reply()
        w.write(make_message(seq, a.size))
        t_dot = time.monotonic()
        line = await reply()
        t_250 = time.monotonic()
        w.write(b"QUIT\r\n")
        try:
            await asyncio.wait_for(reply(), 5)
        except Exception:
            pass
        w.close()
        res[seq] = {"t_dot": t_dot, "t_250": t_250, "ok": line.startswith(b"250"), "reply": line[:80].decode(errors="replace")}
    except Exception as e:  # noqa: BLE001
        res[seq] = {"error": repr(e)}


async def generate(a) -> tuple[dict, float]:
    res: dict = {}
    tasks = []
    n = int(a.rate * a.duration)
    t0 = time.monotonic()
    for i in range(n):
        due = t0 + i / a.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, a, res)))
    await asyncio.wait(tasks)
    return res, time.monotonic() - t0


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--maildir", required=True, help="the recipient's Maildir (new/ is watched)")
    ap.add_argument("--to", required=True)
    ap.add_argument("--sender", default="sender@bench.test")
    ap.add_argument("--rate", type=float, required=True, help="messages per second (open loop)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--grace", type=float, default=30.0, help="wait this long for the last files")
    ap.add_argument("--label", default="")
    ap.add_argument("--dump", default=None, help="write per-message records (JSON lines) here")
    a = ap.parse_args()
    newdir = os.path.join(a.maildir, "new")
    for e in os.scandir(newdir):
        os.unlink(e.path)
    q: mp.Queue = mp.Queue()
    ready, stop = mp.Event(), mp.Event()
    wp = mp.Process(target=watcher, args=(newdir, q, ready, stop), daemon=True)
    wp.start()
    ready.wait(10)
    res, gen_s = asyncio.run(generate(a))
    acked = {s for s, r in res.items() if r.get("ok")}
    deadline = time.monotonic() + a.grace
    while time.monotonic() < deadline:
        if sum(1 for _ in os.scandir(newdir)) >= len(acked):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    stop.set()
    seen = q.get(timeout=30)
    wp.join(5)
    t_file: dict[int, float] = {}
    dup = 0
    for name, t in seen:
        try:
            with open(os.path.join(newdir, name), "rb") as f:
                head = f.read(8192)
        except OSError:
            continue
        i = head.find(b"X-Bench-Seq: ")
        if i < 0:
            continue
        seq = int(head[i + 13 : head.index(b"\r\n" if b"\r\n" in head[i:i + 40] else b"\n", i)])
        if seq in t_file:
            dup += 1
        else:
            t_file[seq] = t
    lat = [(t_file[s] - res[s]["t_dot"]) * 1000 for s in acked if s in t_file]
    acc = [(res[s]["t_250"] - res[s]["t_dot"]) * 1000 for s in acked]
    lost = sorted(acked - set(t_file))
    errors = [r.get("error") or r.get("reply") for r in res.values() if not r.get("ok")]
    out = {
        "tool": "eqmail-bench-latency", "label": a.label, "rate": a.rate, "duration": a.duration, "size": a.size,
        "sent": len(res), "acked": len(acked), "delivered": len(t_file), "duplicates": dup,
        "lost_after_ack": lost[:50], "lost_count": len(lost), "errors": errors[:10], "error_count": len(errors),
        "generator_s": round(gen_s, 2), "achieved_rate": round(len(res) / gen_s, 1),
        "delivery_ms": {"median": statistics.median(lat) if lat else None, "p90": pct(lat, 90),
                        "p99": pct(lat, 99), "max": max(lat) if lat else None},
        "accept_ms": {"median": statistics.median(acc) if acc else None, "p90": pct(acc, 90),
                      "p99": pct(acc, 99), "max": max(acc) if acc else None},
    }
    if a.dump:
        t0 = min((r["t_dot"] for r in res.values() if "t_dot" in r), default=0.0)
        with open(a.dump, "w") as fh:
            for s in sorted(res):
                r = dict(res[s], seq=s)
                if "t_dot" in r:
                    r["t_dot_rel"] = r["t_dot"] - t0
                    r["accept_ms"] = (r["t_250"] - r["t_dot"]) * 1000
                    r["delivery_ms"] = (t_file[s] - r["t_dot"]) * 1000 if s in t_file else None
                fh.write(json.dumps(r) + "\n")
    print(json.dumps(out))
    sys.exit(0 if not lost and not errors else 1)


if __name__ == "__main__":
    main()
