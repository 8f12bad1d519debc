"""qmail-remote as a library: deliver one message to the recipients of one domain.

What it owns: the remote SMTP conversation of a delivery -- the before-remote hooks
(control/beforemote, run in the sandbox worker by the chain runner the caller hands in), the
choice of addresses (smtproutes, else MX with qmail's "am I an MX" rule, CNAME and
route preferences), connecting with qmail-tcpto's memory of dead hosts, the TLS policy
(tlshosts/, notlshosts/, the clear-text retry after a failed handshake), the SMTP
transaction (eqmail.smtp.client) and reusing an idle connection for the next message
to the same destination -- and the outcome qmail-rspawn would build from
qmail-remote's results for each recipient.

Privilege: runs in the remote delivery worker (eqmailr), in its pool threads; reads
queue/mess through the descriptor the caller opened, writes queue/lock/tcpto.

Outbound TLS policy (issue 17): before connecting, each MX host of the domain gets the
demand of the policy its domain publishes (eqmail.delivery.tlsplan: a tlshosts/ pin,
else DANE when control/dnssec trusts the resolver and the MX and TLSA answers are
authenticated, else the MTA-STS policy the policy worker fetched; notlshosts/ and an
exhaustive tlshosts/ are the admin's word over all of them); the SMTP client enforces it
(eqmail.smtp.client.TlsDemand: mandatory TLS, the certificate checked, a failure moves
to the next host, never the clear-text retry); when no host meets the policy the
delivery is deferred with the last host's problem.  Every session's TLS result goes to
eqmail.delivery.tlsrpt.  REQUIRETLS messages (RFC 8689) go only to a validated host
that offers REQUIRETLS, else bounce with 5.7.10; ``TLS-Required: No`` lets a message
through a policy failure.

Inputs: a :class:`RemoteJob` (controls, our addresses, tcpto, the connection cache, TLS
configuration, the DKIM signer, the MTA-STS source), the open message file, the envelope and the message's
origin.  DKIM: each body a transaction sends (the stored message, or what the
before-remote hooks made of it) is signed once, after the hooks, by :func:`_dkim_signed`
(eqmail.dkim.signer decides whether); a key that cannot be loaded defers.  Outputs: one
:class:`~eqmail.ipc.delivery.Outcome` per recipient.  Failures: every delivery problem
is an outcome (deferral or failure, qmail-remote's texts); any other exception is a bug
and propagates to the worker, whose boundary turns it into a deferral.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from eqmail import srs
from eqmail.control import Controls
from eqmail.delivery import bfrmt, tlsplan
from eqmail.delivery.nexthop import connect
from eqmail.delivery.tlsplan import Attempt, Plan, PolicyEnv
from eqmail.delivery.tlspolicy import (
    PERM_REQUIRETLS_NOPOLICY,
    StsSource,
    perm_requiretls_unoffered,
)
from eqmail.dkim.sign import MessageError
from eqmail.dkim.signer import HEADER_MAX, KeyFileError, OutboundSigner
from eqmail.dns import (
    PREF_CNAME,
    PREF_ROUTE,
    DnsFailure,
    Resolver,
    candidates,
    literal_ip,
)
from eqmail.instance import Instance
from eqmail.ipc.delivery import Outcome, Site, Verdict
from eqmail.ipc.queue import Origin
from eqmail.log import log, sanitize
from eqmail.queue import tcpto
from eqmail.queue.layout import QueuePaths
from eqmail.smtp.client import (
    Destination,
    PolicyFailure,
    Quit,
    RetryClear,
    SmtpSession,
    TryNext,
    dropped,
    quote_address,
    rspawn_outcome,
)
from eqmail.smtp.transport import Dropped, TlsConfig, Transport, counts_for_tcpto

IDLE_SECONDS = 5.0  # how long an idle connection is kept for reuse
TEMP_NOCONN = Outcome(Verdict.DEFERRAL,
                      "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n",
                      Site.UNREACHABLE)  # the scanner's per-destination back-off
TEMP_READ = Outcome(Verdict.DEFERRAL, "Unable to read message. (#4.3.0)\n")
TEMP_CONTROL = Outcome(Verdict.DEFERRAL, "Unable to read control files. (#4.3.0)\n")
PERM_PARTIAL = Outcome(Verdict.FAILURE,
                       "SMTP cannot transfer messages with partial final lines. (#5.6.2)\n")
# The key's file is named in the log, not in a text that may end up in a bounce.
TEMP_DKIM_KEY = Outcome(Verdict.DEFERRAL,
                        "Unable to load a DKIM signing key; will try again. (#4.3.0)\n")


class ConnectionCache:
    """Idle SMTP sessions by destination (address, port, host name, credentials)."""

    def __init__(self, limit: int) -> None:
        self.lock = threading.Lock()
        self.idle: list[tuple[float, SmtpSession]] = []
        self.limit = limit

    def take(self, dest: Destination) -> SmtpSession | None:
        while True:
            with self.lock:
                found = [i for i, (_, s) in enumerate(self.idle) if s.dest == dest]
                if not found:
                    return None
                _, session = self.idle.pop(found[-1])
            if session.rset():
                return session
            session.close(send_quit=False)

    def put(self, session: SmtpSession) -> None:
        with self.lock:
            self.idle.append((time.monotonic(), session))
            old = self.idle[: max(0, len(self.idle) - self.limit)]
            del self.idle[: len(old)]
        for _, s in old:
            s.close()

    def expire(self) -> None:
        limit = time.monotonic() - IDLE_SECONDS
        with self.lock:
            old = [s for when, s in self.idle if when < limit]
            self.idle = [(w, s) for w, s in self.idle if w >= limit]
        for s in old:
            s.close()

    def close_all(self) -> None:
        with self.lock:
            old, self.idle = self.idle, []
        for _, s in old:
            s.close()


_local = threading.local()


def _resolver(c: Controls) -> Resolver:
    """One resolver per thread (its deadline is per resolution)."""
    lifetime = float(min(c.timeoutconnect, 30))
    key = (c.dnsservers, lifetime, bool(c.dnssec))
    if getattr(_local, "key", None) != key:
        # answers kept for their TTL (eqmail.dns's shared cache, failures never kept):
        # a busy destination asks the same MX/A/AAAA/TLSA questions for every message,
        # which was half the remote worker's CPU (bench/tlspolicy.sh)
        _local.resolver = Resolver(c.dnsservers, lifetime, dnssec=bool(c.dnssec), cache=True)
        _local.key = key
    return _local.resolver  # type: ignore[no-any-return]


@dataclass
class RemoteJob:
    """What one delivery needs besides the message."""

    controls: Controls
    me: frozenset[str]
    tcpto: tcpto.Tcpto
    cache: ConnectionCache
    tls: TlsConfig
    run_hooks: bfrmt.RunChain  # eqmail.spp.bfrmtclient.run_chain in the worker
    signer: OutboundSigner | None = None  # DKIM (issue 16); None: nothing is signed
    sts: StsSource | None = None  # MTA-STS policies (issue 17); None: not looked up
    root: Path | None = None  # where TLS-RPT records go (issue 17); None: not recorded


def deliver_batch(job: RemoteJob, instance: Instance, msgid: int, sender: str,
                  recipients: list[str], origin: Origin | None = None,
                  requiretls: bool = False) -> list[Outcome]:
    """qmail-rspawn's outcome for each recipient (all of one message, sender, domain),
    its text cut to what a report carries.  ``origin``: the message's, from the queue
    (the request's ``origin`` option), which decides whether it is signed; forwarded
    mail gets an SRS sender here.  ``requiretls``: the message may only go over
    validated TLS to a server offering REQUIRETLS (RFC 8689)."""
    sender = envelope_sender(job.controls, sender, origin)
    attempt = Attempt(msgid, requiretls)
    return [o.cut() for o in _outcomes(job, instance, attempt, sender, recipients, origin)]


def envelope_sender(c: Controls, sender: str, origin: Origin | None,
                    now: float | None = None) -> str:
    """The MAIL FROM of a remote delivery (issue 16, SRS): for a message eqmail
    forwarded (origin FORWARD: a .qmail ``&address``, an alias, a forward-only
    virtual domain) the SRS0 address at the SRS domain (SRS1 when the sender is an
    SRS address already), so that the receiver's SPF check sees our domain and its
    bounce comes back to us to be reversed.  Unchanged: SRS off or without a secret
    (qmail's behaviour, byte for byte), another origin, the null sender and qmail's
    ``#@[]``, a sender without a domain, a sender at one of our own domains
    (:func:`own_domain`), whose SPF record is ours to make cover us, and one at a
    domain of control/srsexclude (postsrsd's SRS_EXCLUDE_DOMAINS)."""
    keys = c.srs_keys
    if keys is None or origin is not Origin.FORWARD:
        return sender
    user, at, domain = sender.rpartition("@")
    if (not at or not user or not domain or sender == "#@[]" or own_domain(c, domain)
            or excluded(c.srsexclude, domain)):
        return sender
    return srs.forward(sender, keys, now)


def excluded(patterns: tuple[str, ...], domain: str) -> bool:
    """control/srsexclude: ``domain`` itself, or ``.domain`` for every subdomain of it
    (postsrsd's leading-dot form)."""
    d = domain.lower()
    return any(d == p or (p.startswith(".") and d.endswith(p)) for p in patterns)


def own_domain(c: Controls, domain: str) -> bool:
    """A domain this instance hosts: me, the SRS domain, locals, or a virtualdomains
    domain (``domain`` or ``.suffix`` entries with a prepend; not the empty catch-all
    key, nor address entries).  Not rcpthosts: a domain we only relay for (a backup MX)
    has an SPF record that need not name us."""
    d = domain.lower()
    keys = c.srs_keys
    if d == c.me.lower() or d in c.locals or (keys is not None and d == keys.domain.lower()):
        return True
    for key, prepend in c.virtualdomains:
        if not prepend or not key or "@" in key:
            continue
        if d == key or (key.startswith(".") and d.endswith(key)):
            return True
    return False


def _outcomes(job: RemoteJob, instance: Instance, attempt: Attempt, sender: str,
              recipients: list[str], origin: Origin | None = None) -> list[Outcome]:
    msgid = attempt.msgid
    root = instance.root
    try:
        fd = os.open(QueuePaths(instance.queue).mess(msgid), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return [TEMP_READ] * len(recipients)
    with os.fdopen(fd, "rb") as message:
        size = os.fstat(fd).st_size
        domain = recipients[0].rpartition("@")[2]
        outcomes: dict[int, Outcome] = {}
        for idxs, body in _bodies(job, root, domain, sender, recipients, message, size):
            sent: BinaryIO | Outcome = body
            try:
                if not isinstance(body, Outcome):
                    sent = _dkim_signed(job, msgid, body, origin)
                got = [sent] * len(idxs) if isinstance(sent, Outcome) else _send(
                    job, attempt, domain, sender, [recipients[i] for i in idxs], sent)
            finally:
                for f in {id(x): x for x in (body, sent)}.values():
                    if not isinstance(f, Outcome) and f is not message:
                        f.close()
            outcomes.update(zip(idxs, got, strict=True))
    return [outcomes[i] for i in range(len(recipients))]  # _bodies places every one


def _bodies(job: RemoteJob, root: Path, domain: str, sender: str, recipients: list[str],
            message: BinaryIO, size: int) -> list[tuple[list[int], BinaryIO | Outcome]]:
    """The message each recipient gets: the stored one, or what the before-remote hooks
    made of it — recipients whose hook output is identical share one transaction — or
    the hooks' failure or deferral."""
    commands = job.controls.beforemote
    if not commands:
        return [(list(range(len(recipients))), message)]
    groups: dict[bytes, tuple[list[int], BinaryIO]] = {}
    out: list[tuple[list[int], BinaryIO | Outcome]] = []
    for i, rcpt in enumerate(recipients):
        res = job.run_hooks(commands, domain, sender, rcpt, message, size, root,
                            job.controls.timeoutremote)
        if isinstance(res, Outcome):
            out.append(([i], res))
            continue
        digest = _digest(res)
        if digest in groups:
            groups[digest][0].append(i)
            res.close()
        else:
            groups[digest] = ([i], res)
    return out + [(idxs, body) for idxs, body in groups.values()]


def _dkim_signed(job: RemoteJob, msgid: int, body: BinaryIO,
                 origin: Origin | None) -> BinaryIO | Outcome:
    """``body`` with its DKIM signatures in front (a new file), ``body`` itself when it
    is not signed, or the outcome that stops it: a deferral when a key cannot be loaded
    (the log names the file), a failure when the message cannot be signed.  Called once
    per transaction body, so recipients sharing a transaction share its signatures."""
    if job.signer is None or origin is None or not Origin(origin).signed:
        return body
    try:
        body.seek(0)
        domain = job.signer.domain_for(body.read(HEADER_MAX), origin)
        if domain is None:
            return body  # no key for its From: domain: read no further
        body.seek(0)
        data = body.read()
        fields = job.signer.signatures(data, origin, job.controls.dkimsign, domain)
    except KeyFileError as e:
        log(f"warning: DKIM key {e.path}: {e.why}: delivery of msg {msgid} deferred")
        return TEMP_DKIM_KEY
    except MessageError as e:
        log(f"warning: msg {msgid} cannot be DKIM-signed: {sanitize(str(e))[:200]}")
        return Outcome(Verdict.FAILURE, "This message cannot be DKIM-signed: its header "
                       "section is malformed. (#5.6.0)\n")
    finally:
        body.seek(0)
    if not fields:
        return body
    # The whole message is in memory already (dkimpy signs bytes), so the signed copy
    # is too: a temporary file's create, write and close cost more than the signing.
    return io.BytesIO(fields + data)


def _digest(f: BinaryIO) -> bytes:
    h = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(1 << 16):
        h.update(chunk)
    f.seek(0)
    return h.digest()


def _partial_final_line(body: BinaryIO) -> bool:
    end = body.seek(0, os.SEEK_END)
    if end == 0:
        return False
    body.seek(end - 1)
    last = body.read(1)
    body.seek(0)
    return last != b"\n"


def _send(job: RemoteJob, attempt: Attempt, domain: str, sender: str,
          recipients: list[str], body: BinaryIO) -> list[Outcome]:
    """Resolve, connect and run one transaction: outcomes for these recipients."""
    c = job.controls
    n = len(recipients)
    if _partial_final_line(body):
        return [PERM_PARTIAL] * n  # found before any DNS or SMTP, unlike qmail-remote
    if not c.helohost:
        return [TEMP_CONTROL] * n
    route = c.route_for(domain)
    if route is not None and not route.relay:
        route = None  # qmail: an empty relay means "look up MX as usual"
    resolver = _resolver(c)
    try:
        if route is not None:
            addrs = candidates(resolver.host_addresses(route.relay), job.me, PREF_ROUTE)
            rcpt_domain = domain
        else:
            rcpt_domain = resolver.canonical(domain)
            aliased = rcpt_domain.lower() != domain.lower()
            addrs = candidates(resolver.mx_addresses(domain), job.me,
                               PREF_CNAME if aliased else None)
    except DnsFailure as e:
        verdict = Verdict.FAILURE if e.problem.permanent else Verdict.DEFERRAL
        site = Site.UNKNOWN if e.problem.permanent else Site.UNREACHABLE  # back-off
        return [Outcome(verdict, e.problem.text, site)] * n
    rcpts = [quote_address(r.rpartition("@")[0] + "@" + rcpt_domain) for r in recipients]
    port = route.port if route is not None else 25
    user = route.user if route is not None else None
    password = route.password if route is not None else None
    ip_relay = relay_tls_name(route.relay) if route is not None else ""
    plan = Plan(PolicyEnv(c, job.tls, job.sts, job.root), domain, attempt)
    if route is None:
        addrs = tlsplan.apply(plan, resolver, addrs, body)
    dests = [Destination(a.ip, port, ip_relay or a.host, user, password, port == 465,
                         plan.demands.get(a.host)) for a in addrs]
    if attempt.requiretls:
        dests = [d for d in dests if tlsplan.validated(job.tls, d)]
        if not dests:
            return [PERM_REQUIRETLS_NOPOLICY] * n
    if not dests:
        return [plan.deferral()] * n
    rcpt_outcomes, message = _deliver(job, plan, dests, quote_address(sender) if sender else "",
                                      rcpts, body)
    if rcpt_outcomes is None:
        return [rspawn_outcome(None, message)] * n
    return [rspawn_outcome(r, message) for r in rcpt_outcomes]


def relay_tls_name(relay: str) -> str:
    """The name a relay given as an IP address goes by for TLS (tlshosts/<name>.pem,
    notlshosts/<name>, the certificate check): the address as written in smtproutes,
    without brackets or an ``IPv6:`` prefix, lower case — ``[127.0.0.1]`` and
    ``127.0.0.1`` -> ``127.0.0.1``, ``[IPv6:2001:DB8::1]`` -> ``2001:db8::1``.  "" for
    a relay given by name (its addresses carry that name already)."""
    if literal_ip(relay) is None:
        return ""
    text = relay[1:-1] if relay.startswith("[") and relay.endswith("]") else relay
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    return text.lower()


def _deliver(job: RemoteJob, plan: Plan, dests: list[Destination], sender: str,
             rcpts: list[str], body: BinaryIO) -> tuple[list[Outcome] | None, Outcome]:
    """qmail-remote's connection loop: the first address that answers (and meets its
    domain's TLS policy) gets the message."""
    unoffered: Outcome | None = None
    for dest in dests:
        if job.tcpto.blocked(dest.ip):
            continue
        session = job.cache.take(dest)
        if session is None:
            try:
                session = _open(job, plan, dest)
            except Quit as q:
                return None, q.outcome
            if session is None:
                continue
        if plan.attempt.requiretls and "REQUIRETLS" not in session.keywords:
            unoffered = perm_requiretls_unoffered(dest.ip)  # RFC 8689 §4.2.1: try the next
            job.cache.put(session)
            continue
        body.seek(0)
        try:
            rcpt_outcomes, message = session.transaction(sender, rcpts, body,
                                                         plan.attempt.requiretls)
        except BaseException:  # e.g. the message became unreadable: never leak the socket
            session.close(send_quit=False)
            raise
        if message.verdict is Verdict.SUCCESS and dest.demand is not None:
            tlsplan.log_delivery(plan, dest, session)
        if session.usable:
            job.cache.put(session)
        else:
            session.close(send_quit=False)
        return rcpt_outcomes, message
    if unoffered is not None:
        return None, unoffered
    if plan.failure:
        return None, plan.deferral()
    return None, TEMP_NOCONN


def _open(job: RemoteJob, plan: Plan, dest: Destination) -> SmtpSession | None:
    """Connect and greet; None = try the next address; Quit = a terminal outcome."""
    c = job.controls
    for allow_tls in (True, False):
        try:
            sock = connect(dest.ip, dest.port, c.timeoutconnect)
        except OSError as e:
            if counts_for_tcpto(e):
                job.tcpto.record(dest.ip, failed=True)
            return None
        job.tcpto.record(dest.ip, failed=False)
        local = _local_ip(sock)
        session = SmtpSession(Transport(sock, c.timeoutremote), dest, c.helohost, job.tls,
                              dane=tlsplan.dane_check)
        try:
            session.open(allow_tls)
            tlsplan.record_session(plan, dest, local, session.tls_result)
            return session
        except TryNext:
            return None
        except PolicyFailure as e:
            tlsplan.policy_failure(plan, dest, local, e)
            return None
        except RetryClear as e:
            tlsplan.record_session(plan, dest, local, session.tls_result)
            log(f"remote: TLS handshake with {dest.ip} failed ({sanitize(str(e))[:200]}); "
                "retrying in clear text")
            continue
        except Quit:
            session.close(send_quit=False)
            raise
        except Dropped:
            session.close(send_quit=False)
            raise Quit(dropped(dest.ip, False)) from None
    return None


def _local_ip(sock: socket.socket) -> str:
    try:
        return str(sock.getsockname()[0])
    except OSError:
        return ""
