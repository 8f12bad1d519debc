"""How the logger stamps and shapes each line: control/logformat.

Pure functions, no I/O: the logger worker (eqmail.workers.logger) hands a batch of
scrubbed lines and the time they were read, and writes what comes back.

The formats (``LogFormat``):

- ``local`` (the default, as before): ``2026-12-07 19:07:20.123456 `` in local time.
- ``tai64n``: qmail's and daemontools' label, ``@4000000069...`` (24 hex digits: TAI64
  seconds as multilog writes them — 2^62 + 10 + Unix seconds — and nanoseconds), one
  space, the line.  ``tai64nlocal`` and qmailanalog read it.
- ``rfc3339``: ``2026-12-07T20:07:20.123456+01:00`` — local time with its UTC offset
  and microseconds, one space, the line.
- ``json``: one JSON object per line (``json.loads`` reads each) with the fields named
  in ``JSON_FIELDS``; bytes that are not UTF-8 appear as ``\\xNN`` text, so every line
  is valid JSON whatever a program wrote on its stderr.

Under systemd, when the log goes to the journal (``journal=True``), the text formats
get no stamp at all: journald adds its own.  Instead each line starts with its syslog
priority as sd-daemon(3) says — ``<4>`` (warning) for ``alert:`` and ``warning:``
lines, ``<6>`` (info) for the rest — so ``journalctl -p warning`` finds the alerts,
and a program's stderr line that itself begins with ``<0>`` cannot pass for an
emergency.  JSON lines keep their ``time`` field, which is part of the record, not a
prefix.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from enum import StrEnum


class LogFormat(StrEnum):
    LOCAL = "local"
    TAI64N = "tai64n"
    RFC3339 = "rfc3339"
    JSON = "json"


# Every key a JSON log line can carry.  ``time`` and ``text`` are always there; the
# others only when the line is one of qmail's standard lines that carries them.
JSON_FIELDS = (
    "time",      # RFC 3339, local time with offset, microseconds
    "level",     # "alert" or "warning" for lines starting so, else "info"
    "text",      # the whole line, exactly as the text formats show it
    "event",     # new msg | info msg | starting delivery | delivery | end msg | bounce msg
                 # | triple bounce | status | smtpd
    "msg",       # queue message id (int)
    "delivery",  # delivery number (int)
    "channel",   # local | remote
    "to",        # recipient of "starting delivery"
    "status",    # success | failure | deferral (a "delivery" line)
    "reason",    # the text after the status of a "delivery" line
    "bytes",     # message size from "info msg"
    "from",      # envelope sender from "info msg" (without <>)
    "qp",        # qp of "info msg" / "bounce msg" (int)
    "uid",       # uid of "info msg" (int)
)

# qmail-send's lines (qmail-log(5)); the named groups become JSON fields.
_INT_FIELDS = frozenset({"msg", "delivery", "bytes", "qp", "uid"})
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("new msg", re.compile(r"new msg (?P<msg>\d+)$")),
    ("info msg", re.compile(r"info msg (?P<msg>\d+): bytes (?P<bytes>\d+) from <(?P<from>.*)> "
                            r"qp (?P<qp>\d+) uid (?P<uid>\d+)$")),
    ("starting delivery", re.compile(r"starting delivery (?P<delivery>\d+): msg (?P<msg>\d+) "
                                     r"to (?P<channel>local|remote) (?P<to>.*)$")),
    ("delivery", re.compile(r"delivery (?P<delivery>\d+): (?P<status>success|failure|deferral): "
                            r"(?P<reason>.*)$")),
    ("end msg", re.compile(r"end msg (?P<msg>\d+)$")),
    ("bounce msg", re.compile(r"bounce msg (?P<msg>\d+) qp (?P<qp>\d+)$")),
    ("triple bounce", re.compile(r"triple bounce: discarding bounce/(?P<msg>\d+)$")),
    ("status", re.compile(r"status: ")),
    ("smtpd", re.compile(r"qmail-smtpd: ")),
)
TAI64_BASE = 2**62 + 10  # multilog's label for Unix time 0 (TAI = UTC + 10 s in 1970)


def tai64n(t: float) -> bytes:
    """qmail's ``@4000...`` label for the Unix time ``t``."""
    sec = int(t)
    nano = min(int(round((t - sec) * 1e9)), 999_999_999)
    return b"@%016x%08x" % (TAI64_BASE + sec, nano)


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).astimezone().isoformat(timespec="microseconds")


def _local(t: float) -> bytes:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)).encode() + b".%06d" % int((t % 1) * 1e6)


def parse_fields(text: str) -> dict[str, object]:
    """The JSON fields of one line (without ``time``): level, text, and what a qmail
    standard line carries."""
    fields: dict[str, object] = {}
    level = "alert" if text.startswith("alert:") else "warning" if text.startswith("warning:") else "info"
    fields["level"] = level
    fields["text"] = text
    for event, pattern in _PATTERNS:
        m = pattern.match(text)
        if m:
            fields["event"] = event
            for k, v in m.groupdict().items():
                fields[k] = int(v) if k in _INT_FIELDS else v
            break
    return fields


def json_line(line: bytes, t: float) -> bytes:
    text = line.decode("utf-8", "backslashreplace")
    record = {"time": rfc3339(t), **parse_fields(text)}
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def format_lines(lines: list[bytes], fmt: LogFormat, t: float, journal: bool = False) -> bytes:
    """``lines`` (already scrubbed, without newlines) as the bytes to write."""
    if fmt is LogFormat.JSON:
        return b"".join(json_line(ln, t) for ln in lines)
    if journal:
        return b"".join((b"<4>" if ln.startswith((b"alert:", b"warning:")) else b"<6>") + ln + b"\n"
                        for ln in lines)
    if fmt is LogFormat.TAI64N:
        stamp = tai64n(t)
    elif fmt is LogFormat.RFC3339:
        stamp = rfc3339(t).encode()
    else:
        stamp = _local(t)
    return b"".join(stamp + b" " + ln + b"\n" for ln in lines)
