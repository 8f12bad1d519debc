"""Values the SMTP session is configured with and keeps: SessionConfig, Phase, SppState.

Owns: the injected configuration of eqmail.smtp.session.Session (built by the listener
from Controls and its options) and the small state records the session keeps between
commands, including the qmail-spp state the plugin layer's results update.
Pure data; no failure modes.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from eqmail.smtp.actions import HookStage, HookVerdict
from eqmail.smtp.policy import BadMailFrom, RcptHosts
from eqmail.srs import SrsKeys


@dataclass(frozen=True)
class SessionConfig:
    """Everything the session needs, built by the listener from Controls + its options."""

    greeting: str                   # control/smtpgreeting (default: me)
    local_host: str                 # TCPLOCALHOST, else TCPLOCALIP, else "unknown"
    databytes: int                  # control/databytes, 0 = unlimited (env DATABYTES wins)
    rcpthosts: RcptHosts | None     # None fails closed: only addresses without "@" pass
    badmailfrom: BadMailFrom = field(default_factory=BadMailFrom)
    local_ips: frozenset[str] = frozenset()
    localiphost: str | None = None  # None: no [d.d.d.d] substitution
    tls_available: bool = False     # servercert present: STARTTLS offered outside TLS
    auth_available: bool = False    # a checkpassword program is configured
    tls_client_relay: bool = False  # tlsclients + clientca usable: try certs before 553
    plugins_enabled: bool = False   # qmail-spp hooks (env NOSPP turns them off)
    submission: bool = False        # a `submission` listener: MAIL needs AUTH whatever the port
    check_mailbox: bool = False     # control/rcptchecklocal: ask CheckMailbox at RCPT
    max_line: int = 12288
    # The CRAM-MD5 challenge's two numbers (eqmail.smtp.auth.cram_challenge); tests
    # give a deterministic one.
    randbits: Callable[[int], int] = secrets.randbits
    # what one client may take (issue 12, Postfix's defaults): recipients per message;
    # error replies after which each reply is delayed / the session is closed (421);
    # NOOP/RSET/VRFY/HELP without a delivered message before 421.  0 = no limit.
    max_rcpt: int = 1000
    error_soft_limit: int = 10
    error_hard_limit: int = 20
    error_sleep: float = 1.0
    junk_limit: int = 100
    utcoffset: int | None = None    # Received date offset; None = local zone
    # SRS (eqmail.srs): forged or expired bounce addresses of forwarded mail are refused
    # at RCPT, valid ones taken without a mailbox check; None: SRS is off
    srs: SrsKeys | None = None


class Phase(Enum):
    COMMAND = "command"
    AUTH = "auth"              # reading AUTH continuation lines
    DATA = "data"
    WAIT = "wait"              # an asynchronous result is due
    WAIT_TLS = "wait_tls"
    CLOSED = "closed"


@dataclass
class SppState:
    """qmail-spp state kept across commands (eqmail-features.md §2)."""

    enabled: bool
    headers: list[str] = field(default_factory=list)               # H lines
    later: dict[HookStage, list[bytes]] = field(default_factory=dict)  # LM/LR/LD
    mail_verdict: HookVerdict = HookVerdict.NORMAL
    rcpt_count: int = 0
    rcpt_count_all: int = 0
    # P continuation lines (``250-...``) waiting for the session's own reply to the
    # command, which finishes them when its code matches (else they are dropped).
    open_reply: bytes = b""

    def reset(self) -> None:
        """RSET and the start of a message clear H and L* (HELO does not)."""
        self.headers.clear()
        self.later.clear()


def digits(value: str) -> int:
    """qmail's scan_ulong: leading digits, anything else ends the number (or is 0)."""
    end = 0
    while end < len(value) and value[end].isdigit():
        end += 1
    return int(value[:end][:20]) if end else 0


def submission_port(env: Mapping[str, str]) -> bool:
    """qmail-smtpd-auth's rule: TCPLOCALPORT equal to SUBMISSIONPORT (default 587, compared
    as strings) needs AUTH before MAIL.  eQmail 1.09's announcement tells admins to set
    ``SUBMISSION=<port>`` while its code reads SUBMISSIONPORT: eqmail honours both."""
    port = env.get("TCPLOCALPORT", "0")
    return port == env.get("SUBMISSIONPORT", "587") or port == env.get("SUBMISSION")
