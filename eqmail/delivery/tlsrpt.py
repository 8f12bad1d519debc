"""TLS-RPT records (RFC 8460): the lead's interim store until the TLS-RPT work lands.
One JSON line per session under <root>/tlsrpt/YYYY-MM-DD (UTC)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from eqmail.delivery.tlspolicy import SessionResult
from eqmail.log import log


def record(root: Path, result: SessionResult) -> None:
    """Store one session's result under the instance root (remote delivery, eqmailr):
    at once visible to ``eqmailctl tlsrpt``; never raises (a store problem is logged)."""
    directory = root / "tlsrpt"
    if not directory.is_dir():
        return
    day = time.strftime("%Y-%m-%d", time.gmtime(result.when))
    line = json.dumps(asdict(result), sort_keys=True) + "\n"
    try:
        fd = os.open(directory / day, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as e:
        log(f"warning: cannot record a TLS session in {directory / day}: {e.strerror}")
