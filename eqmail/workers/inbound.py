"""Inbound verification in the listener (issue 16): SPF, DKIM, DMARC, ARC at end of DATA.

Owns, for a listener whose configuration has control/authcheck 1: what happens to the
DATA of a client that is neither a relay client nor authenticated —

- on its way to the queue writer the header section passes through
  eqmail.auth's ForgedResultsFilter, which removes Authentication-Results fields that
  claim our authserv-id (RFC 8601 §5); every other byte goes on unchanged;
- the message as received (without our Received line, with any forged field: a DKIM
  signature may cover it) is kept for the checks: the first MEMORY_MAX bytes in
  memory, the rest in an unlinked temporary file, up to the session's databytes (or
  UNLIMITED_CAP when databytes is 0).  So a session holds at most about 3 MiB of it
  whatever the message's size (this copy, the held-back bytes below, one header line),
  and spooled messages are checked one at a time per listener process (a 50 MB DKIM
  body hash needs the message in memory once);
- at the end, the checks run on the event loop itself when every DNS answer they need
  is in the configuration's cache and the message is at most ON_LOOP_MAX bytes
  (eqmail.auth.authenticate_cached: no waiting, about 0.4 ms of CPU for a signed 5 KB
  message, measured alone; two to three times that in a listener sharing two busy cores,
  see bench/RESULTS.md); otherwise eqmail.auth.authenticate runs in a thread of the
  listener's pool, the event loop and every other session going on meanwhile, bounded
  by control/authtimeout (the library's own deadline, plus GRACE for the thread to
  come back; past that the message gets temperror results, never a refusal).  Why
  not always the thread: the checks are Python CPU work, and a thread holding the GIL
  makes the event loop wait for it after each of its system calls (up to the 5 ms
  switch interval), so every session of the process slowed down (bench/auth.sh
  measured acceptance at 0.5x of the unchecked rate that way);
- the verdict: the Authentication-Results field (and, under control/dmarcreject, an
  ``X-Eqmail-DMARC: quarantine`` mark) at the top of the message, or, for a DMARC
  disposition of reject with dmarcreject ``reject``, the text of the 550 and nothing
  queued.  A message that fits in MEMORY_MAX is held back (the session's Received line
  included) and written to the queue writer only then, behind its field; a larger one
  is streamed as it arrives and its field goes as a QueuePrepend, which the writer puts
  after its own Received line by moving the message to a new file (eqmail.queue.writer).
  Holding back spares the writer that move for nearly all mail (bench/auth.sh measured
  0.4 ms of writer CPU per message for it) and costs no memory the copy for the checks
  does not already take.

Runs as eqmaild inside the listener; its only I/O is the DNS lookups of eqmail.auth
(control/dnsservers) and the temporary file.  Failure modes: none raised to the
session — an exception in the checks is logged and gives temperror results; a
temporary file that cannot be written stops keeping the message (checked as "too
large"), the message itself is unaffected.

A header line longer than HEADER_LINE_MAX (no real mail has one; RFC 5322 allows 998
bytes) ends the filtering: the rest of the message goes on unfiltered.  A field that
claims our id after such a line stays below ours, which RFC 8601 §5 tells readers to
prefer (the topmost field of a trusted id).
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eqmail.control import Controls, DmarcAction
from eqmail.ipc import ProtocolError
from eqmail.ipc.queue import QueuePrepend
from eqmail.log import log, sanitize
from eqmail.smtp import replies

if TYPE_CHECKING:
    from eqmail.auth import AuthReport
    from eqmail.auth import Inbound as InboundT

MEMORY_MAX = 1 << 20          # bytes of a message kept in memory; more goes to a temp file
HEADER_LINE_MAX = 1 << 20     # a longer header line ends the forged-field filter
UNLIMITED_CAP = 64 << 20      # bytes kept when databytes is 0 (unlimited)
GRACE = 2.0                   # seconds the listener waits past the library's own deadline
AUTH_THREADS = 4              # checks running at once per listener process
DNS_CACHE_ENTRIES = 10_000    # answers kept per configuration (dnspython's LRU)
ON_LOOP_MAX = 128 << 10       # bytes of a message that may be checked on the event loop
                              # (the loop then stalls for at most a few ms: five body
                              # hashes of this size, eqmail.dkim.verify.MAX_SIGNATURES)
_DOMAIN_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_]")
MARK = b"X-Eqmail-DMARC"


@dataclass(frozen=True)
class Verdict:
    """What the listener does with a checked message."""

    fields: bytes             # header fields for the top of the message (QueuePrepend)
    refuse: str | None        # the 550's text: nothing is queued
    summary: str              # for the log line


class InboundChecker:
    """One configuration's inbound verification (built when control/authcheck is 1;
    kept by the ListenerConfig it belongs to, so a reload's new DNS servers, id,
    timeout and DMARC action apply to the sessions accepted after it)."""

    def __init__(self, c: Controls, pool: ThreadPoolExecutor, big: asyncio.Semaphore) -> None:
        self.authservid = c.authservid
        self.timeout = float(c.authtimeout)
        self.action = c.dmarcreject
        # eqmail.auth is imported here and in the methods below, not with the module: a
        # listener without control/authcheck does not carry the checks' libraries
        # (about 17 MB and 0.1 s per listener process).
        from eqmail.auth import make_lookups
        # a site's caching resolver, in process (as every Postfix + OpenDKIM/OpenDMARC
        # site runs one): mail from one domain asks the same three or four names again
        # and again; one cache per configuration, i.e. per control/dnsservers
        self.lookups = make_lookups(c.dnsservers, cache=DNS_CACHE_ENTRIES)
        self.pool = pool  # the listener's, shared by every configuration
        self.big = big    # likewise: one spooled (large) message checked at a time

    def begin(self, client_ip: str, helo: str | None, mail_from: str,
              databytes: int, prefix: bytes = b"") -> InboundMessage:
        """``prefix``: the session's Received line (and plugin fields), which goes to
        the queue before the message but is not part of what is checked."""
        cap = databytes if databytes > 0 else UNLIMITED_CAP
        return InboundMessage(self, client_ip, helo or "", mail_from, cap, prefix)

    def check(self, inbound: InboundT, began: float) -> AuthReport:
        """In a pool thread: the library's checks, with what is left of this message's
        time (it began at ``began``, before it waited for a thread)."""
        left = self.timeout - (time.monotonic() - began)
        from eqmail.auth import AuthPolicy, authenticate
        return authenticate(inbound, self.lookups, AuthPolicy(self.authservid, max(0.0, left)))

    def check_cached(self, inbound: InboundT) -> AuthReport | None:
        """On the event loop: the checks when all their answers are cached, else None."""
        from eqmail.auth import AuthPolicy, authenticate_cached
        return authenticate_cached(inbound, self.lookups,
                                   AuthPolicy(self.authservid, self.timeout))

    def fallback(self, why: str) -> bytes:
        """The field when the checks did not come back: every result temporary."""
        return (f"Authentication-Results: {self.authservid};\n"
                f"\tspf=temperror ({why});\n\tdkim=temperror;\n\tdmarc=temperror\n").encode()

    def decide(self, report: AuthReport) -> Verdict:
        """The DMARC action of control/dmarcreject (DmarcAction's docstring)."""
        domain = _DOMAIN_UNSAFE.sub("?", report.from_domain or "")[:253]
        summary = " ".join(report.header.decode("utf-8", "replace").split())
        from eqmail.auth import DmarcDisposition as disposition
        if report.disposition is disposition.REJECT and self.action is DmarcAction.REJECT:
            return Verdict(b"", replies.dmarc_rejected(domain), summary)
        fields = report.header
        if (report.disposition in (disposition.REJECT, disposition.QUARANTINE)
                and self.action is not DmarcAction.HEADER):
            policy = "reject" if report.disposition is disposition.REJECT else "quarantine"
            mark = f"{MARK.decode()}: quarantine (policy={policy}; header.from={domain})\n"
            fields += mark.encode()
        try:
            QueuePrepend(fields).encode()  # the writer's rules: refused there, a 451 here
        except ProtocolError as e:
            log(f"warning: inbound check gave a field the queue refuses ({e}): temperror")
            fields = self.fallback("result not writable")
        return Verdict(fields, None, summary)


class InboundMessage:
    """One message's filter and copy, then its checks (see the module docstring)."""

    def __init__(self, checker: InboundChecker, client_ip: str, helo: str, mail_from: str,
                 cap: int, prefix: bytes = b"") -> None:
        self.checker = checker
        self.client_ip = client_ip
        self.helo = helo
        self.mail_from = mail_from
        self.cap = cap
        from eqmail.auth import ForgedResultsFilter
        self.filter = ForgedResultsFilter(checker.authservid)
        self.in_header = True
        self.partial = b""            # the header line being received
        self.kept = tempfile.SpooledTemporaryFile(max_size=MEMORY_MAX)
        self.size = 0
        self.too_big = False          # more than cap (or the temp file failed)
        self.why = ""                 # why it was not kept
        self.reading = False          # a pool thread has taken the copy over
        # Held back: while the message fits in memory nothing goes to the queue writer
        # yet (prefix and filtered bytes wait here), so at the end the field is simply
        # written first and the writer has nothing to move.  A message that outgrows
        # MEMORY_MAX is streamed from then on and its field goes as a QueuePrepend.
        self.holding = True
        self.held: list[bytes] = [prefix]

    # -- during DATA (event loop) ------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        """Stored message bytes in; the bytes for the queue writer now out (none while
        the message is held back)."""
        self._keep(data)
        out = self._filter(data) if self.in_header else data
        if not self.holding:
            return out
        self.held.append(out)
        if self.size <= MEMORY_MAX and not self.too_big:
            return b""
        self.holding = False  # too big to hold: stream what we have and the rest
        out, self.held = b"".join(self.held), []
        return out

    def end(self) -> bytes:
        """End of DATA: the bytes for the queue writer now (what the filter still
        holds, when the message ends in its header section, unless held back)."""
        tail = b""
        if self.in_header:
            self.in_header = False
            tail = self.filter.feed(self.partial) if self.partial else b""
            self.partial = b""
            tail += self.filter.finish()
        if self.holding:
            self.held.append(tail)
            return b""
        return tail

    def commit(self, verdict: Verdict) -> tuple[bytes, bytes | None]:
        """After :meth:`finish`: (bytes for the queue writer now, fields for a
        QueuePrepend or None).  A held-back message is written whole behind its field;
        a streamed one needs the writer to put the field in front."""
        if self.holding:
            data, self.held = verdict.fields + b"".join(self.held), []
            return data, None
        return b"", verdict.fields

    def _keep(self, data: bytes) -> None:
        if self.too_big:
            return
        if self.size + len(data) > self.cap:
            self._drop_copy(f"over {self.cap} bytes")
            return
        try:
            self.kept.write(data)
        except OSError as e:  # the temporary file's disk is full: check what we can't keep as too big
            log(f"warning: inbound check: cannot keep the message: {e}")
            self._drop_copy("could not be kept")
            return
        self.size += len(data)

    def _drop_copy(self, why: str) -> None:
        self.too_big, self.why = True, why
        self.kept.close()

    def _filter(self, data: bytes) -> bytes:
        buf = self.partial + data if self.partial else data
        out: list[bytes] = []
        start = 0
        while True:
            lf = buf.find(b"\n", start)
            if lf < 0:
                break
            line = buf[start:lf + 1]
            start = lf + 1
            out.append(self.filter.feed(line))
            if line == b"\n":  # the header section ended: the rest passes as it is
                self.in_header = False
                out.append(buf[start:])
                self.partial = b""
                return b"".join(out)
        self.partial = buf[start:]
        if len(self.partial) > HEADER_LINE_MAX:
            out += [self.filter.finish(), self.partial]
            self.partial = b""
            self.in_header = False
        return b"".join(out)

    # -- at the end of DATA ------------------------------------------------------------
    async def finish(self) -> Verdict:
        """The checks (in a thread, bounded) and what they mean for this message."""
        checker = self.checker
        if self.too_big:
            self.close()
            why = f"message {self.why}: not checked"
            return Verdict(f"Authentication-Results: {checker.authservid}; none ({why})\n".encode(),
                           None, why)
        spooled = self.size > MEMORY_MAX  # on disk: checked one at a time
        if self.size <= ON_LOOP_MAX and not spooled:
            report = self._check_cached()
            if report is not None:
                self.close()
                return checker.decide(report)
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        try:
            async with asyncio.timeout(checker.timeout + GRACE):
                if spooled:
                    async with checker.big:
                        report = await loop.run_in_executor(checker.pool, self._check, began)
                else:
                    report = await loop.run_in_executor(checker.pool, self._check, began)
        except TimeoutError:
            log(f"warning: inbound check from {self.client_ip} took over "
                f"{checker.timeout + GRACE:g} s: temperror")
            return Verdict(checker.fallback("checks timed out"), None, "timed out")
        except Exception as e:  # a bug in the checks must not refuse or lose mail
            log(f"warning: inbound check from {self.client_ip} failed: {sanitize(repr(e))}")
            return Verdict(checker.fallback("checks failed"), None, "failed")
        finally:
            if not self.reading:  # else the thread closes it when it is done with it
                self.close()
        return checker.decide(report)

    def _inbound(self) -> InboundT:
        self.kept.seek(0)
        from eqmail.auth import Inbound
        return Inbound(self.client_ip, self.helo, self.mail_from, self.kept.read())

    def _check_cached(self) -> AuthReport | None:
        try:
            return self.checker.check_cached(self._inbound())
        except Exception as e:  # as in the thread: logged; the thread's run then decides
            log(f"warning: inbound check from {self.client_ip} failed on the loop: "
                f"{sanitize(repr(e))}")
            return None

    def _check(self, began: float) -> AuthReport:
        self.reading = True
        try:
            inbound = self._inbound()
        finally:
            self.close()
        return self.checker.check(inbound, began)

    def close(self) -> None:
        self.kept.close()
