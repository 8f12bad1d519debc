"""TLS-RPT records (RFC 8460): what each session under a TLS policy found, stored per
UTC day, and the aggregate reports made of them.

Owns: the day files ``<root>/tlsrpt/YYYY-MM-DD`` (one JSON object per line, one line
per :class:`~eqmail.delivery.tlspolicy.SessionResult`), their readers, and the RFC 8460
§4 report objects (:func:`reports`: one per policy domain with DANE or MTA-STS sessions,
or with a failed MTA-STS policy lookup).

Privilege: :func:`record` runs in remote delivery (eqmailr, in its pool threads);
``eqmailctl setup`` makes ``tlsrpt/`` owned by eqmailr, mode 0755, and the files are
0644, so ``eqmailctl`` (any user) and the mailer of the daily reports (the MTA-STS
policy worker, eqmailt) read them.  Nothing here writes anywhere else.
Inputs: SessionResults (record); the day files, which are ours but read as untrusted
bytes (bounded lines; a damaged line — a crash mid-write, a hand edit — is skipped).
Outputs: the day files; SessionResults, report objects (plain dicts, JSON-ready).

Durable state and its crash argument: a record is one ``write()`` of one line to a file
opened with ``O_APPEND``.  Linux serializes writes to a regular file, so lines written by
the remote worker's threads (and by a next generation's worker) never interleave; a
crash (or a full disk) can leave at most one line without its end, which the next
append glues to the line after it: the reader skips that one damaged line, every other
record survives.  Records are never rewritten; whole files older than :data:`KEEP_DAYS`
are removed by the writer when it starts a new day.  There is no commit point: a record
lost to a crash costs one count in a statistics report, never mail.

Failure modes: :func:`record` never raises (a store problem is logged, at most once a
minute); the readers raise nothing for damaged content and return nothing for a
missing file; OSError from an unreadable directory passes to the caller (eqmailctl says
so).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from eqmail.delivery.tlspolicy import PolicyKind, ResultType, SessionResult
from eqmail.log import log

DIR = "tlsrpt"
MAX_LINE = 16 * 1024      # one record; a longer line is damaged, not read
MAX_TEXT = 1000           # detail / matched / a host name, as stored
MAX_POLICY_STRING = 4096  # one policy-string element (a TLSA record of a full certificate)
MAX_STRINGS = 32          # policy strings / mx patterns kept per record
KEEP_DAYS = 31            # day files older than this are removed
LATEST_SCAN = 1 << 20     # latest(): bytes read from the end of a day file
MAX_FAILURE_DETAILS = 500  # per policy in a report; further failures only counted
FILE_MODE = 0o644

# RFC 8460 §4.3 policy-type of each PolicyKind a report counts.
POLICY_TYPES = {PolicyKind.DANE: "tlsa", PolicyKind.STS_ENFORCE: "sts",
                PolicyKind.STS_TESTING: "sts"}
NO_POLICY_FOUND = "no-policy-found"
# A failed MTA-STS policy lookup (RFC 8460 §4.3.2.2) belongs in the domain's report even
# though no policy applied: counted as "no-policy-found" (unless a cached policy applied).
STS_LOOKUP_FAILURES = frozenset({ResultType.STS_POLICY_FETCH_ERROR, ResultType.STS_POLICY_INVALID,
                                 ResultType.STS_WEBPKI_INVALID})

_warned = 0.0
_warn_lock = threading.Lock()


def day_of(when: float) -> dt.date:
    """The UTC day of a Unix time."""
    return dt.datetime.fromtimestamp(when, dt.UTC).date()


def day_path(root: Path, day: dt.date) -> Path:
    return Path(root) / DIR / day.isoformat()


def parse_day(text: str) -> dt.date:
    """``YYYY-MM-DD`` exactly (ValueError otherwise): the one spelling of a day file."""
    if len(text) != 10 or text[4] != "-" or text[7] != "-":
        raise ValueError(f"not a YYYY-MM-DD date: {text!r}")
    return dt.date.fromisoformat(text)


# ---------------------------------------------------------------- writing


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text[:limit]


def encode(result: SessionResult) -> bytes:
    """One record line (ends in ``\\n``, at most :data:`MAX_LINE` bytes): long texts
    are cut, and policy strings are dropped last-first until the line fits."""
    obj: dict[str, Any] = {
        "when": round(result.when, 3), "domain": _cut(result.domain), "policy": result.policy.value,
        "mx_host": _cut(result.mx_host), "receiving_ip": _cut(result.receiving_ip, 64),
        "sending_ip": _cut(result.sending_ip, 64),
        "result": result.result.value if result.result is not None else None,
        "detail": _cut(result.detail), "matched": _cut(result.matched),
        "policy_strings": [_cut(s, MAX_POLICY_STRING) for s in result.policy_strings[:MAX_STRINGS]],
        "mx_patterns": [_cut(s, 255) for s in result.mx_patterns[:MAX_STRINGS]],
    }
    while True:
        line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        if len(line) <= MAX_LINE or not obj["policy_strings"]:
            return line
        obj["policy_strings"].pop()


def _warn(text: str) -> None:
    """Log a store problem at most once a minute: it repeats on every delivery."""
    global _warned
    with _warn_lock:
        now = time.monotonic()
        if _warned and now - _warned < 60:
            return
        _warned = now
    log(f"warning: tlsrpt: {text}")


def record(root: Path, result: SessionResult) -> None:
    """Store one session's result under the instance root (remote delivery, eqmailr):
    at once visible to ``eqmailctl tlsrpt``; never raises (a store problem is logged).
    One open, one write, one close; a new day's file also removes the expired ones."""
    try:
        line = encode(result)
        path = day_path(root, day_of(result.when))
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
            created = False
        except FileNotFoundError:
            if not path.parent.is_dir():
                _warn(f"no directory {path.parent} (made by 'eqmailctl setup'): sessions not recorded")
                return
            fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
            created = True
        try:
            if created:
                os.fchmod(fd, FILE_MODE)  # whatever the worker's umask: eqmailctl reads it
            os.write(fd, line)
        finally:
            os.close(fd)
    except Exception as e:  # noqa: BLE001 -- a statistics store must never fail a delivery
        _warn(f"cannot record the session with {result.mx_host or result.domain}: {e}")
        return
    if created:
        try:
            prune(root, day_of(result.when))
        except OSError as e:
            _warn(f"cannot remove old records: {e}")


def prune(root: Path, today: dt.date, keep: int = KEEP_DAYS) -> None:
    """Remove the day files more than ``keep`` days before ``today``."""
    base = Path(root) / DIR
    for entry in os.scandir(base):
        try:
            day = parse_day(entry.name)
        except ValueError:
            continue
        if (today - day).days > keep:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------- reading


def _str(obj: dict[str, Any], key: str, limit: int = MAX_TEXT) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(key)
    return value


def _strings(obj: dict[str, Any], key: str, limit: int) -> tuple[str, ...]:
    value = obj.get(key, [])
    if (not isinstance(value, list) or len(value) > MAX_STRINGS
            or not all(isinstance(s, str) and len(s) <= limit for s in value)):
        raise ValueError(key)
    return tuple(value)


def decode(line: bytes) -> SessionResult | None:
    """A record line back to its SessionResult; None for anything damaged."""
    if len(line) > MAX_LINE:
        return None
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            return None
        when = obj["when"]
        if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
            return None
        result = obj.get("result")
        return SessionResult(
            when=float(when), domain=_str(obj, "domain"), policy=PolicyKind(obj["policy"]),
            mx_host=_str(obj, "mx_host"), receiving_ip=_str(obj, "receiving_ip", 64),
            sending_ip=_str(obj, "sending_ip", 64),
            result=None if result is None else ResultType(result),
            detail=_str(obj, "detail"), matched=_str(obj, "matched"),
            policy_strings=_strings(obj, "policy_strings", MAX_POLICY_STRING),
            mx_patterns=_strings(obj, "mx_patterns", 255))
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def read_day(root: Path, day: dt.date) -> Iterator[SessionResult]:
    """Every intact record of a UTC day, in the order written (none if no file)."""
    try:
        f = open(os.open(day_path(root, day), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")
    except FileNotFoundError:
        return
    with f:
        while True:
            line = f.readline(MAX_LINE + 1)
            if not line:
                return
            if not line.endswith(b"\n"):
                _skip_rest(f, line)
                continue
            found = decode(line)
            if found is not None:
                yield found


def _skip_rest(f: Any, line: bytes) -> None:
    """After an over-long piece: read on to the end of that line."""
    while len(line) > MAX_LINE and not line.endswith(b"\n"):
        line = f.readline(MAX_LINE + 1)


def _tail(path: Path, limit: int) -> list[bytes]:
    """The complete lines among the last ``limit`` bytes of a file, last first."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - limit)
        data = os.pread(fd, size - start, start)
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first piece may be the end of a line
    return [ln + b"\n" for ln in reversed(lines[:-1]) if ln]


def norm_domain(domain: str) -> str:
    return domain.lower().rstrip(".")


def latest_many(root: Path, domains: Iterable[str], now: float | None = None
                ) -> dict[str, SessionResult]:
    """The last record of each domain found in today's (UTC) or yesterday's file,
    reading at most :data:`LATEST_SCAN` bytes from the end of each; keys are the
    domains as given."""
    wanted = {norm_domain(d): d for d in domains}
    found: dict[str, SessionResult] = {}
    today = day_of(time.time() if now is None else now)
    for day in (today, today - dt.timedelta(days=1)):
        for line in _tail(day_path(root, day), LATEST_SCAN):
            if len(found) == len(wanted):
                return found
            rec = decode(line)
            if rec is None:
                continue
            name = wanted.get(norm_domain(rec.domain))
            if name is not None and name not in found:
                found[name] = rec
    return found


def latest(root: Path, domain: str, now: float | None = None) -> SessionResult | None:
    """The last SessionResult recorded for ``domain`` today or yesterday (UTC)."""
    return latest_many(root, [domain], now).get(domain)


def failures(results: Iterable[SessionResult]) -> dict[str, int]:
    """Failed sessions per domain among those a report counts (eqmailctl status)."""
    out: dict[str, int] = {}
    for r in results:
        if r.result is not None and _policy_type(r) is not None:
            d = clean(norm_domain(r.domain))
            out[d] = out.get(d, 0) + 1
    return out


# ---------------------------------------------------------------- RFC 8460 reports


def clean(text: str) -> str:
    """Text for a report: lone surrogates (undecodable envelope bytes) as ``\\udcNN``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _policy_type(r: SessionResult) -> str | None:
    if not norm_domain(r.domain):
        return None  # nothing to report to
    kind = POLICY_TYPES.get(r.policy)
    if r.result in STS_LOOKUP_FAILURES and (kind is None or not r.policy_strings):
        # the domain's MTA-STS policy could not be had (remote delivery records this
        # under mta-sts testing, with no policy text): nothing was applied
        return NO_POLICY_FOUND
    return kind


def _policy_key(r: SessionResult, kind: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    if kind == NO_POLICY_FOUND:
        return kind, (), ()
    # a DANE policy is its MX host's TLSA RRset: one policy per host (RFC 8460 §4.3)
    mx = tuple(p for p in r.mx_patterns if p)
    if not mx and kind == "tlsa" and r.mx_host:
        mx = (r.mx_host,)
    return kind, r.policy_strings, mx


class _Policy:
    """One ``policies[]`` element being counted."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.details: dict[tuple[str, str, str, str, str], int] = {}

    def add(self, r: SessionResult) -> None:
        if r.result is None:
            self.ok += 1
            return
        self.failed += 1
        key = (r.result.value, r.sending_ip, r.mx_host, r.receiving_ip, r.detail)
        if key in self.details or len(self.details) < MAX_FAILURE_DETAILS:
            self.details[key] = self.details.get(key, 0) + 1


def _detail(key: tuple[str, str, str, str, str], count: int) -> dict[str, Any]:
    result, sip, mx, rip, why = key
    out: dict[str, Any] = {"result-type": result}
    if _is_ip(sip):
        out["sending-mta-ip"] = sip
    if mx:
        out["receiving-mx-hostname"] = clean(mx)
    if _is_ip(rip):
        out["receiving-ip"] = rip
    out["failed-session-count"] = count
    if why:
        out["failure-reason-code"] = clean(why)
    return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def report_id(day: dt.date, domain: str, me: str) -> str:
    """Unique per (day, policy domain, reporter): mailed once, to every rua alike, and
    the same again if a crash made the mailer send it twice (receivers can drop it)."""
    return f"{day.isoformat()}T00:00:00Z_{domain}@{me}"


def unique_id(rid: str) -> str:
    """The file name's unique-id (RFC 8460 §5.3: letters and digits) of a report id."""
    return hashlib.sha256(rid.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def reports(results: Iterable[SessionResult], day: dt.date, me: str,
            end: dt.datetime | None = None) -> list[dict[str, Any]]:
    """RFC 8460 §4 report objects of one UTC day: one per policy domain, sorted by
    domain.  ``end``: the end of the range (default the day's last second; eqmailctl
    gives "now" for today so far)."""
    grouped: dict[str, dict[tuple[str, tuple[str, ...], tuple[str, ...]], _Policy]] = {}
    for r in results:
        kind = _policy_type(r)
        if kind is None or day_of(r.when) != day:
            continue
        policies = grouped.setdefault(clean(norm_domain(r.domain)), {})
        policies.setdefault(_policy_key(r, kind), _Policy()).add(r)
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    stop = end or start + dt.timedelta(seconds=86399)
    me = clean(me)
    out = []
    for domain in sorted(grouped):
        rid = report_id(day, domain, me)
        out.append({
            "organization-name": me,
            "date-range": {"start-datetime": _stamp(start), "end-datetime": _stamp(stop)},
            "contact-info": f"postmaster@{me}",
            "report-id": rid,
            "policies": [_policy_object(domain, key, p)
                         for key, p in sorted(grouped[domain].items(), key=lambda kv: kv[0])],
        })
    return out


def _policy_object(domain: str, key: tuple[str, tuple[str, ...], tuple[str, ...]],
                   p: _Policy) -> dict[str, Any]:
    kind, strings, mx = key
    policy: dict[str, Any] = {"policy-type": kind}
    if kind != NO_POLICY_FOUND:
        policy["policy-string"] = [clean(s) for s in strings]
    policy["policy-domain"] = domain
    if mx:
        policy["mx-host"] = [clean(m) for m in mx]
    return {
        "policy": policy,
        "summary": {"total-successful-session-count": p.ok,
                    "total-failure-session-count": p.failed},
        "failure-details": [_detail(k, n) for k, n in sorted(p.details.items())],
    }


def _stamp(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def day_reports(root: Path, day: dt.date, me: str, end: dt.datetime | None = None
                ) -> list[dict[str, Any]]:
    """The reports of one UTC day's file."""
    return reports(read_day(root, day), day, me, end)
