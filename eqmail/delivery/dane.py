"""DANE for SMTP (RFC 7672, RFC 7671): contract placeholder of issue 17; the DANE work
replaces this module."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from eqmail.delivery.tlspolicy import ResultType, Tlsa


@dataclass(frozen=True)
class DaneVerdict:
    """``ok``: the peer's chain matches a usable TLSA record (``detail`` says which,
    for the log); otherwise ``result`` is the TLS-RPT failure type and ``detail`` why."""

    ok: bool
    result: ResultType | None
    detail: str


def usable(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    """The records RFC 7672 §3.1 lets SMTP use: DANE-TA(2)/DANE-EE(3), selector 0/1,
    matching type 0/1/2, data of the right length."""
    lengths = {0: None, 1: 32, 2: 64}
    return tuple(r for r in records
                 if r.usage in (2, 3) and r.selector in (0, 1) and r.mtype in lengths
                 and (lengths[r.mtype] is None or len(r.data) == lengths[r.mtype]))


def verify(records: Sequence[Tlsa], chain: Sequence[x509.Certificate],
           names: Sequence[str], now: float) -> DaneVerdict:
    """``chain`` (leaf first, as the server sent it) against the usable ``records``;
    ``names``: the reference identifiers for DANE-TA (RFC 7672 §3.2.2)."""
    raise NotImplementedError("issue 17 contract")
