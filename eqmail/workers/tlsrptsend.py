"""Mailing the TLS-RPT reports of finished UTC days (RFC 8460 §3, §5).

The MTA-STS policy worker (eqmailt) calls :func:`send_due` about once an hour.  For each
of the last :data:`LOOKBACK_DAYS` finished UTC days (ended at least :data:`GRACE`
seconds ago, so sessions still ending at midnight are in), it aggregates the day's
records (eqmail.delivery.tlsrpt) into one report per policy domain, looks up
``_smtp._tls.<domain>`` through control/dnsservers (the resolvers remote delivery uses)
and queues the RFC 8460 §5.3 message to the record's ``rua=mailto:`` addresses through
the queue writer (eqmail.queue.client, as eqmail-inject does: a local injection, so
outbound DKIM signs it for control/me when a key is configured), from
``postmaster@<me>``.  ``rua=https:`` URIs are not used: RFC 8460 §3 lets a sender
choose, and posting would give this worker a second kind of outbound connection; a
domain that lists only https URIs gets no report (logged).

Privilege: eqmailt reads ``<root>/tlsrpt/`` (0755, files 0644) but cannot write it, so
the record of what was mailed lives in ``<root>/sts/tlsrpt-sent/YYYY-MM-DD`` (the
policy worker owns ``<root>/sts/``): one line per domain done (``DOMAIN sent``,
``DOMAIN none`` — no record, or no usable one —, ``DOMAIN failed`` — the queue refused
it for good), and a last line ``.`` once every domain of the day is done.

Crash argument: a domain's line is appended (and fsync'd) right after its message was
queued; a crash between the two sends that report once more (with the same Report-ID,
so a receiver can drop it), never loses one.  A temporary DNS or queue failure leaves
the domain without a line and the next call tries again, until the day falls out of
the look-back window.  One call spends at most ``budget`` seconds (the worker has other
work); what is left waits for the next call.

Failure modes: never raises for a domain's or the disk's problems (logged); the caller
still wraps it, as any hourly job.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from eqmail.control import Controls
from eqmail.delivery import tlsrpt
from eqmail.delivery.tlsrptmail import RecordError, choose_record, is_hostname, report_message
from eqmail.dns import LookupHard, LookupSoft, Resolver
from eqmail.instance import Instance
from eqmail.ipc.framing import ProtocolError
from eqmail.ipc.queue import QQExit
from eqmail.log import log, sanitize
from eqmail.queue.client import QueueConnection, SubmitResult

LOOKBACK_DAYS = 3
GRACE = 15 * 60
LOOKUP_TIMEOUT = 5.0
BUDGET = 60.0
SUBMIT_TIMEOUT = 60.0
MARKERS = ("sts", "tlsrpt-sent")
COMPLETE = "."
MAX_MARKER = 1 << 20


def marker_dir(root: Path) -> Path:
    return Path(root).joinpath(*MARKERS)


def send_due(instance: Instance, controls: Controls, now: float, *, budget: float = BUDGET,
             resolver: Resolver | None = None) -> int:
    """Mail every report of a finished UTC day not mailed yet; the number mailed."""
    marks = marker_dir(instance.root)
    try:
        os.makedirs(marks, mode=0o700, exist_ok=True)
    except OSError as e:
        # Without a place to note what was sent, sending would repeat every hour.
        log(f"warning: tlsrpt: cannot keep {marks}: {e.strerror}; no reports mailed")
        return 0
    me = controls.me
    res = resolver or Resolver(controls.dnsservers, lifetime=LOOKUP_TIMEOUT)
    deadline = time.monotonic() + budget
    today = tlsrpt.day_of(now - GRACE)
    mailed = 0
    for back in range(LOOKBACK_DAYS, 0, -1):
        day = today - dt.timedelta(days=back)
        try:
            mailed += _send_day(instance, me, res, marks / day.isoformat(), day, now, deadline)
        except OSError as e:
            log(f"warning: tlsrpt: reports of {day}: {e}")
    _prune(marks, today)
    return mailed


def _done(marker: Path) -> set[str]:
    try:
        with open(marker, "rb") as f:
            data = f.read(MAX_MARKER)
    except FileNotFoundError:
        return set()
    return {ln.split(" ", 1)[0] for ln in data.decode("ascii", "replace").split("\n") if ln}


def _note(marker: Path, line: str) -> None:
    fd = os.open(marker, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (line + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _send_day(instance: Instance, me: str, res: Resolver, marker: Path, day: dt.date,
              now: float, deadline: float) -> int:
    done = _done(marker)
    if COMPLETE in done:
        return 0
    mailed = 0
    left = False
    for report in tlsrpt.day_reports(instance.root, day, me):
        domain = report["policies"][0]["policy"]["policy-domain"]
        if domain in done or not is_hostname(domain):
            continue  # not a name we could look up (an address literal): nothing to do
        if time.monotonic() >= deadline:
            return mailed  # the next call goes on
        status = _send_one(instance, me, res, report, domain, now)
        if status is None:
            left = True
            continue
        _note(marker, f"{domain} {status}")
        mailed += status == "sent"
    if not left:
        _note(marker, COMPLETE)
    return mailed


def _send_one(instance: Instance, me: str, res: Resolver, report: dict[str, Any],
              domain: str, now: float) -> str | None:
    """Mail one report: "sent", "none" (no reports wanted), "failed" (refused for
    good), or None (try again later)."""
    name = f"_smtp._tls.{domain}"
    try:
        record = choose_record(res.txt(name))
    except LookupHard:
        return "none"
    except LookupSoft as e:
        log(f"tlsrpt: {name}: temporary DNS failure ({sanitize(str(e))[:200]}); will retry")
        return None
    except RecordError as e:
        log(f"tlsrpt: {name}: no usable TLSRPT record: {sanitize(str(e))}")
        return "none"
    if not record.mailto:
        log(f"tlsrpt: {name}: only https reporting URIs, which eqmail does not use")
        return "none"
    sender = f"postmaster@{me}"
    message = report_message(report, me, sender, record.mailto, now, me)
    result = _submit(instance.root, sender, list(record.mailto), message)
    rcpts = ", ".join(record.mailto)
    if result.ok:
        log(f"tlsrpt: report {report['report-id']} mailed to {rcpts}: qp {result.qp}")
        return "sent"
    log(f"tlsrpt: report {report['report-id']} to {rcpts}: queue said: {result.text}")
    return "failed" if result.permanent else None


def _submit(root: Path, sender: str, recipients: list[str], message: bytes) -> SubmitResult:
    """eqmail.queue.client.submit with a shorter bound: a stuck queue writer must not
    hold the policy worker for the client's default ten minutes."""
    try:
        conn = QueueConnection(root, None, timeout=SUBMIT_TIMEOUT)
    except OSError:
        return SubmitResult.from_code(QQExit.CANNOT_EXEC)
    try:
        return conn.submit(sender, recipients, message)
    except (OSError, ProtocolError):
        return SubmitResult.from_code(QQExit.BUG)
    finally:
        conn.close()


def _prune(marks: Path, today: dt.date) -> None:
    """Markers of days that left the look-back window are no longer needed."""
    try:
        entries = list(os.scandir(marks))
    except OSError:
        return
    for entry in entries:
        try:
            day = tlsrpt.parse_day(entry.name)
        except ValueError:
            continue
        if (today - day).days > LOOKBACK_DAYS + 1:
            try:
                os.unlink(entry.path)
            except OSError:
                pass
