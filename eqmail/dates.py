"""RFC 822 dates as eQmail writes them (qmail-core §1.3, eqmail-features §10).

eQmail 1.09 prints local time with a numeric offset (``30 Nov 2026 14:05:09 +0100``;
day not zero-padded, time zero-padded).  qmail-qread prints GMT; :func:`qread_date`.
"""

from __future__ import annotations

import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def date822(t: float | None = None) -> str:
    """``D Mon YYYY HH:MM:SS +hhmm`` in local time."""
    t = time.time() if t is None else t
    lt = time.localtime(t)
    off = lt.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off) // 60
    return (
        f"{lt.tm_mday} {_MONTHS[lt.tm_mon - 1]} {lt.tm_year} "
        f"{lt.tm_hour:02d}:{lt.tm_min:02d}:{lt.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}"
    )


def qread_date(t: float) -> str:
    """qmail-qread's ``D Mon YYYY HH:MM:SS GMT``."""
    g = time.gmtime(t)
    return f"{g.tm_mday} {_MONTHS[g.tm_mon - 1]} {g.tm_year} {g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} GMT"
