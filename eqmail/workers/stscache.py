"""The MTA-STS policy worker's engine: the HTTPS fetch, the disk cache, the lookup.

Runs in the policy worker (eqmail.workers.policy) as eqmailt: no queue, no keys; it
owns <root>/sts/ (mode 0700) and nothing else it writes.

The fetch (RFC 8461 §3.3): the A/AAAA of ``mta-sts.<domain>`` through the resolvers of
control/dnsservers (eqmail.dns.Resolver), a TCP connection to port 443 of each address
in turn, TLS 1.2+ with SNI and the certificate checked for ``mta-sts.<domain>`` against
the system CA store plus control/tlsca.pem when it exists, one GET, at most
eqmail.delivery.mtasts.MAX_RESPONSE bytes read, FETCH_SECONDS in all.  Redirects are
not followed, only a 200 ``text/plain`` counts.  A failure is an
:class:`~eqmail.delivery.mtasts.StsError` with RFC 8460's result type
(sts-webpki-invalid for the certificate, sts-policy-invalid for the body,
sts-policy-fetch-error for the rest).

The cache (:class:`DiskCache`): one file per domain, ``<root>/sts/<domain>``, named only
after a validated host name (eqmail.delivery.mtasts.valid_domain: no ``/``, no leading
dot), holding the policy's text, the TXT id it was fetched under and when, in the form
of the worker's answer (eqmail.ipc.policy, so reading it back is the same checked
decoding).  Crash argument: a file is written whole to ``.tmp-<domain>`` (fsync'd) and
renamed over the old one — the rename is the commit point, so a crash leaves the old
policy or the new one, never a torn file; leftover ``.tmp-`` files are removed at start.
An unreadable or invalid file counts as no cached policy (and is replaced by the next
fetch).

The lookup (:class:`Policies`, RFC 8461 §5.1): the ``_mta-sts`` TXT record each time
(the remote worker's client caches answers for a minute); a cached, unexpired policy
whose id is the TXT's is used; a new id or an expired policy is fetched; a failed fetch
keeps the cached policy while it has not expired; a TXT record gone (or a DNS failure)
with a cached unexpired policy keeps using it.  A failed fetch is not retried for the
same id for RETRY_SECONDS (so a domain whose policy host hangs costs one timeout a
minute, not one per message).  Lookups of one domain run one at a time; of different
domains, in parallel.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from eqmail.delivery import mtasts
from eqmail.delivery.mtasts import StsError, fetch_error
from eqmail.delivery.tlspolicy import ResultType, StsMode, StsPolicy
from eqmail.dns import DnsFailure, LookupHard, LookupSoft, Resolver
from eqmail.ipc.policy import MAX_DETAIL, LookupAnswer, PolicyText, ProtocolError
from eqmail.log import log

FETCH_SECONDS = 10.0    # one policy fetch in all: DNS, connect, TLS, request, answer
TXT_SECONDS = 3.0       # the TXT lookup (with FETCH_SECONDS: within the remote worker's 15 s wait)
RETRY_SECONDS = 60.0    # a failed fetch for the same TXT id is not retried sooner
HTTPS_PORT = 443
MAX_FILE = 8 * mtasts.MAX_BODY
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"


# ---- the fetch --------------------------------------------------------------------------


def tls_context(tlsca: Path | None) -> ssl.SSLContext:
    """The system's CAs (and control/tlsca.pem's) for the policy host's certificate."""
    ctx = ssl.create_default_context()
    if os.path.exists(SYSTEM_CA):  # Debian's bundle; OpenSSL's default paths may differ
        ctx.load_verify_locations(cafile=SYSTEM_CA)
    if tlsca is not None and tlsca.is_file():
        try:
            ctx.load_verify_locations(cafile=str(tlsca))
        except (ssl.SSLError, OSError) as e:  # eqmailctl check names it; the system's CAs go on
            log(f"warning: policy: control/tlsca.pem not used: {e}")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _read_answer(conn: ssl.SSLSocket, deadline: float) -> bytes | StsError:
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return fetch_error("policy fetch timed out")
        conn.settimeout(left)
        chunk = conn.recv(16384)
        buf += chunk
        got = mtasts.parse_http(bytes(buf), eof=not chunk)
        if isinstance(got, mtasts.HttpAnswer):
            return mtasts.check_answer(got)
        if got is not None:
            return got


def _fetch_from(ip: str, domain: str, ctx: ssl.SSLContext, deadline: float) -> bytes | StsError:
    host = mtasts.policy_host(domain)
    left = deadline - time.monotonic()
    if left <= 0:
        return fetch_error("policy fetch timed out")
    try:
        raw = socket.create_connection((ip, HTTPS_PORT), timeout=left)
    except OSError as e:
        return fetch_error(f"{host} [{ip}]: cannot connect: {e.strerror or e}")
    try:
        with ctx.wrap_socket(raw, server_hostname=host) as conn:
            conn.sendall(mtasts.http_request(domain))
            return _read_answer(conn, deadline)
    except ssl.SSLCertVerificationError as e:
        return StsError(ResultType.STS_WEBPKI_INVALID, f"{host} [{ip}]: {e.verify_message}")
    except TimeoutError:
        return fetch_error(f"{host} [{ip}]: policy fetch timed out")
    except (ssl.SSLError, OSError) as e:
        return fetch_error(f"{host} [{ip}]: {e}")
    finally:
        raw.close()


def fetch(domain: str, resolver: Resolver, tlsca: Path | None,
          seconds: float = FETCH_SECONDS) -> bytes | StsError:
    """The policy body of ``domain`` (RFC 8461 §3.3), or why there is none."""
    deadline = time.monotonic() + seconds
    host = mtasts.policy_host(domain)
    try:
        addresses = [a.ip for a in resolver.host_addresses(host)]
    except DnsFailure as e:
        return fetch_error(f"{host}: address lookup failed: {e.problem.text.strip()}")
    if not addresses:
        return fetch_error(f"{host}: no address")
    ctx = tls_context(tlsca)
    result: bytes | StsError = fetch_error(f"{host}: no address")
    for ip in addresses[:4]:
        result = _fetch_from(ip, domain, ctx, deadline)
        # only a connection that failed is worth another address
        if not (isinstance(result, StsError) and "cannot connect" in result.detail):
            return result
    return result


# ---- the disk cache ---------------------------------------------------------------------


class DiskCache:
    """<root>/sts/: one file per domain (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def clean(self) -> None:
        for name in os.listdir(self.dir):
            if name.startswith(".tmp-"):
                try:
                    os.unlink(self.dir / name)
                except OSError:
                    pass

    def _path(self, domain: str) -> Path:
        if mtasts.normal_domain(domain) != domain:
            raise ValueError(f"not a valid domain: {domain!r}")  # callers validate first
        return self.dir / domain

    def load(self, domain: str) -> PolicyText | None:
        try:
            fd = os.open(self._path(domain), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_FILE + 1)
        try:
            return LookupAnswer.decode(data).policy if len(data) <= MAX_FILE else None
        except ProtocolError:
            return None

    def save(self, domain: str, policy: PolicyText) -> None:
        path = self._path(domain)
        tmp = self.dir / f".tmp-{domain}"
        data = LookupAnswer(policy).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def remove(self, domain: str) -> None:
        try:
            os.unlink(self._path(domain))
        except FileNotFoundError:
            pass


# ---- the lookup -------------------------------------------------------------------------


def _parsed(p: PolicyText) -> StsPolicy | None:
    got = mtasts.parse_policy(p.text.encode("utf-8", "surrogateescape"), p.id, p.fetched)
    return None if isinstance(got, StsError) else got


def _answer(p: PolicyText, detail: str = "") -> LookupAnswer:
    parsed = _parsed(p)
    if parsed is None or parsed.mode is StsMode.NONE:
        return LookupAnswer(None, None, detail[:MAX_DETAIL])
    return LookupAnswer(p, None, detail[:MAX_DETAIL])


Fetcher = Callable[[str], "bytes | StsError"]


class Policies:
    """RFC 8461 §5.1's policy discovery over the cache (see the module docstring)."""

    def __init__(self, cache: DiskCache, resolver: Callable[[], Resolver], fetcher: Fetcher,
                 clock: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.resolver = resolver  # a new one per lookup: a Resolver keeps one deadline
        self.fetcher = fetcher
        self.clock = clock
        self.memory: dict[str, PolicyText | None] = {}   # the disk's files, once read
        self.failed: dict[str, tuple[str, float, StsError]] = {}  # domain: (id, until, why)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, domain: str) -> threading.Lock:
        with self._guard:
            if len(self._locks) > 4096:  # forget idle ones; a held one stays referenced
                self._locks = {d: lk for d, lk in self._locks.items() if lk.locked()}
            return self._locks.setdefault(domain, threading.Lock())

    def lookup(self, domain: str) -> LookupAnswer:
        d = mtasts.normal_domain(domain)
        if d is None:
            return LookupAnswer(None)
        with self._lock(d):
            return self._lookup(d)

    def _cached(self, domain: str) -> PolicyText | None:
        if domain not in self.memory:
            if len(self.memory) > 65536:
                self.memory.clear()  # re-read from disk as needed
            self.memory[domain] = self.cache.load(domain)
        return self.memory[domain]

    def _lookup(self, domain: str) -> LookupAnswer:
        now = self.clock()
        cached = self._cached(domain)
        parsed = None if cached is None else _parsed(cached)
        usable = cached if parsed is not None and not parsed.expired(now) else None
        try:
            policy_id = mtasts.txt_id(self.resolver().txt(mtasts.txt_name(domain)))
        except LookupHard:
            policy_id = None
        except LookupSoft as e:
            if usable is not None:
                return _answer(usable, f"TXT lookup failed ({e}); cached policy used")
            return LookupAnswer(None, None, f"TXT lookup failed: {e}"[:MAX_DETAIL])
        if policy_id is None:
            if usable is not None:
                return _answer(usable, "no TXT record; cached policy used until it expires")
            if cached is not None:
                self._forget(domain)
            return LookupAnswer(None)
        if usable is not None and usable.id == policy_id:
            return _answer(usable)
        failure = self._refresh(domain, policy_id, now)
        if isinstance(failure, PolicyText):
            return _answer(failure)
        if usable is not None:  # RFC 8461 §5.1: a failed refresh keeps the cached policy
            return _answer(usable, f"refresh failed: {failure.detail}")
        return LookupAnswer(None, failure.result.value, failure.detail[:MAX_DETAIL])

    def _refresh(self, domain: str, policy_id: str, now: float) -> PolicyText | StsError:
        failed = self.failed.get(domain)
        if failed is not None and failed[0] == policy_id and failed[1] > time.monotonic():
            return failed[2]
        body = self.fetcher(domain)
        got: StsPolicy | StsError = (body if isinstance(body, StsError)
                                     else mtasts.parse_policy(body, policy_id, now))
        if isinstance(got, StsError):
            log(f"policy: {domain}: no MTA-STS policy for id {policy_id}: "
                f"{got.result.value}: {got.detail}")
            if len(self.failed) > 4096:
                self.failed.clear()  # only a time saver: forgetting costs a fetch
            self.failed[domain] = (policy_id, time.monotonic() + RETRY_SECONDS, got)
            return got
        self.failed.pop(domain, None)
        text = PolicyText(policy_id, now, got.text)
        try:
            self.cache.save(domain, text)
        except OSError as e:  # still used from memory; the next start fetches it again
            log(f"warning: policy: cannot write the cache file of {domain}: {e}")
        self.memory[domain] = text
        log(f"policy: {domain}: MTA-STS policy id {policy_id} fetched: mode {got.mode.value}, "
            f"max_age {got.max_age}, mx {' '.join(got.mx) or '-'}")
        return text

    def _forget(self, domain: str) -> None:
        self.memory[domain] = None
        try:
            self.cache.remove(domain)
        except OSError as e:
            log(f"warning: policy: cannot remove the cache file of {domain}: {e}")
