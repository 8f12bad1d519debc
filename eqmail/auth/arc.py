"""ARC (RFC 8617): the chain of a received message, verified by dkimpy.

Owns: when ARC is evaluated (only when the message carries ARC-Seal,
ARC-Message-Signature or ARC-Authentication-Results fields; without them there is no
``arc=`` entry at all), the bounds, and the mapping of dkimpy's outcome to a result.
No ARC canonicalisation or crypto is written here: ``dkim.arc_verify`` does it, with
its key lookups on the message's :class:`eqmail.auth.dns.Budget`.

Results are the registered ones (RFC 8617 §10.2): ``pass``, ``fail``, ``none``.  A key
lookup that failed for now has no result of its own there: it is ``fail`` with a
reason that says "temporary", so a reader never takes it for a broken chain by
mistake.  More than :data:`MAX_SETS` ARC-Seal fields is ``fail`` without verifying
(RFC 8617 §4.2.1 caps a chain at 50 sets; each set costs a lookup and an RSA check).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import dkim

from eqmail.auth.dns import Budget, DnsTempError
from eqmail.auth.message import header_fields

MAX_SETS = 50
_ARC_FIELDS = frozenset({"arc-seal", "arc-message-signature", "arc-authentication-results"})


class Arc(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NONE = "none"


@dataclass(frozen=True)
class ArcResult:
    result: Arc
    reason: str = ""
    sets: int = 0


class _Temp(Exception):
    pass


def has_arc(message: bytes) -> bool:
    return any(name in _ARC_FIELDS for name, _ in header_fields(message))


def verify(message: bytes, budget: Budget,
           fields: list[tuple[str, bytes]] | None = None) -> ArcResult | None:
    """None when the message has no ARC fields; else the chain's validation result
    (``fields``: ``header_fields(message)``, when the caller has them)."""
    if fields is None:
        fields = header_fields(message)
    if not any(name in _ARC_FIELDS for name, _ in fields):
        return None
    sets = sum(1 for name, _ in fields if name == "arc-seal")
    if sets > MAX_SETS:
        return ArcResult(Arc.FAIL, f"{sets} ARC sets (limit {MAX_SETS})", sets)
    if budget.left() <= 0:
        return ArcResult(Arc.FAIL, "temporary: time for this message's lookups used up", sets)

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            qname = name.decode("ascii").rstrip(".")
            records = [b"".join(t) for t in budget.txt(qname)]
        except UnicodeDecodeError:
            return None
        except DnsTempError as e:
            raise _Temp(str(e)) from None
        return records[0] if len(records) == 1 else None

    try:
        cv, _results, why = dkim.arc_verify(message, dnsfunc=dnsfunc, minkey=1024)
    except _Temp as e:
        return ArcResult(Arc.FAIL, f"temporary: key lookup {e}", sets)
    except Exception as e:  # dkimpy on hostile input: a chain that cannot be validated
        return ArcResult(Arc.FAIL, f"unverifiable: {type(e).__name__}", sets)
    text = why.decode("ascii", "replace") if isinstance(why, bytes) else str(why)
    if cv == dkim.CV_Pass:
        return ArcResult(Arc.PASS, "", sets)
    if cv == dkim.CV_None:
        return ArcResult(Arc.NONE, text, sets)
    return ArcResult(Arc.FAIL, text, sets)
