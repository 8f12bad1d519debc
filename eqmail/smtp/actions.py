"""What the pure SMTP session asks its I/O layer to do, and the answers it gets back.

Owns: the vocabulary between eqmail.smtp.session (pure) and the listener worker (I/O).
The session returns a list of actions from every call; the I/O layer performs them *in
order* (a Send before a StartTLS must be on the wire before the handshake begins).
Some actions start asynchronous work whose result the I/O layer later reports with a
session method; until then the session buffers (bounded) whatever the client sends:

=======================  =========================================================
action                   the I/O layer then calls
=======================  =========================================================
EndMessage               ``session.queue_result(QueueOutcome)``
CheckPassword            ``session.auth_result(ok, temporary_text)``
StartTLS                 ``session.tls_started(cipher)`` or ``session.tls_failed(err)``
RunHook                  ``session.hook_result(HookOutcome)``
CheckClientCert          ``session.cert_result(email, reason)``
CheckMailbox             ``session.mailbox_result(found)``
=======================  =========================================================

Inputs/outputs: plain frozen dataclasses; nothing here does I/O.  No failure modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from eqmail.ipc.hooks import HookOutcome as HookOutcome
from eqmail.ipc.hooks import HookStage as HookStage
from eqmail.ipc.hooks import HookVerdict as HookVerdict


@dataclass(frozen=True)
class Send:
    """Bytes for the client (one or more complete replies, CRLF-terminated)."""

    data: bytes


@dataclass(frozen=True)
class Close:
    """Flush what was sent, then close the connection.  Nothing follows it."""


@dataclass(frozen=True)
class StartTLS:
    """Start the server-side TLS handshake now (``220 ready for tls`` was sent just
    before).  Plain-text bytes already read after the STARTTLS line were discarded by the
    session (CVE-2011-0411); the I/O layer must discard any it still holds, too."""


@dataclass(frozen=True)
class BeginMessage:
    """A message starts (after ``354``).  ``header_prefix`` (the Received line and any
    plugin headers, LF line ends) goes first into the message; MessageData follows."""

    sender: str
    recipients: tuple[str, ...]
    header_prefix: bytes
    requiretls: bool = False  # MAIL had REQUIRETLS (RFC 8689): the queue records it


@dataclass(frozen=True)
class MessageData:
    """Stored bytes of the message (LF line ends, dots unstuffed), in arrival order."""

    data: bytes


@dataclass(frozen=True)
class EndMessage:
    """The message is complete: submit it to the queue writer, then call
    ``queue_result``.  The client gets no reply before that."""


@dataclass(frozen=True)
class AbortMessage:
    """Drop the message being received; nothing of it may be queued."""


@dataclass(frozen=True)
class CheckPassword:
    """Run the checkpassword program with ``user\\0password\\0challenge\\0`` on fd 3.
    ``method`` is ``login``, ``plain`` or ``cram-md5``.  On failure the I/O layer waits
    5 s (eQmail) before calling ``auth_result(False)``."""

    method: str
    user: bytes
    password: bytes = field(repr=False)
    challenge: bytes


@dataclass(frozen=True)
class CheckClientCert:
    """Inside TLS a recipient was refused by rcpthosts: ask the client for a certificate
    (renegotiation) and report whether its emailAddress is in control/tlsclients."""


@dataclass(frozen=True)
class CheckMailbox:
    """A recipient passed the relay checks: would local delivery find a mailbox for
    ``address`` (eqmail.delivery.mailbox.lookup)?  ``found`` is False only when it
    certainly would not; remote, undecidable or timed-out lookups report True."""

    address: str


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds`` before performing the next action (the session has made too
    many errors: Postfix's smtpd_error_sleep_time).  Only this session waits."""

    seconds: float


@dataclass(frozen=True)
class Log:
    """One log line, eQmail's ``qmail-smtpd: <event>: ...`` format, no newline."""

    line: str


@dataclass(frozen=True)
class RunHook:
    """Run the plugins of ``stage``.  ``arg`` is the HELO name or the MAIL/RCPT address
    (empty otherwise).  The SMTP* variables are already in ``session.env``."""

    stage: HookStage
    arg: str = ""


Action = (Send | Close | StartTLS | BeginMessage | MessageData | EndMessage | AbortMessage
          | CheckPassword | CheckClientCert | CheckMailbox | Log | RunHook | Delay)


class QueueResult(Protocol):
    """The queue writer's answer as its client reports it (eqmail.queue.client's
    SubmitResult), seen from the session."""

    @property
    def ok(self) -> bool: ...
    @property
    def permanent(self) -> bool: ...
    @property
    def text(self) -> str: ...
    @property
    def qp(self) -> int | None: ...


class QueueStatus(Enum):
    ACCEPTED = "accepted"   # -> 250 ok <time> qp <qp>
    REJECTED = "rejected"   # qmail-queue ``D<text>`` -> 554 <text>
    DEFERRED = "deferred"   # qmail-queue ``Z<text>`` or any failure -> 451 <text>
    REFUSED = "refused"     # the listener's check of the message (DMARC) -> 550 <text>


@dataclass(frozen=True)
class QueueOutcome:
    status: QueueStatus
    qp: int = 0             # shown as ``qp <qp>`` (qmail: the qmail-queue pid)
    text: str = ""          # for REJECTED / DEFERRED, e.g. ``qqt failure (#4.3.0)``;
                            # for REFUSED the reply text, e.g. replies.dmarc_rejected's

    @classmethod
    def of(cls, result: QueueResult) -> QueueOutcome:
        """What the queue writer's answer (eqmail.queue.client) means for the session."""
        if result.ok:
            return cls(QueueStatus.ACCEPTED, qp=result.qp or 0)
        if result.permanent:
            return cls(QueueStatus.REJECTED, text=result.text)
        return cls(QueueStatus.DEFERRED, text=result.text)


