"""What a listener's sessions take from the configuration, derived from one Controls.

Owns: :class:`ListenerConfig` — every per-session value (the listener's tcprules file,
the rcpthosts matcher, badmailfrom, the greeting, timeoutsmtpd, tlsclients, authlimit,
the local addresses, the RCPT check, the inbound checks of control/authcheck) built
from one :class:`eqmail.control.Controls` —
and :class:`RecipientCheck`, control/rcptchecklocal's lookup of local recipients run in
threads.  eqmail.workers.listener holds one ListenerConfig and replaces it on
``reconfigure``; a session keeps the one it started with.

Runs in the listener worker (eqmaild); reads no control file (the supervisor parsed
them).  A lookup that fails or takes longer than LOOKUP_TIMEOUT counts as "accept".
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from eqmail.authlimit import AuthLimit
from eqmail.control import Controls, ListenerSpec
from eqmail.delivery.mailbox import LocalUsers, Lookup, Mailbox, lookup
from eqmail.log import log, sanitize
from eqmail.netif import local_addresses
from eqmail.queue.rewrite import RewriteRules
from eqmail.smtp.policy import BadMailFrom, RcptHosts
from eqmail.smtp.tcpenv import rcpt_matcher
from eqmail.tcprules import Rules
from eqmail.workers.inbound import InboundChecker

# The RCPT check's password-database and stat calls may block (NSS, NFS homes): they run
# in these threads, and one that takes longer than LOOKUP_TIMEOUT counts as "accept".
LOOKUP_THREADS = 4
LOOKUP_TIMEOUT = 10.0
MAX_WARNED = 1024  # "cannot tell" warnings remembered (one log line per home directory)


@dataclass(frozen=True)
class ListenerConfig:
    """Everything a session takes from the configuration, derived from one Controls.

    A session reads it once, when its connection is accepted, and keeps it to the end;
    :meth:`Listener.reconfigure` swaps in a new one for the sessions after it.  The
    listener's ListenerSpec and its TLS context are not part of it: they change only
    with a new listener process (see :meth:`Listener.reconfigure`)."""

    controls: Controls
    rules: Rules | None  # the listener's rules= file (tcp.smtp); None: allow all
    rcpthosts: RcptHosts
    badmailfrom: BadMailFrom
    local_ips: frozenset[str]
    timeout: float  # timeoutsmtpd
    greeting: str
    tlsclients: frozenset[str]  # empty unless client certificates are requested
    authlimit: AuthLimit  # applied by the sandbox, which keeps the counts
    mailbox_check: RecipientCheck | None  # control/rcptchecklocal
    inbound: InboundChecker | None  # control/authcheck (eqmail.workers.inbound)

    @classmethod
    def build(cls, c: Controls, spec: ListenerSpec, *, client_ca: bool,
              mailbox_check: RecipientCheck | None,
              inbound: InboundChecker | None = None) -> ListenerConfig:
        """The configuration of a listener with ``spec`` under ``c``; ``client_ca``:
        its TLS context asks for client certificates (tlsclients matter only then)."""
        return cls(
            controls=c,
            rules=c.rules_for(spec.rules),
            rcpthosts=rcpt_matcher(c),
            badmailfrom=BadMailFrom.from_lines(c.badmailfrom),
            local_ips=local_addresses(),
            timeout=float(c.timeoutsmtpd),
            greeting=c.smtpgreeting or c.me,
            tlsclients=c.tlsclients if client_ca else frozenset(),
            authlimit=c.authlimit,
            mailbox_check=mailbox_check,
            inbound=inbound,
        )


class RecipientCheck:
    """control/rcptchecklocal: the RCPT-time lookup of local recipients, run in threads.

    The listener (eqmaild) does the lookup itself, with the same functions and the same
    Controls as local delivery; it needs no access beyond reading /etc/passwd and
    stat()ing home directories, which need only search permission.  A home it cannot
    search (mode 0700) or any other error gives "cannot tell" -- accepted, and logged
    once per home directory -- so the check never refuses what delivery would take.
    """

    def __init__(self, c: Controls, users: LocalUsers, pool: ThreadPoolExecutor,
                 warned: set[str]) -> None:
        self.users = users  # users/assign (Controls.assign) and the instance's alias user
        self.rules = RewriteRules.from_controls(c)
        self.vmap = self.rules.vmap()
        self.pool = pool  # the listener's, shared by every configuration
        self.warned = warned  # likewise (one warning per home directory, not per reload)

    def lookup(self, address: str) -> Lookup:
        return lookup(address, self.rules, self.users, vmap=self.vmap)

    async def found(self, address: str) -> bool:
        """False only when local delivery certainly has no mailbox for ``address``."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                result = await loop.run_in_executor(self.pool, self.lookup, address)
        except TimeoutError:
            result = Lookup(Mailbox.UNDECIDED, f"lookup took over {LOOKUP_TIMEOUT:g} s")
        except Exception as e:  # a bug here must not refuse mail
            result = Lookup(Mailbox.UNDECIDED, f"lookup failed: {e!r}")
        if (result.verdict is Mailbox.UNDECIDED and result.reason not in self.warned
                and len(self.warned) < MAX_WARNED):  # bounded: no log flood either
            self.warned.add(result.reason)
            log(f"warning: recipient check cannot tell, accepting: {sanitize(result.reason)}")
        return not result.refuse
