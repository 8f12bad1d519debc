"""``eqmailctl tlsrpt [--date YYYY-MM-DD] [--json]``, and the TLS lines of ``eqmailctl
status`` and ``eqmailctl queue show``: what outbound TLS policies did, for people.

Owns: the text view of one UTC day's TLS-RPT reports (per policy domain: the policies,
their session counts and failures), ``--json`` (a JSON array of RFC 8460 §4 report
objects, one per policy domain, as eqmail mails them — for today so far the range ends
now), the status summary (today's failed sessions per policy domain, only when there
are any) and the ``tls:`` lines of a queued message's pending remote domains (the policy
and the last result recorded for each, eqmail.delivery.tlsrpt.latest).

Privilege: any user who can read ``<root>/tlsrpt/`` (0755, files 0644).
Exit codes: 0 shown (also when nothing was recorded that day), 1 the records cannot be
read, 2 usage error (a date that is not YYYY-MM-DD).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from eqmail.delivery import tlsrpt
from eqmail.delivery.tlspolicy import SessionResult
from eqmail.instance import Instance

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
# Remote delivery records sessions under DANE, MTA-STS and tlshosts pins only: a pending
# domain without a record went out (or tries to) with opportunistic TLS, or not yet at all.
NOT_RECORDED = ("opportunistic (no DANE, MTA-STS or tlshosts pin session recorded today "
                "or yesterday)")


def _date(text: str) -> dt.date:
    try:
        return tlsrpt.parse_day(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("tlsrpt", help="TLS-RPT: outbound TLS policy sessions of a UTC day (RFC 8460)",
                       description="The TLS-RPT reports of one UTC day (default: today so far): "
                                   "sessions under DANE and MTA-STS policies per domain.")
    s.add_argument("--date", type=_date, help="the UTC day, YYYY-MM-DD (default: today)")
    s.add_argument("--json", action="store_true",
                   help="a JSON array of RFC 8460 report objects, one per policy domain")


def _me(inst: Instance) -> str:
    try:
        with open(inst.control / "me", encoding="utf-8", errors="replace") as f:
            return f.readline(1024).strip() or "localhost"
    except OSError:
        return "localhost"


def cmd_tlsrpt(inst: Instance, args: argparse.Namespace, now: float | None = None) -> int:
    now = time.time() if now is None else now
    today = tlsrpt.day_of(now)
    day: dt.date = args.date or today
    end = dt.datetime.fromtimestamp(int(now), dt.UTC) if day == today else None
    try:
        found = tlsrpt.day_reports(inst.root, day, _me(inst), end)
    except OSError as e:
        print(f"eqmailctl tlsrpt: cannot read {tlsrpt.day_path(inst.root, day)}: {e.strerror}",
              file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print(format_text(found, day, day == today), end="")
    return EXIT_OK


def format_text(reports: list[dict[str, Any]], day: dt.date, so_far: bool) -> str:
    head = f"TLS-RPT {day.isoformat()}{' (so far)' if so_far else ''}"
    if not reports:
        return f"{head}: no sessions under a DANE or MTA-STS policy\n"
    lines = [f"{head}, reporting as {reports[0]['organization-name']}"]
    for rep in reports:
        policies = rep["policies"]
        ok = sum(p["summary"]["total-successful-session-count"] for p in policies)
        bad = sum(p["summary"]["total-failure-session-count"] for p in policies)
        lines += ["", f"{policies[0]['policy']['policy-domain']}: {ok} successful, {bad} failed"]
        for p in policies:
            pol, summ = p["policy"], p["summary"]
            mx = ", ".join(pol.get("mx-host", [])) or "-"
            lines.append(f"  {pol['policy-type']:<15} mx {mx}: "
                         f"{summ['total-successful-session-count']} successful, "
                         f"{summ['total-failure-session-count']} failed")
            for d in p["failure-details"]:
                lines.append(_failure_line(d))
    return "\n".join(lines) + "\n"


def _failure_line(d: dict[str, Any]) -> str:
    where = f"{d.get('receiving-mx-hostname', '-')} [{d.get('receiving-ip', '-')}]"
    why = f": {d['failure-reason-code']}" if "failure-reason-code" in d else ""
    return (f"    {d['failed-session-count']:>5} x {d['result-type']} {where}"
            f" from {d.get('sending-mta-ip', '-')}{why}")


def status_failures(root: Path, now: float | None = None) -> dict[str, int]:
    """Today's (UTC) failed policy sessions per domain; {} when none or unreadable."""
    day = tlsrpt.day_of(time.time() if now is None else now)
    try:
        return tlsrpt.failures(tlsrpt.read_day(root, day))
    except OSError:
        return {}


def status_line(failures: dict[str, int]) -> str | None:
    """``eqmailctl status``'s line, or None when there is nothing to say."""
    if not failures:
        return None
    worst = sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{d} {n}" for d, n in worst[:10])
    more = f" (+{len(worst) - 10} more domains)" if len(worst) > 10 else ""
    return f"TLS policy failures today (eqmailctl tlsrpt): {shown}{more}"


def _describe(r: SessionResult) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.when))
    host = f"{r.mx_host or '-'} [{r.receiving_ip or '-'}]"
    if r.result is None:
        outcome = f"ok to {host}" + (f" ({r.matched})" if r.matched else "")
    else:
        outcome = f"{r.result.value} at {host}" + (f": {r.detail}" if r.detail else "")
    return f"{r.policy.value}, last attempt {when} UTC: {outcome}"


def queue_tls(root: Path, domains: list[str], now: float | None = None) -> list[tuple[str, SessionResult | None]]:
    """Each pending remote domain with its last recorded session (None: none today or
    yesterday)."""
    try:
        found = tlsrpt.latest_many(root, domains, now)
    except OSError:
        found = {}
    return [(d, found.get(d)) for d in domains]


def queue_lines(root: Path, domains: list[str]) -> list[str]:
    """``queue show``'s ``tls:`` lines."""
    return [f"tls: {d}: {_describe(r) if r else NOT_RECORDED}"
            for d, r in queue_tls(root, domains)]


def queue_json(root: Path, domains: list[str]) -> dict[str, Any]:
    """``queue show --json``'s ``tls`` member."""
    out = []
    for d, r in queue_tls(root, domains):
        item: dict[str, Any] = {"domain": d, "policy": None}
        if r is not None:
            item.update(policy=r.policy.value, time=int(r.when), mx_host=r.mx_host,
                        receiving_ip=r.receiving_ip,
                        result=r.result.value if r.result else "success", detail=r.detail)
        out.append(item)
    return {"tls": out}
