"""TLS-RPT records (RFC 8460): contract placeholder of issue 17; the TLS-RPT work
replaces this module."""

from __future__ import annotations

from pathlib import Path

from eqmail.delivery.tlspolicy import SessionResult


def record(root: Path, result: SessionResult) -> None:
    """Store one session's result under the instance root (remote delivery, eqmailr):
    at once visible to ``eqmailctl tlsrpt``; never raises (a store problem is logged)."""
    raise NotImplementedError("issue 17 contract")
