"""Outbound TLS policy for one transaction (issue 17): which demand each MX host of the
recipient domain gets, what happens when none meets it, and what is recorded.

Owns: :class:`Plan` — a domain's policy decided host by host by :func:`apply` (a
tlshosts/ pin first, then DANE when control/dnssec trusts the resolver and the MX,
address and TLSA answers are authenticated, then the MTA-STS policy of the policy
worker; notlshosts/ and an exhaustive tlshosts/ are the admin's word over all of them;
an enforced MTA-STS policy drops the MX hosts it does not name), and the deferral
when no host meets the policy (:meth:`Plan.deferral`, a 5.7.10 failure for a
REQUIRETLS message); REQUIRETLS's validated hosts (:func:`validated`); RFC 8689's
``TLS-Required: No`` (:func:`tls_not_required`: demands checked and recorded, never
enforced); each session's record for TLS-RPT (:func:`record_session`, through
eqmail.delivery.tlsrpt) and the log lines naming the policy and what matched.  The SMTP
client enforces each demand (eqmail.smtp.client.TlsDemand); DANE's chain check is
:func:`dane_check` (eqmail.delivery.dane).

Runs in the remote delivery worker (eqmailr), called by eqmail.delivery.remote for
each transaction to a domain without an smtproutes route.  Inputs: the controls, the
TLS configuration, the MTA-STS source and the instance root (:class:`PolicyEnv`), the
resolver, the MX addresses and the message.  I/O: the DNS lookups of TLSA records (the
resolver's), the policy worker's socket (the source's), the TLS-RPT file
(eqmail.delivery.tlsrpt), log lines.  Failures: none raised — a failed lookup makes a
host unusable or the policy absent, as the RFCs say.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography import x509

from eqmail.control import Controls
from eqmail.delivery import dane, tlsrpt
from eqmail.delivery.tlspolicy import (
    PolicyKind,
    ResultType,
    SessionResult,
    StsLookup,
    StsMode,
    StsPolicy,
    StsSource,
)
from eqmail.dkim.signer import HEADER_MAX
from eqmail.dns import LookupHard, LookupSoft, MxAddress, Resolver, Tlsa, literal_ip
from eqmail.ipc.delivery import Outcome, Verdict
from eqmail.log import log, sanitize
from eqmail.smtp.client import Destination, PolicyFailure, SmtpSession, TlsDemand
from eqmail.smtp.transport import TlsConfig, TlsMode


@dataclass(frozen=True)
class PolicyEnv:
    """What deciding a policy needs of the remote worker: the controls, the TLS
    configuration (tlshosts/, notlshosts/), the MTA-STS source (None: not looked up)
    and where TLS-RPT records go (None: not recorded)."""

    controls: Controls
    tls: TlsConfig
    sts: StsSource | None
    root: Path | None


@dataclass(frozen=True)
class Attempt:
    """One delivery's facts beyond the envelope: the message id (for log lines) and
    RFC 8689 REQUIRETLS (the request's ``requiretls`` option, from the queue)."""

    msgid: int
    requiretls: bool = False


@dataclass
class Plan:
    """The TLS policy of one transaction's domain (issue 17): the demand on each MX
    host (by name), the policy's lookups for TLS-RPT, and the last host's failure —
    which becomes the deferral when no host meets the policy."""

    env: PolicyEnv
    domain: str
    attempt: Attempt
    demands: dict[str, TlsDemand] = field(default_factory=dict)
    sts: StsLookup | None = None
    tlsa_text: dict[str, tuple[str, ...]] = field(default_factory=dict)
    kind: PolicyKind | None = None  # the strictest policy met among the hosts
    failure: str = ""  # "host [ip]: result-type: detail" of the last policy failure

    def deferral(self) -> Outcome:
        kind = self.kind.value if self.kind is not None else PolicyKind.OPPORTUNISTIC.value
        text = (f"Sorry, no MX host of {self.domain} meets its TLS policy ({kind}): "
                f"{self.failure or 'no host to try'}. (#4.7.5)\n")
        verdict = Verdict.FAILURE if self.attempt.requiretls else Verdict.DEFERRAL
        if self.attempt.requiretls:
            text = text.replace("(#4.7.5)", "(#5.7.10)")
        return Outcome(verdict, text)


def tls_not_required(body: BinaryIO) -> bool:
    """RFC 8689 §5: a ``TLS-Required: No`` header field asks that TLS policy failures
    not stop the message (the header section's first HEADER_MAX bytes are read)."""
    body.seek(0)
    head = body.read(HEADER_MAX)
    body.seek(0)
    end = head.find(b"\n\n")
    for line in (head if end < 0 else head[:end]).split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"tls-required":
            return value.strip().lower() == b"no"
    return False


def apply(plan: Plan, resolver: Resolver, addrs: list[MxAddress],
          body: BinaryIO) -> list[MxAddress]:
    """Decide each MX host's demand (DANE over MTA-STS, a tlshosts/ pin over both,
    notlshosts/ and an exhaustive tlshosts/ over all: the admin's word) and drop the
    hosts an enforced policy forbids.  A message with ``TLS-Required: No`` (and without
    REQUIRETLS) gets its demands checked and recorded, never enforced; its header is
    read only when some host has a demand."""
    env = plan.env
    c = env.controls
    seen: list[bool] = []

    def opt_out() -> bool:
        if not seen:
            seen.append(not plan.attempt.requiretls and tls_not_required(body))
        return seen[0]

    domain = plan.domain
    if c.mtasts and env.sts is not None and literal_ip(domain) is None:
        plan.sts = env.sts.lookup(domain)
        if plan.sts.failure is not None:
            record(plan, PolicyKind.STS_TESTING, "", "", "", plan.sts.failure.value,
                    plan.sts.detail)
    sts = plan.sts.policy if plan.sts is not None else None
    if sts is not None and sts.mode is StsMode.NONE:
        sts = None
    kept: list[MxAddress] = []
    hosts: dict[str, bool] = {}  # host -> allowed
    for a in addrs:
        host = a.host
        if host not in hosts:
            hosts[host] = _decide(plan, resolver, a, sts, opt_out)
        if hosts[host]:
            kept.append(a)
    return kept


def _decide(plan: Plan, resolver: Resolver, a: MxAddress,
            sts: StsPolicy | None, opt_out: Callable[[], bool]) -> bool:
    """One MX host's demand into ``plan``; False when the host may not be used."""
    host = a.host
    mode, _ = plan.env.tls.mode_for(host)
    if not host or mode is not TlsMode.OPPORTUNISTIC:
        if mode is TlsMode.MANDATORY:
            plan.kind = PolicyKind.PIN
        return True  # a pin is enforced by the session; notls/exhaustive: no TLS policy
    if plan.env.controls.dnssec and a.secure:
        try:
            answer = resolver.tlsa(host)
        except (LookupSoft, LookupHard) as e:
            # RFC 7672 §2.2: a TLSA lookup that fails (bogus, SERVFAIL) makes the host
            # unusable: it may have records we could not see
            plan.failure = f"{host}: {ResultType.DNSSEC_INVALID.value}: TLSA lookup failed ({e})"
            plan.kind = plan.kind or PolicyKind.DANE
            record(plan, PolicyKind.DANE, host, "", "", ResultType.DNSSEC_INVALID.value,
                    f"TLSA lookup failed: {e}")
            return opt_out()
        if answer.secure and answer.records:
            usable = dane.usable(answer.records)
            plan.tlsa_text[host] = tuple(r.text() for r in answer.records)
            plan.demands[host] = TlsDemand(PolicyKind.DANE.value, not opt_out(), tlsa=usable,
                                           names=reference_ids(host, answer.base, plan.domain))
            if plan.kind is None or plan.kind is not PolicyKind.PIN:
                plan.kind = PolicyKind.DANE
            return True
    if sts is not None:
        enforce = sts.mode is StsMode.ENFORCE
        kind = PolicyKind.STS_ENFORCE if enforce else PolicyKind.STS_TESTING
        if plan.kind is None:
            plan.kind = kind
        if not sts.allows(host):
            detail = f"MX host {host} is not in the policy's mx list"
            record(plan, kind, host, "", "", ResultType.VALIDATION_FAILURE.value, detail)
            if enforce and not opt_out():
                plan.failure = f"{host}: {ResultType.VALIDATION_FAILURE.value}: {detail}"
                return False
            return True
        plan.demands[host] = TlsDemand(kind.value, enforce and not opt_out(), webpki=True)
    return True


def reference_ids(host: str, base: str, domain: str) -> tuple[str, ...]:
    """DANE-TA's names for a host's certificate (RFC 7672 §3.2.2): the TLSA base
    domain (the CNAME-expanded host name when the records were found there), the MX
    host name, and the next-hop domain."""
    out: list[str] = []
    for n in (base, host, domain):
        if n and n.lower() not in out:
            out.append(n.lower())
    return tuple(out)


def validated(tls: TlsConfig, dest: Destination) -> bool:
    """RFC 8689 §4.2.1: a host a REQUIRETLS message may go to — a tlshosts/ pin, or a
    DANE (with usable records) or MTA-STS enforce demand."""
    mode, _ = tls.mode_for(dest.host)
    if mode is TlsMode.MANDATORY:
        return True
    d = dest.demand
    if d is None or not d.enforce:
        return False
    return (d.kind == PolicyKind.DANE.value and bool(d.tlsa)) or d.kind == PolicyKind.STS_ENFORCE.value


def record(plan: Plan, kind: PolicyKind, host: str, ip: str, local: str,
           result: str | None, detail: str) -> None:
    """One session's result for TLS-RPT and eqmailctl (eqmail.delivery.tlsrpt)."""
    root = plan.env.root
    if root is None:
        return
    strings: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    if kind is PolicyKind.DANE:
        strings = plan.tlsa_text.get(host, ())
    elif kind in (PolicyKind.STS_ENFORCE, PolicyKind.STS_TESTING) and plan.sts is not None:
        if plan.sts.policy is not None:
            strings = tuple(ln for ln in plan.sts.policy.text.splitlines() if ln.strip())
            patterns = plan.sts.policy.mx
    ok = None if result is None else ResultType(result)
    tlsrpt.record(root, SessionResult(
        time.time(), plan.domain, kind, host, ip, local, ok,
        detail=detail if ok is not None else "", matched=detail if ok is None else "",
        policy_strings=strings, mx_patterns=patterns))


def dane_check(records: Sequence[Tlsa], chain: Sequence[x509.Certificate],
                names: Sequence[str], now: float) -> tuple[str | None, str]:
    """eqmail.delivery.dane.verify in the shape the SMTP client takes."""
    v = dane.verify(records, chain, names, now)
    if v.ok:
        return None, v.detail
    return (v.result or ResultType.VALIDATION_FAILURE).value, v.detail


def log_delivery(plan: Plan, dest: Destination, session: SmtpSession) -> None:
    """The delivery log line naming the policy and what matched (issue 17 item 5)."""
    assert dest.demand is not None
    result = session.tls_result
    what = result[1] if result is not None and result[0] is None else (
        f"not met ({result[0]}: {result[1]}), delivered anyway" if result is not None
        else "no TLS")
    log(f"remote: msg {plan.attempt.msgid} to {plan.domain}: {dest.demand.kind} TLS to "
        f"{dest.host} [{dest.ip}]: {sanitize(what)[:300]}")


def record_session(plan: Plan, dest: Destination, local: str,
                   result: tuple[str | None, str] | None) -> None:
    """An opened (or refused) session's TLS result: every one under a policy demand,
    a tlshosts/ pin's; opportunistic sessions are not recorded (nothing to report,
    and writing it would cost every delivery a write)."""
    if dest.demand is not None:
        if result is None:
            result = (ResultType.STARTTLS_NOT_SUPPORTED.value, "no TLS")
        record(plan, PolicyKind(dest.demand.kind), dest.host, dest.ip, local, *result)
        return
    mode, _ = plan.env.tls.mode_for(dest.host)
    if mode is TlsMode.MANDATORY:  # a pin's failures end in Quit, with eQmail's texts
        record(plan, PolicyKind.PIN, dest.host, dest.ip, local, None, "")


def policy_failure(plan: Plan, dest: Destination, local: str, e: PolicyFailure) -> None:
    """A host that did not meet its demand: the plan's last failure (the deferral's
    text when no host does), the record, the log line."""
    detail = f"{dest.host} [{dest.ip}]: {e.result}: {e.detail}"
    plan.failure = sanitize(detail)[:400]
    record_session(plan, dest, local, (e.result, e.detail))
    kind = dest.demand.kind if dest.demand is not None else ""
    log(f"remote: msg {plan.attempt.msgid} to {plan.domain}: {kind} TLS policy not met by "
        f"{sanitize(detail)[:300]}")
