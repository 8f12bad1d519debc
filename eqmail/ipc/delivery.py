"""The delivery protocol: scanner <-> delivery workers, and local spawner <-> its children.

Owns every payload on run/local.sock and run/remote.sock (frames ``D r A a e Q q``,
framing in :mod:`eqmail.ipc`) and on the local spawner's SOCK_SEQPACKET pair to a
delivery child.  Pure: no I/O here; each message is a frozen dataclass whose
``encode()`` checks its fields and whose ``decode()`` raises only
:class:`~eqmail.ipc.ProtocolError` on bad bytes.

Scanner -> delivery worker:
  ``D`` :class:`DeliveryRequest`: ``slot\\0msgid\\0sender\\0recipient\\0`` then one
        ``key=value\\0`` per per-recipient option (none today, so the bytes are what
        they always were; a request without options is a request of the older form).
        The channel (local or remote) is not on the wire: it is the socket it arrives on.
  ``A`` :class:`Attach`, ``Q`` :class:`Detach` (both empty).
Delivery worker -> scanner:
  ``r`` :class:`DeliveryReport`: ``slot\\0`` + the :class:`Outcome` (letter + text,
        after ``+unreachable\\0`` when a remote delivery found its destination
        unreachable: :class:`Site`), exactly one per request
  ``a`` :class:`Adopted` (the slot), ``e`` :class:`EndOfList`, ``q`` :class:`Detached`.

The slot names a delivery and comes back in its report; the scanner's slot is
``msgid.offset`` (:func:`scanner_slot`), which a restarted scanner can read back.

Verdicts: inside a process the value is :class:`Verdict`; qmail's letters ``K`` / ``Z`` /
``D`` are only its encoding on the wire (qmail-lspawn's and qmail-rspawn's report
format) and in texts written for people.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import ClassVar, Self

from eqmail.ipc import MAX_FRAME, SLOT_MAX, ProtocolError, frame
from eqmail.textio import decode, encode

REPORT_MAX = 10000  # bytes of a report (letter + text), as qmail-lspawn cuts it
MSGID_DIGITS = 20
OPTION_KEY = re.compile(rb"[a-z0-9][a-z0-9-]{0,31}")


class Channel(enum.IntEnum):
    """The two delivery channels (qmail-send's local and remote)."""

    LOCAL = 0
    REMOTE = 1

    @property
    def dirname(self) -> str:
        return "local" if self is Channel.LOCAL else "remote"


class Verdict(enum.Enum):
    """How a delivery ended: delivered, deferred (retry), failed (bounce)."""

    SUCCESS = "success"
    DEFERRAL = "deferral"
    FAILURE = "failure"

    @property
    def letter(self) -> str:
        """qmail's report letter: K, Z or D."""
        return _LETTERS[self]

    @classmethod
    def from_letter(cls, letter: str) -> Verdict:
        for verdict, known in _LETTERS.items():
            if known == letter:
                return verdict
        raise ProtocolError(f"unknown report letter {letter!r}")


_LETTERS = {Verdict.SUCCESS: "K", Verdict.DEFERRAL: "Z", Verdict.FAILURE: "D"}


class Site(enum.Enum):
    """What a remote delivery learned about its destination (the recipient's domain),
    for the scanner's per-destination back-off (eqmail.queue.backoff).

    UNREACHABLE: no SMTP connection could be made to any address of the domain (every
    one refused, timed out or was skipped as dead by qmail's tcpto), or its DNS lookup
    failed temporarily.  UNKNOWN: anything else, including every local delivery and a
    remote one that reached a server (whatever it answered).  A typed value, never read
    back out of qmail's text."""

    UNKNOWN = "unknown"
    UNREACHABLE = "unreachable"


SITE_MARK = b"+"  # starts the site prefix; never one of qmail's letters


def _field(value: bytes, what: str) -> bytes:
    if b"\0" in value:
        raise ProtocolError(f"{what} contains NUL")
    return value


def _check_slot(slot: bytes) -> bytes:
    if not 0 < len(slot) <= SLOT_MAX or b"\0" in slot:
        raise ProtocolError("delivery slot empty, too long or with NUL")
    return slot


@dataclass(frozen=True)
class Outcome:
    """A delivery's verdict and qmail's report text (lines ending in ``\\n`` as qmail
    writes them), and what the delivery learned about its destination's reachability.
    Encoded as letter + text — the local child's answer to its spawner, and the tail of
    a :class:`DeliveryReport` — preceded by ``+unreachable\\0`` exactly when ``site``
    is not UNKNOWN (so every outcome of before has the bytes it always had)."""

    verdict: Verdict
    text: str
    site: Site = Site.UNKNOWN

    def _prefix(self) -> bytes:
        if self.site is Site.UNKNOWN:
            return b""
        return SITE_MARK + encode(self.site.value) + b"\0"

    def encode(self) -> bytes:
        data = self._prefix() + self.verdict.letter.encode() + encode(self.text)
        if len(data) > REPORT_MAX:
            raise ProtocolError(f"report of {len(data)} bytes")
        return data

    @classmethod
    def decode(cls, data: bytes) -> Outcome:
        if not 0 < len(data) <= REPORT_MAX:
            raise ProtocolError("empty or over-long report")
        site = Site.UNKNOWN
        if data[:1] == SITE_MARK:
            word, nul, data = data[1:].partition(b"\0")
            try:
                site = Site(word.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise ProtocolError("report with an unknown site") from None
            if not nul or site is Site.UNKNOWN or not data:
                raise ProtocolError("malformed site in a report")
        return cls(Verdict.from_letter(chr(data[0])), decode(data[1:]), site)

    def cut(self) -> Outcome:
        """This outcome with its text cut so that it encodes in REPORT_MAX bytes."""
        data = encode(self.text)
        room = REPORT_MAX - 1 - len(self._prefix())
        if len(data) <= room:
            return self
        return Outcome(self.verdict, decode(data[:room]), self.site)


@dataclass(frozen=True)
class DeliveryRequest:
    """``D``: deliver message ``msgid`` from ``sender`` to ``recipient``.

    ``options`` is the room for per-recipient data (DSN, REQUIRETLS, ...): ordered
    ``(key, value)`` pairs, keys ``[a-z0-9][a-z0-9-]*`` (at most 32), each key once,
    values any text without NUL.  Encoded after the four fields as ``key=value\\0``;
    a request without options has exactly the older four-field form, and a worker of
    the older form ignores what follows the fourth field."""

    KIND: ClassVar[bytes] = b"D"
    slot: bytes
    msgid: int
    sender: str
    recipient: str
    channel: Channel
    options: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        if not 0 <= self.msgid < 10**MSGID_DIGITS:
            raise ProtocolError("message id out of range")
        parts = [_check_slot(self.slot), str(self.msgid).encode(),
                 _field(encode(self.sender), "sender"), _field(encode(self.recipient), "recipient")]
        seen: set[bytes] = set()
        for key, value in self.options:
            k = encode(key)
            if not OPTION_KEY.fullmatch(k) or k in seen:
                raise ProtocolError(f"bad or repeated option key {key!r}")
            seen.add(k)
            parts.append(k + b"=" + _field(encode(value), "option value"))
        payload = b"\0".join(parts) + b"\0"
        if len(payload) > MAX_FRAME[self.KIND]:
            raise ProtocolError("delivery request too long")
        return payload

    def frame(self) -> bytes:
        return frame(self.KIND, self.encode())

    @classmethod
    def decode(cls, payload: bytes, channel: Channel) -> DeliveryRequest:
        """The request; :class:`BadMessageId` (a ProtocolError that names the slot) when
        only the message id is wrong, which the worker answers with a permanent
        failure rather than dropping the scanner."""
        if len(payload) > MAX_FRAME[cls.KIND] or not payload.endswith(b"\0"):
            raise ProtocolError("malformed delivery request")
        parts = payload[:-1].split(b"\0")
        if len(parts) < 4:
            raise ProtocolError("malformed delivery request")
        slot, msgid_b, sender_b, recipient_b = parts[:4]
        _check_slot(slot)
        options: list[tuple[str, str]] = []
        seen: set[bytes] = set()
        for item in parts[4:]:
            key, eq, value = item.partition(b"=")
            if not eq or not OPTION_KEY.fullmatch(key) or key in seen:
                raise ProtocolError("malformed delivery request option")
            seen.add(key)
            options.append((key.decode("ascii"), decode(value)))
        if not msgid_b.isdigit() or len(msgid_b) > MSGID_DIGITS:
            raise BadMessageId(slot)
        return cls(slot, int(msgid_b), decode(sender_b), decode(recipient_b), channel,
                   tuple(options))


class BadMessageId(ProtocolError):
    """A delivery request whose message id is not a number of at most 20 digits."""

    def __init__(self, slot: bytes) -> None:
        super().__init__("message id is not valid")
        self.slot = slot


@dataclass(frozen=True)
class DeliveryReport:
    """``r``: how the delivery ``slot`` ended."""

    KIND: ClassVar[bytes] = b"r"
    slot: bytes
    outcome: Outcome

    @property
    def verdict(self) -> Verdict:
        return self.outcome.verdict

    @property
    def text(self) -> str:
        return self.outcome.text

    def encode(self) -> bytes:
        return _check_slot(self.slot) + b"\0" + self.outcome.encode()

    def frame(self) -> bytes:
        return frame(self.KIND, self.encode())

    @classmethod
    def decode(cls, payload: bytes) -> DeliveryReport:
        slot, nul, rest = payload.partition(b"\0")
        if not nul:
            raise ProtocolError("malformed delivery report")
        return cls(_check_slot(slot), Outcome.decode(rest))


@dataclass(frozen=True)
class _Empty:
    KIND: ClassVar[bytes]

    def encode(self) -> bytes:
        return b""

    def frame(self) -> bytes:
        return frame(self.KIND)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        if payload:
            raise ProtocolError(f"frame {cls.KIND!r} must be empty")
        return cls()


@dataclass(frozen=True)
class Attach(_Empty):
    """``A``: "I am the scanner now"; answered by :class:`Adopted` frames and :class:`EndOfList`."""

    KIND: ClassVar[bytes] = b"A"


@dataclass(frozen=True)
class EndOfList(_Empty):
    """``e``: the end of the list that answers :class:`Attach`."""

    KIND: ClassVar[bytes] = b"e"


@dataclass(frozen=True)
class Detach(_Empty):
    """``Q``: a scanner that hands over, before it exits."""

    KIND: ClassVar[bytes] = b"Q"


@dataclass(frozen=True)
class Detached(_Empty):
    """``q``: answers :class:`Detach`; nothing more comes on this connection."""

    KIND: ClassVar[bytes] = b"q"


@dataclass(frozen=True)
class Adopted:
    """``a``: a delivery the attaching scanner takes over: still running, or finished
    with a report nobody has received yet (sent after the list)."""

    KIND: ClassVar[bytes] = b"a"
    slot: bytes

    def encode(self) -> bytes:
        return _check_slot(self.slot)

    def frame(self) -> bytes:
        return frame(self.KIND, self.encode())

    @classmethod
    def decode(cls, payload: bytes) -> Adopted:
        return cls(_check_slot(payload))


ToWorker = DeliveryRequest | Attach | Detach
ToScanner = DeliveryReport | Adopted | EndOfList | Detached
TO_WORKER_KINDS = b"DAQ"
TO_SCANNER_KINDS = b"raeq"


def decode_to_worker(kind: bytes, payload: bytes, channel: Channel) -> ToWorker:
    """A frame the scanner sent to a delivery worker of ``channel``."""
    if kind == b"D":
        return DeliveryRequest.decode(payload, channel)
    if kind == b"A":
        return Attach.decode(payload)
    if kind == b"Q":
        return Detach.decode(payload)
    raise ProtocolError(f"unexpected frame {kind!r}")


def decode_to_scanner(kind: bytes, payload: bytes) -> ToScanner:
    """A frame a delivery worker sent to the scanner."""
    if kind == b"r":
        return DeliveryReport.decode(payload)
    if kind == b"a":
        return Adopted.decode(payload)
    if kind == b"e":
        return EndOfList.decode(payload)
    if kind == b"q":
        return Detached.decode(payload)
    raise ProtocolError(f"unexpected frame {kind!r}")


def scanner_slot(msgid: int, offset: int) -> bytes:
    """The scanner's name for a delivery: the recipient's record in its channel file."""
    return f"{msgid}.{offset}".encode()


def parse_scanner_slot(slot: bytes) -> tuple[int, int] | None:
    """(msgid, offset) of a slot made by :func:`scanner_slot`; None for anything else."""
    msgid, dot, offset = slot.partition(b".")
    if not (dot and msgid.isdigit() and offset.isdigit() and len(slot) <= SLOT_MAX):
        return None
    return int(msgid), int(offset)


# ---------------------------------------------------------------- spawner -> child
# The local spawner hands one job at a time to a child running as the user, over a
# SOCK_SEQPACKET pair, with the open message file attached (SCM_RIGHTS); the child
# answers with one Outcome (letter + text).

MAX_CHILD_JOB = 64 * 1024


@dataclass(frozen=True)
class LocalChildJob:
    """qmail-local's arguments: ``user home local dash ext domain sender
    defaultdelivery me``, each NUL-terminated; then, for a REQUIRETLS message (RFC
    8689), ``R``: the copies its .qmail forwards keep the demand (§4.1)."""

    user: str
    home: str
    local: str
    dash: str
    ext: str
    domain: str
    sender: str
    default_delivery: str
    me: str
    requiretls: bool = False

    FIELDS: ClassVar[int] = 9

    def encode(self) -> bytes:
        values = (self.user, self.home, self.local, self.dash, self.ext, self.domain,
                  self.sender, self.default_delivery, self.me)
        payload = b"".join(_field(encode(v), "job field") + b"\0" for v in values)
        if self.requiretls:
            payload += b"R\0"
        if len(payload) > MAX_CHILD_JOB:
            raise ProtocolError("local job too long")
        return payload

    @classmethod
    def decode(cls, payload: bytes) -> LocalChildJob:
        parts = payload.split(b"\0")
        requiretls = len(parts) == cls.FIELDS + 2 and parts[cls.FIELDS] == b"R"
        if (len(payload) > MAX_CHILD_JOB or len(parts) != cls.FIELDS + 1 + requiretls
                or parts[-1]):
            raise ProtocolError("malformed local job")
        user, home, local, dash, ext, domain, sender, default, me = (
            decode(p) for p in parts[:cls.FIELDS])
        return cls(user, home, local, dash, ext, domain, sender, default, me, requiretls)
