"""The Received line qmail-smtpd puts on top of every message, and eQmail's date format.

Owns: the exact text of (reference/qmail-core.md §5.1, eqmail-features.md §5, §10)::

    Received: from <remotehost> (HELO <helo>) (<remoteinfo>@<remoteip>)
      by <local> with <protocol>; <date>

- ``(HELO <helo>)`` only when a HELO/EHLO name was given and it differs,
  case-insensitively, from remotehost;
- ``<remoteinfo>@`` only when TCPREMOTEINFO is set (ident, AUTH user or AUTH=);
- in remotehost, helo, remoteinfo, remoteip and local every *byte* outside
  ``A-Za-z0-9.@%+/=:-`` becomes ``?`` (so a client cannot inject header lines): a
  two-byte UTF-8 character gives ``??``, and a NUL ends the text, as received.c's
  safeput() on a C string does;
- the HELO/remotehost comparison is qmail's case_diffs(): ASCII letters only;
- protocol is ``SMTP``, ``ESMTPA`` or ``ESMTPS (<cipher> encrypted)`` (optionally
  followed by ``\\n  (cert <email>)``), written as given;
- the date is eQmail's: local time with a numeric offset, ``7 Mar 2016 14:05:09 +0100``
  (day not zero-padded).

Inputs: strings and a timestamp.  Outputs: ``str`` (encode with eqmail.textio).  Pure,
except that :func:`date822` reads the local time zone unless an offset is given.
"""

from __future__ import annotations

import re
import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UNSAFE = re.compile(r"[^A-Za-z0-9.@%+/=:\-]")


def safe(text: str) -> str:
    """received.c's safeput(): the text as the bytes the client sent (eqmail.textio's
    surrogateescape form), cut at the first NUL, every untrusted byte made ``?``."""
    data = text.encode("utf-8", "surrogateescape").split(b"\0", 1)[0]
    return _UNSAFE.sub("?", data.decode("latin-1"))


def _c_string(text: str) -> str:
    """What qmail-smtpd's C string holds: the text up to its first NUL."""
    return text.split("\0", 1)[0]


def _ascii_lower(text: str) -> str:
    """case_diffs() folds only A-Z (str.lower() would also fold e.g. the Kelvin sign)."""
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def date822(t: float, utcoffset: int | None = None) -> str:
    """``D Mon YYYY HH:MM:SS +hhmm``.  ``utcoffset`` (seconds east of UTC) defaults to
    the local zone's offset at ``t``; tests pass it to be independent of TZ."""
    if utcoffset is None:
        utcoffset = time.localtime(t).tm_gmtoff
    tm = time.gmtime(int(t) + utcoffset)
    sign = "+" if utcoffset >= 0 else "-"
    minutes = abs(utcoffset) // 60
    return (f"{tm.tm_mday} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} "
            f"{sign}{minutes // 60:02d}{minutes % 60:02d}")


def received_line(
    *,
    protocol: str,
    local: str,
    remoteip: str,
    remotehost: str,
    remoteinfo: str | None,
    helo: str | None,
    when: float,
    utcoffset: int | None = None,
) -> str:
    """The complete Received header, two lines, ending in ``\\n`` (stored form: LF)."""
    parts = ["Received: from ", safe(remotehost)]
    if helo is not None and _ascii_lower(_c_string(helo)) != _ascii_lower(_c_string(remotehost)):
        parts += [" (HELO ", safe(helo), ")"]
    parts.append(" (")
    if remoteinfo is not None:
        parts += [safe(remoteinfo), "@"]
    parts += [safe(remoteip), ")\n  by ", safe(local), " with ", protocol, "; ",
              date822(when, utcoffset), "\n"]
    return "".join(parts)
