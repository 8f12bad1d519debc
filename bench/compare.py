#!/usr/bin/env python3
"""Median table with eqmail/Postfix ratios from a bench/run.sh result directory.

Reads <dir>/raw-runs.jsonl (one JSON object per run, written by the shared
mta_bench.py), prints a markdown table and writes <dir>/summary.json.
A run counts as "ok" when smtp-source exited 0 and exactly N new files arrived in the
delivery directory (fewer = lost or late, more = duplicates).
"""

import json
import os
import statistics
import sys
from collections import defaultdict


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(x, nd=0):
    return "-" if x is None else f"{x:,.{nd}f}"


def ratio(a, b):
    return a / b if a and b else None


def main() -> None:
    d = sys.argv[1]
    runs = [json.loads(line) for line in open(os.path.join(d, "raw-runs.jsonl")) if line.strip()]
    by = defaultdict(list)
    cells = []
    for r in runs:
        key = (r["size"], r["conc"])
        if key not in cells:
            cells.append(key)
        by[(r["label"], *key)].append(r)
    rows = []
    print("| msg size | sessions | messages | Postfix accept msg/s | eqmail accept msg/s | **accept ratio** "
          "| Postfix e2e msg/s | eqmail e2e msg/s | **e2e ratio** | ok runs (pf / eq) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for size, conc in cells:
        pf, eq = by[("postfix", size, conc)], by[("eqmail", size, conc)]

        def ok(rs):
            return sum(1 for r in rs if r["rc"] == 0 and r["delivered"] == r["messages"])

        s = {"size": size, "conc": conc, "messages": max((r["messages"] for r in pf + eq), default=0),
             "postfix_accept": med([r["accept_mps"] for r in pf]), "eqmail_accept": med([r["accept_mps"] for r in eq]),
             "postfix_e2e": med([r["e2e_mps"] for r in pf]), "eqmail_e2e": med([r["e2e_mps"] for r in eq]),
             "postfix_ok": f"{ok(pf)}/{len(pf)}", "eqmail_ok": f"{ok(eq)}/{len(eq)}",
             "eqmail_cpu_pct": med([r["cpu_busy_pct_of_1core"] for r in eq]),
             "postfix_cpu_pct": med([r["cpu_busy_pct_of_1core"] for r in pf])}
        s["accept_ratio"] = ratio(s["eqmail_accept"], s["postfix_accept"])
        s["e2e_ratio"] = ratio(s["eqmail_e2e"], s["postfix_e2e"])
        rows.append(s)
        print(f"| {size // 1024} KB | {conc} | {s['messages']} | {f(s['postfix_accept'])} | {f(s['eqmail_accept'])} | "
              f"**{f(s['accept_ratio'], 2)}×** | {f(s['postfix_e2e'])} | {f(s['eqmail_e2e'])} | "
              f"**{f(s['e2e_ratio'], 2)}×** | {s['postfix_ok']} / {s['eqmail_ok']} |")
    bad = [r for r in runs if not (r["rc"] == 0 and r["delivered"] == r["messages"])]
    if bad:
        print("\nIncomplete runs (rc != 0 or delivered != N):")
        for r in bad:
            print(f"- {r['label']} {r['size']}x{r['conc']} run {r['run']}: rc={r['rc']} delivered={r['delivered']}"
                  f"/{r['messages']} errors={r['errors']}")
    with open(os.path.join(d, "summary.json"), "w") as fh:
        json.dump({"tool": "eqmail-bench-throughput", "cells": rows, "incomplete_runs": bad}, fh, indent=1)


if __name__ == "__main__":
    main()
