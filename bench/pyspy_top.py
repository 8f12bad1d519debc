#!/usr/bin/env python3
"""Hot spots from a py-spy ``record --idle --threads --format raw`` file (collapsed stacks).

Every sample is classified by the source line of its innermost Python frame:
  wait   the thread is blocked waiting for work (event loop poll, select, queue get,
         recv, sleep): the line calls run_until_complete / select / .get( / recv / sleep ...
  sync   the thread is in a durability barrier (fsync, fdatasync, syncfs)
  cpu    everything else (Python work, or a C call that is neither of the above)
Percentages are of the thread's samples, i.e. of wall-clock time: with --idle py-spy
samples every thread at every tick, so 30 % cpu = 0.3 of a core.
Prints, per thread: the wait/sync/cpu split, the top self-time lines and functions
(non-wait samples) and the top inclusive eqmail functions.
"""

import argparse
import linecache
import os
import re
import sys
from collections import Counter, defaultdict

WAIT = re.compile(r"run_until_complete|run_forever|\.select\(|\bselect\(|\.get\((block=True)?\)|recv_fds|\.recv\(|\.accept\(|"
                  r"sleep\(|\.wait\(|\.poll\(|\.join\(|readexactly|\.read\(READ|_wait_for_tstate_lock|recvmsg|\.acquire\(|read_events|os\.read\(self\._inotify_fd")
SYNC = re.compile(r"fsync|fdatasync|syncfs")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")


def source_line(path: str, line: int, roots: list[str]) -> str:
    cands = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in roots]
    for c in cands:
        if os.path.exists(c):
            return linecache.getline(c, line).strip()
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw")
    ap.add_argument("--title", default="")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--src", action="append", default=[], help="directories to resolve relative paths")
    a = ap.parse_args()
    roots = a.src + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p] + \
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path
    threads: dict[str, Counter] = defaultdict(Counter)  # thread -> class -> samples
    self_lines: dict[str, Counter] = defaultdict(Counter)
    self_funcs: dict[str, Counter] = defaultdict(Counter)
    incl: dict[str, Counter] = defaultdict(Counter)
    for raw in open(a.raw, errors="replace"):
        raw = raw.rstrip("\n")
        if not raw:
            continue
        stack, _, count = raw.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        thread = "main"
        if frames and (frames[0].startswith("process ") or frames[0].startswith("thread ")):
            while frames and (frames[0].startswith("process ") or frames[0].startswith("thread ")):
                if frames[0].startswith("thread "):
                    thread = frames[0]
                frames = frames[1:]
        if not frames:
            threads[thread]["wait"] += n
            continue
        m = FRAME.match(frames[-1])
        leaf_src = source_line(m["file"], int(m["line"]), roots) if m else ""
        cls = "sync" if SYNC.search(leaf_src) else "wait" if WAIT.search(leaf_src) else "cpu"
        threads[thread][cls] += n
        if cls == "wait":
            continue
        if m:
            self_lines[thread][f"{m['file']}:{m['line']} {m['func']}  `{leaf_src[:70]}`"] += n
            self_funcs[thread][f"{m['func']} ({m['file']})"] += n
        seen = set()
        for fr in frames:
            fm = FRAME.match(fr)
            if not fm or "eqmail/" not in fm["file"] or "eqmail/cli/" in fm["file"] or "eqmail/supervisor/" in fm["file"]:
                continue
            key = f"{fm['func']} ({fm['file']})"
            if key not in seen:
                seen.add(key)
                incl[thread][key] += n
    print(f"\n### {a.title or a.raw}\n")
    for t, cls in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        tot = sum(cls.values())
        if tot == 0:
            continue

        def pc(k: float, tot: int = tot) -> float:
            return 100.0 * k / tot

        print(f"**{t}**: {tot} samples; cpu {pc(cls['cpu']):.1f} %, sync (fsync/syncfs) {pc(cls['sync']):.1f} %, "
              f"waiting {pc(cls['wait']):.1f} %\n")
        if cls["cpu"] + cls["sync"] < 0.01 * tot:
            continue
        print("| self % of wall | line |")
        print("|---:|---|")
        for k, v in self_lines[t].most_common(a.top):
            print(f"| {pc(v):.1f} | {k} |")
        print("\n| self % | function |")
        print("|---:|---|")
        for k, v in self_funcs[t].most_common(a.top):
            print(f"| {pc(v):.1f} | {k} |")
        print("\n| inclusive % (non-wait) | eqmail function |")
        print("|---:|---|")
        for k, v in incl[t].most_common(a.top + 5):
            print(f"| {pc(v):.1f} | {k} |")
        print()


if __name__ == "__main__":
    main()
