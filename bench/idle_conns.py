#!/usr/bin/env python3
"""Open K idle SMTP sessions to a loopback server and report its memory.

Each session connects, reads the 220 banner, sends ``EHLO`` and reads the reply, then
stays idle.  When every session is up (or --timeout passed), waits --settle seconds and
sums RSS and PSS (/proc/PID/smaps_rollup) over the server's processes: the pid given
with --root-pid plus all its descendants.  Memory is also sampled before the sessions
open (baseline).  Prints one JSON line.
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(e))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory(root: int) -> dict:
    rss = pss = n = 0
    for p in descendants(root):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            n += 1
        except OSError:
            continue
    return {"processes": n, "rss_kib": rss, "pss_kib": pss}


async def session(host: str, port: int, ready: list, conns: list, timeout: float) -> None:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        conns.append(w)
        line = await asyncio.wait_for(r.readline(), timeout)
        if not line.startswith(b"220"):
            return
        w.write(b"EHLO idle.bench.test\r\n")
        while True:
            line = await asyncio.wait_for(r.readline(), timeout)
            if not line or line[3:4] != b"-":
                break
        if line.startswith(b"250"):
            ready.append(time.monotonic())
    except (TimeoutError, OSError):
        return


async def main_async(a) -> dict:
    base = memory(a.root_pid)
    ready: list = []
    conns: list = []
    t0 = time.monotonic()
    tasks = []
    for i in range(a.sessions):
        tasks.append(asyncio.ensure_future(session(a.host, a.port, ready, conns, a.timeout)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # don't overflow the listen backlog
    await asyncio.wait(tasks, timeout=a.timeout + 5)
    up_s = time.monotonic() - t0
    await asyncio.sleep(a.settle)
    loaded = memory(a.root_pid)
    res = {
        "sessions_requested": a.sessions, "sessions_ready": len(ready), "connected": len(conns),
        "time_to_ready_s": round(up_s, 2), "baseline": base, "loaded": loaded,
        "delta_rss_kib_per_session": round((loaded["rss_kib"] - base["rss_kib"]) / max(1, len(ready)), 1),
        "delta_pss_kib_per_session": round((loaded["pss_kib"] - base["pss_kib"]) / max(1, len(ready)), 1),
    }
    for w in conns:
        w.close()
    await asyncio.sleep(0.5)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--root-pid", type=int, required=True, help="the server's top process (supervisor / master)")
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < a.sessions + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.sessions + 1000), hard))
    res = asyncio.run(main_async(a))
    res["label"] = a.label
    print(json.dumps(res))
    sys.exit(0)


if __name__ == "__main__":
    main()
