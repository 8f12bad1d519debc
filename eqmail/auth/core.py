"""Inbound authentication of one message: SPF, DKIM, DMARC, ARC -> one report.

Owns: the order of the checks, the per-message time budget they share, and the
Authentication-Results field that reports them.  Called by the listener at the end of
DATA (in a worker thread: it blocks on DNS); needs no privilege and no file.

Input: :class:`Inbound` (what the SMTP session knows), a :class:`Lookups`
(:func:`eqmail.auth.dns.make_lookups` on control/dnsservers), an :class:`AuthPolicy`
(the authserv-id and the seconds all lookups of the message may take).  Output:
:class:`AuthReport`.  :func:`authenticate` never raises and returns within the
deadline plus the CPU time of hashing the message once per verified signature
(at most eqmail.dkim.verify's MAX_SIGNATURES plus one ARC-Message-Signature): each
lookup gets only the time left, and after the deadline every lookup is temperror
without being asked.  Nothing it returns is a refusal: what to do with a DMARC
``reject`` disposition is the caller's (control/) decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from eqmail.auth import arc as arcmod
from eqmail.auth import dmarc as dmarcmod
from eqmail.auth.arc import Arc, ArcResult
from eqmail.auth.authres import ResInfo, format_field
from eqmail.auth.dmarc import Dmarc, DmarcDisposition, DmarcResult
from eqmail.auth.dns import Budget, Lookups, cache_only
from eqmail.auth.message import header_fields
from eqmail.auth.spfcheck import Spf, SpfResult, check_host
from eqmail.dkim import verify as dkimverify
from eqmail.dkim.verify import DkimResult
from eqmail.dkim.verify import Result as Dkim


@dataclass(frozen=True)
class Inbound:
    """What the listener knows at the end of DATA.  ``client_ip``: textual IPv4 or
    IPv6 (no ``::ffff:`` prefix for IPv4); ``mail_from``: the envelope sender, ``""``
    for ``<>``; ``message``: header and body as received (LF or CRLF), without the
    Received field we add."""

    client_ip: str
    helo: str
    mail_from: str
    message: bytes


@dataclass(frozen=True)
class AuthPolicy:
    """``authserv_id``: ``me`` or the admin's value; ``deadline``: seconds all lookups
    of one message may take together."""

    authserv_id: str
    deadline: float = 10.0


@dataclass(frozen=True)
class AuthReport:
    """The outcome for one message.

    ``header``: the complete folded ``Authentication-Results:`` field, LF line ends,
    ending in LF.  ``spf``, ``dmarc``, ``arc`` are the results (StrEnums: they compare
    equal to ``"pass"`` etc.; ``arc`` is None when the message has no ARC fields),
    ``dkim`` one result per signature (a single ``none`` when unsigned); the
    ``*_detail`` values carry identities and reasons.  ``disposition``: what the From
    domain's DMARC policy asks for THIS message — after p/sp and pct (see
    eqmail.auth.dmarc: a deterministic hash of the message picks the pct sample);
    ``none`` unless ``dmarc`` is ``fail``.  ``from_domain``: the RFC5322.From domain
    DMARC evaluated (None when there was none).  ``elapsed``: seconds taken;
    ``lookups``: DNS lookups made."""

    header: bytes
    spf: Spf
    dkim: tuple[DkimResult, ...]
    dmarc: Dmarc
    arc: Arc | None
    disposition: DmarcDisposition
    from_domain: str | None
    spf_detail: SpfResult | None = None
    dmarc_detail: DmarcResult | None = None
    arc_detail: ArcResult | None = None
    elapsed: float = 0.0
    lookups: int = 0


def _spf_info(spf: SpfResult) -> ResInfo:
    prop = ("smtp", "mailfrom" if spf.identity == "mailfrom" else "helo", spf.value)
    return ResInfo("spf", spf.result.value, spf.explanation, (prop,) if spf.value else ())


def _dkim_infos(results: tuple[DkimResult, ...]) -> list[ResInfo]:
    domains = [r.domain for r in results if r.domain]
    out = []
    for r in results:
        props = [("header", "d", r.domain)] if r.domain else []
        if r.selector:
            props.append(("header", "s", r.selector))
        if r.b and domains.count(r.domain) > 1:
            props.append(("header", "b", r.b))
        out.append(ResInfo("dkim", r.result.value, r.reason if r.result is not Dkim.NONE
                           else "", tuple(props)))
    return out


def _dmarc_info(d: DmarcResult) -> ResInfo:
    props: list[tuple[str, str, str]] = []
    if d.from_domain:
        props.append(("header", "from", d.from_domain))
    policy = ""
    if d.record is not None and d.policy is not None:
        rec = d.record
        policy = (f"p={rec.p.value} sp={rec.sp.value} pct={rec.pct} "
                  f"dis={d.disposition.value}")
        props.append(("policy", "dmarc", d.policy.value))
    reason = d.reason if d.result is not Dmarc.PASS else ""
    return ResInfo("dmarc", d.result.value, reason, tuple(props), policy)


def _arc_info(a: ArcResult) -> ResInfo:
    return ResInfo("arc", a.result.value, a.reason)


def _checks(inbound: Inbound, budget: Budget, policy: AuthPolicy
            ) -> tuple[SpfResult, tuple[DkimResult, ...], ArcResult | None, DmarcResult]:
    spf = check_host(budget, inbound.client_ip, inbound.mail_from, inbound.helo,
                     receiver=policy.authserv_id)
    try:
        dkim = tuple(dkimverify.verify(inbound.message, budget.txt_lookup(),
                                       deadline=budget.deadline, clock=budget.clock))
    except Exception as e:  # verify promises not to raise; a broken promise is ours
        dkim = (DkimResult(Dkim.TEMPERROR, reason=f"internal: {type(e).__name__}"),)
    fields = header_fields(inbound.message)  # read once, for ARC and DMARC
    try:
        arc = arcmod.verify(inbound.message, budget, fields)
    except Exception as e:
        arc = ArcResult(Arc.FAIL, f"internal: {type(e).__name__}")
    try:
        dmarc = dmarcmod.evaluate(inbound.message, budget, spf, dkim, fields)
    except Exception as e:
        dmarc = DmarcResult(Dmarc.TEMPERROR, reason=f"internal: {type(e).__name__}")
    return spf, dkim, arc, dmarc


def authenticate(inbound: Inbound, lookups: Lookups, policy: AuthPolicy, *,
                 clock: Callable[[], float] = time.monotonic) -> AuthReport:
    """Check ``inbound`` (see the module doc).  Never raises."""
    start = clock()
    budget = Budget(lookups, start + max(0.0, policy.deadline), clock)
    try:
        spf, dkim, arc, dmarc = _checks(inbound, budget, policy)
    except Exception as e:  # nothing above should raise; if it does, say so, do not fail
        why = f"internal: {type(e).__name__}"
        spf = SpfResult(Spf.TEMPERROR, "mailfrom", inbound.mail_from, "", why)
        dkim = (DkimResult(Dkim.TEMPERROR, reason=why),)
        arc = None
        dmarc = DmarcResult(Dmarc.TEMPERROR, reason=why)
    infos = [_spf_info(spf), *_dkim_infos(dkim), _dmarc_info(dmarc)]
    if arc is not None:
        infos.append(_arc_info(arc))
    return AuthReport(
        header=format_field(policy.authserv_id, infos),
        spf=spf.result, dkim=dkim, dmarc=dmarc.result,
        arc=arc.result if arc is not None else None,
        disposition=dmarc.disposition, from_domain=dmarc.from_domain,
        spf_detail=spf, dmarc_detail=dmarc, arc_detail=arc,
        elapsed=clock() - start, lookups=budget.count)


def authenticate_cached(inbound: Inbound, lookups: Lookups,
                        policy: AuthPolicy) -> AuthReport | None:
    """:func:`authenticate` when every lookup it needs is in ``lookups``' cache (see
    :func:`eqmail.auth.dns.make_lookups`), without waiting for anything: the same
    report; None when something was not cached (or ``lookups`` has no cache), and the
    caller runs :func:`authenticate` where it may wait.  What a missed run costs is
    small: after the first miss no lookup is asked and no signature is checked."""
    probe = cache_only(lookups)
    if probe is None:
        return None
    report = authenticate(inbound, probe, policy, clock=probe.clock)
    return None if probe.missed else report
