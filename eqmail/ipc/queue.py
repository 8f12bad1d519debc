"""The messages of run/queue.sock: queue writer requests and answers, qmail-clean.

run/queue.sock is world-connectable; the writer takes the client's uid from
SO_PEERCRED, never from a message.  Frames (eqmail.ipc.framing):

  client -> writer   ``H`` :class:`QueueHello`: the role, ASCII (honoured only from a
                     peer with the writer's own uid or root; an unknown role is ignored)
                     ``B`` :class:`BodyChunk` (<= 1 MiB): the message, streamed
                     ``E`` :class:`QueueEnvelope`: qmail-queue's fd-1 format
                     ``F<s>\\0T<r>\\0...\\0``, then eqmail's extension records
                     ``X<key>=<value>\\0`` (:class:`Origin`, ``Xrequiretls=1``);
                     ends the message, the writer commits and answers
                     ``P`` :class:`QueuePrepend` (<= 64 KiB, before ``E``): header
                     fields to put right after the writer's Received line (the
                     listener's Authentication-Results), honoured only from the
                     listener (``invoked from network``); from any other client a
                     protocol error
                     ``C`` :class:`CleanRequest` (qmail-clean: ``foop/<id>``,
                     ``todo/<id % 23>/<id>``), only from the scanner's uid
  writer -> client   ``R`` :class:`QueueAnswer`: ASCII ``<exit code> <qp> <msgid>``
                     ``K`` :class:`CleanAnswer`: one byte ``+`` / ``!`` / ``x``

The writer's answer carries qmail-queue's exit code (:class:`QQExit`); its text and
whether it is permanent are the code's, as qmail.c's qmail_close() gives them
(qmail-core §1.2), so what eqmail-inject, sendmail and the SMTP listener tell people
is qmail's text for that code.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from eqmail.ipc.framing import MAX_FRAME, ProtocolError, frame
from eqmail.textio import decode, encode

HELLO = b"H"
BODY = b"B"
ENVELOPE = b"E"
CLEAN = b"C"
ANSWER = b"R"
CLEAN_ANSWER = b"K"

ADDR_MAX = 1003  # qmail-queue: an address needs its NUL within this many bytes, else exit 11
TODO_SPLIT = 23  # qmail's conf-split, as eqmail.queue.layout.SPLIT: todo/<id % 23>/<id>
_NUMBER_MAX = 19  # digits of a qp or message id (an inode number: < 2**63)


class QQExit(enum.IntEnum):
    """qmail-queue's exit codes (qmail-core §1.2)."""

    OK = 0
    ADDR_TOO_LONG = 11
    PERM_REFUSED = 31
    NO_MEMORY = 51
    TIMEOUT = 52
    WRITE_ERROR = 53
    READ_ERROR = 54
    CONFIG = 55
    NETWORK = 56
    HOME_DIR = 61
    QUEUE_DIR = 62
    PID_DIR = 63
    MESS_DIR = 64
    INTD_DIR = 65
    TODO_DIR = 66
    TEMP_REJECT = 71
    TIMED_OUT = 72
    REFUSED = 73
    COMM_FAILED = 74
    BUG = 81
    BAD_ENVELOPE = 91
    CANNOT_EXEC = 120

    @property
    def permanent(self) -> bool:
        """qmail_close() gives this code a ``D`` (permanent) text, not a ``Z``."""
        return self in (QQExit.ADDR_TOO_LONG, QQExit.PERM_REFUSED)

    @property
    def text(self) -> str:
        """qmail_close()'s text for this code, without its D/Z letter; "" for OK."""
        return _QQ_TEXT[self]


_QUEUE_FILES = "qq trouble creating files in queue (#4.3.0)"
_QQ_TEXT: dict[QQExit, str] = {
    QQExit.OK: "",
    QQExit.ADDR_TOO_LONG: "envelope address too long for qq (#5.1.3)",
    QQExit.PERM_REFUSED: "mail server permanently rejected message (#5.3.0)",
    QQExit.NO_MEMORY: "qq out of memory (#4.3.0)",
    QQExit.TIMEOUT: "qq timeout (#4.3.0)",
    QQExit.WRITE_ERROR: "qq write error or disk full (#4.3.0)",
    QQExit.READ_ERROR: "qq read error (#4.3.0)",
    QQExit.CONFIG: "qq unable to read configuration (#4.3.0)",
    QQExit.NETWORK: "qq trouble making network connection (#4.3.0)",
    QQExit.HOME_DIR: "qq trouble in home directory (#4.3.0)",
    QQExit.QUEUE_DIR: _QUEUE_FILES,
    QQExit.PID_DIR: _QUEUE_FILES,
    QQExit.MESS_DIR: _QUEUE_FILES,
    QQExit.INTD_DIR: _QUEUE_FILES,
    QQExit.TODO_DIR: _QUEUE_FILES,
    QQExit.TEMP_REJECT: "mail server temporarily rejected message (#4.3.0)",
    QQExit.TIMED_OUT: "connection to mail server timed out (#4.4.1)",
    QQExit.REFUSED: "connection to mail server rejected (#4.4.1)",
    QQExit.COMM_FAILED: "communication with mail server failed (#4.4.2)",
    QQExit.BUG: "qq internal bug (#4.3.0)",
    QQExit.BAD_ENVELOPE: "qq internal bug (#4.3.0)",
    QQExit.CANNOT_EXEC: "unable to exec qq (#4.3.0)",
}


def _number(field: bytes) -> int:
    if not 0 < len(field) <= _NUMBER_MAX or not field.isdigit():
        raise ProtocolError("malformed number")
    return int(field)


def _check_number(n: int) -> None:
    if not 0 <= n < 1 << 63:
        raise ProtocolError("number out of range")


# ------------------------------------------------------------------ client -> writer


class QueueRole(enum.StrEnum):
    """Who the client says it is; the Received line's ``invoked ...`` text for it."""

    NETWORK = "network"
    BOUNCE = "bounce"
    ALIAS = "alias"

    @property
    def invoked(self) -> str:
        return _INVOKED[self]


_INVOKED = {QueueRole.NETWORK: "from network", QueueRole.BOUNCE: "for bounce",
            QueueRole.ALIAS: "by alias"}


@dataclass(frozen=True)
class QueueHello:
    role: QueueRole

    def encode(self) -> bytes:
        if not isinstance(self.role, QueueRole):
            raise ProtocolError("unknown queue role")
        return self.role.value.encode()

    def frame(self) -> bytes:
        return frame(HELLO, self.encode())

    @classmethod
    def decode(cls, payload: bytes) -> QueueHello:
        if len(payload) > MAX_FRAME[HELLO]:
            raise ProtocolError("role too long")
        try:
            return cls(QueueRole(payload.decode("ascii")))
        except ValueError:
            raise ProtocolError("unknown queue role") from None


@dataclass(frozen=True)
class BodyChunk:
    """A piece of the message, written to the mess file as it is."""

    data: bytes

    def encode(self) -> bytes:
        if len(self.data) > MAX_FRAME[BODY]:
            raise ProtocolError("body chunk too long")
        return self.data

    def frame(self) -> bytes:
        return frame(BODY, self.encode())

    @classmethod
    def decode(cls, payload: bytes) -> BodyChunk:
        if len(payload) > MAX_FRAME[BODY]:
            raise ProtocolError("body chunk too long")
        return cls(payload)


class EnvelopeRefused(ProtocolError):
    """An envelope qmail-queue refuses with an exit code: malformed (91), an address
    too long (11) or truncated (54, qmail-queue's read error).  The writer answers the
    code instead of dropping the client, as qmail-queue exits with it."""

    def __init__(self, code: QQExit, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Origin(enum.StrEnum):
    """Where a message came from, as far as signing and SRS care (issue 16).

    The client claims it in the envelope's ``Xorigin=`` record; the queue writer decides
    what it believes (AUTH and RELAY only from the listener's role and uid, BOUNCE only
    from the scanner's; any client may claim less: NETWORK or FORWARD) and a client that
    claims nothing is a local injection (LOCAL).  The writer records every origin but
    NETWORK in the todo/ and info/ files (docs/queue-format.md)."""

    NETWORK = "network"   # an SMTP client that is neither authenticated nor a relay client
    AUTH = "auth"         # an SMTP client that authenticated (AUTH)
    RELAY = "relay"       # an SMTP relay client (RELAYCLIENT)
    LOCAL = "local"       # eqmail-inject / sendmail / a program run by a local user
    BOUNCE = "bounce"     # a bounce eqmail itself wrote
    FORWARD = "forward"   # a copy a .qmail file (or alias) forwarded on

    @property
    def signed(self) -> bool:
        """Whether mail of this origin is DKIM-signed for its From: domain."""
        return self in (Origin.AUTH, Origin.RELAY, Origin.LOCAL, Origin.BOUNCE)


_EXT_MAX = 16  # extension records one envelope may carry
_EXT_LEN = 256  # bytes of one extension record


@dataclass(frozen=True)
class QueueEnvelope:
    """The envelope of one message (addresses are surrogate-escaped str, eqmail.textio).

    ``origin`` is what the client claims (None: nothing, i.e. qmail-queue's format
    exactly); it travels as an ``Xorigin=<value>`` record after the terminating NUL,
    where qmail-queue stops reading, so the bytes before it stay qmail-queue's.
    ``requiretls``: the sender demanded REQUIRETLS (RFC 8689: ``MAIL FROM:<..>
    REQUIRETLS`` on a TLS session, or a bounce of such a message), an
    ``Xrequiretls=1`` record there too.  Any client may ask for it: it only makes
    the message's delivery stricter."""

    sender: str
    recipients: tuple[str, ...]
    origin: Origin | None = None
    requiretls: bool = False

    def encode(self) -> bytes:
        """The bytes a client sends to the queue writer (qmail-queue's fd 1).  An
        address holding a NUL would change the envelope's records: refused here.
        (A too long one is the writer's to refuse, with qmail-queue's exit 11.)"""
        parts = [b"F", encode(self.sender), b"\0"]
        for r in self.recipients:
            parts += [b"T", encode(r), b"\0"]
        if any(b"\0" in p for p in parts[1::3]):
            raise ProtocolError("an envelope address holds a NUL")
        parts.append(b"\0")
        if self.origin is not None:
            parts.append(f"Xorigin={Origin(self.origin).value}\0".encode("ascii"))
        if self.requiretls:
            parts.append(REQUIRETLS_RECORD)
        data = b"".join(parts)
        if len(data) > MAX_FRAME[ENVELOPE]:
            raise ProtocolError("envelope too long")
        return data

    def frame(self) -> bytes:
        return frame(ENVELOPE, self.encode())

    @classmethod
    def decode(cls, data: bytes) -> QueueEnvelope:
        """qmail-queue's envelope reader, byte for byte as qmail-queue.c reads fd 1.

        First byte not ``F`` or a record not starting with ``T``: 91.  An address with
        no NUL within its first ADDR_MAX bytes (i.e. longer than 1002 bytes): 11.  The
        data ending before the terminating extra NUL: 54 (qmail-queue's die_read).
        After the terminating NUL come eqmail's extension records (``X<key>=<value>``
        each with its NUL; qmail-queue never reads them): ``origin`` is taken when its
        value is an :class:`Origin`, ``requiretls`` when its value is ``1``; an
        unknown key or value, too many records or a
        record without its NUL is ignored, never a refusal, so an older client's bytes
        and a newer client's unknown records both queue.  Every refusal is an
        :class:`EnvelopeRefused` carrying its code.
        """
        pos = 0

        def address() -> str:
            nonlocal pos
            end = data.find(b"\0", pos, pos + ADDR_MAX)
            if end < 0:
                if len(data) - pos >= ADDR_MAX:
                    raise EnvelopeRefused(QQExit.ADDR_TOO_LONG, "address too long")
                raise EnvelopeRefused(QQExit.READ_ERROR, "envelope ends inside an address")
            value = decode(data[pos:end])
            pos = end + 1
            return value

        if not data:
            raise EnvelopeRefused(QQExit.READ_ERROR, "empty envelope")
        if data[:1] != b"F":
            raise EnvelopeRefused(QQExit.BAD_ENVELOPE, "envelope does not start with F")
        pos = 1
        sender = address()
        recips: list[str] = []
        while True:
            if pos >= len(data):
                raise EnvelopeRefused(QQExit.READ_ERROR, "envelope not terminated")
            tag = data[pos : pos + 1]
            pos += 1
            if tag == b"\0":
                break
            if tag != b"T":
                raise EnvelopeRefused(QQExit.BAD_ENVELOPE, "recipient record does not start with T")
            recips.append(address())
        origin, requiretls = _extensions(data, pos)
        return cls(sender, tuple(recips), origin, requiretls)


# The REQUIRETLS record (RFC 8689), in the envelope as in todo/ and info/; a value
# other than 1 is not one this eqmail knows and is ignored.
REQUIRETLS_RECORD = b"Xrequiretls=1\0"


def _extensions(data: bytes, pos: int) -> tuple[Origin | None, bool]:
    origin: Origin | None = None
    requiretls = False
    for _ in range(_EXT_MAX):
        end = data.find(b"\0", pos, pos + _EXT_LEN)
        if end < 0 or data[pos:pos + 1] != b"X":
            break
        key, sep, value = data[pos + 1:end].partition(b"=")
        pos = end + 1
        if key == b"requiretls" and sep and value == b"1":
            requiretls = True
        elif key == b"origin" and sep:
            try:
                origin = Origin(value.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                continue
    return origin, requiretls


class CleanKind(enum.Enum):
    FOOP = "foop"  # remove intd/ and mess/ of a finished message
    TODO = "todo"  # remove todo/ (then intd/) of a preprocessed message


@dataclass(frozen=True)
class CleanRequest:
    """qmail-clean's request: ``foop/<id>`` or ``todo/<id % 23>/<id>`` (qmail-send
    sends the todo/ name with its split directory; ``todo/<id>`` is read too)."""

    kind: CleanKind
    msgid: int

    @classmethod
    def foop(cls, msgid: int) -> CleanRequest:
        return cls(CleanKind.FOOP, msgid)

    @classmethod
    def todo(cls, msgid: int) -> CleanRequest:
        return cls(CleanKind.TODO, msgid)

    def __str__(self) -> str:
        return self.encode().decode("ascii")

    def encode(self) -> bytes:
        if not isinstance(self.kind, CleanKind):
            raise ProtocolError("unknown clean request")
        _check_number(self.msgid)
        if self.kind is CleanKind.FOOP:
            return f"foop/{self.msgid}".encode()
        return f"todo/{self.msgid % TODO_SPLIT}/{self.msgid}".encode()

    def frame(self) -> bytes:
        return frame(CLEAN, self.encode())

    @classmethod
    def decode(cls, payload: bytes) -> CleanRequest:
        """qmail-clean's reader: 7 to 100 bytes (qmail-clean's buffer), a kind, a
        slash and the id, with the todo/ split directory optional."""
        if not 7 <= len(payload) <= 100:
            raise ProtocolError("clean request of bad length")
        name, _, rest = payload.partition(b"/")
        fields = rest.split(b"/")
        if name == b"todo" and len(fields) == 2:
            _number(fields[0])
        elif len(fields) != 1:
            raise ProtocolError("malformed clean request")
        try:
            kind = CleanKind(name.decode("ascii"))
        except ValueError:
            raise ProtocolError("unknown clean request") from None
        return cls(kind, _number(fields[-1]))


# ------------------------------------------------------------------ writer -> client


@dataclass(frozen=True)
class QueueAnswer:
    """The writer's answer to a message: qmail-queue's exit code, the message's ``qp``
    trace number (0 when none was taken) and its id (0 unless queued)."""

    code: QQExit
    qp: int
    msgid: int

    @property
    def ok(self) -> bool:
        return self.code is QQExit.OK

    @property
    def permanent(self) -> bool:
        return self.code.permanent

    @property
    def text(self) -> str:
        return self.code.text

    def encode(self) -> bytes:
        if not isinstance(self.code, QQExit):
            raise ProtocolError("unknown qmail-queue exit code")
        _check_number(self.qp)
        _check_number(self.msgid)
        return f"{int(self.code)} {self.qp} {self.msgid}".encode()

    def frame(self) -> bytes:
        return frame(ANSWER, self.encode())

    @classmethod
    def decode(cls, payload: bytes) -> QueueAnswer:
        fields = payload.split(b" ")
        if len(payload) > MAX_FRAME[ANSWER] or len(fields) != 3:
            raise ProtocolError("malformed queue answer")
        code, qp, msgid = (_number(f) for f in fields)
        try:
            return cls(QQExit(code), qp, msgid)
        except ValueError:
            raise ProtocolError(f"unknown qmail-queue exit code {code}") from None


class CleanAnswer(enum.Enum):
    """qmail-clean's one-byte answer.  (One byte with three values: an enum, whose
    members are as immutable as a frozen dataclass.)"""

    DONE = b"+"      # removed (or already absent)
    REFUSED = b"!"   # not removed: a retry may succeed
    BAD = b"x"       # not a request qmail-clean understands

    def encode(self) -> bytes:
        return self.value

    def frame(self) -> bytes:
        return frame(CLEAN_ANSWER, self.encode())

    @classmethod
    def decode(cls, payload: bytes) -> CleanAnswer:
        try:
            return cls(payload)
        except ValueError:
            raise ProtocolError("malformed clean answer") from None


# ------------------------------------------------------------------ prepend (issue 16)

PREPEND = b"P"
PREPEND_MAX = 64 * 1024  # as framing.MAX_FRAME[PREPEND]
_LINE_MAX = 998  # RFC 5322 §2.1.1: characters of a line, without its end
# Complete header fields, LF-terminated (the queue's stored form): a field name of
# printable ASCII but ':' then ':'; continuation lines begin with a blank and hold more
# than blanks (a blank-only line could end the header section for some readers).
# No CR, no NUL anywhere: they would change what the fields mean to the next reader.
_FIELDS = re.compile(
    rb"(?:[!-9;-~]+:[^\r\n\0]*\n(?:[ \t]+[^ \t\r\n\0][^\r\n\0]*\n)*)+")


@dataclass(frozen=True)
class QueuePrepend:
    """Header fields the listener puts at the top of a message it has streamed already
    (the Authentication-Results field is known only once the whole message is in).  The
    writer places them right after its own ``Received: (qmail N invoked from network)``
    line, before the listener's Received line, where RFC 8601 §5 wants them: above
    every field the receiving host did not add itself.

    ``fields`` is one or more complete header fields, LF line ends, at most
    PREPEND_MAX bytes, every line at most 998 bytes; anything else is refused on both
    sides (ProtocolError), so a listener bug cannot end the header section early or
    smuggle in a line the writer would store as is."""

    fields: bytes

    def encode(self) -> bytes:
        _check_fields(self.fields)
        return self.fields

    def frame(self) -> bytes:
        return frame(PREPEND, self.encode())

    @classmethod
    def decode(cls, payload: bytes) -> QueuePrepend:
        _check_fields(payload)
        return cls(payload)


def _check_fields(data: bytes) -> None:
    if not 0 < len(data) <= PREPEND_MAX:
        raise ProtocolError("prepended fields empty or too long")
    if not _FIELDS.fullmatch(data):
        raise ProtocolError("prepended bytes are not complete header fields")
    if any(len(line) > _LINE_MAX for line in data.split(b"\n")):
        raise ProtocolError("prepended header line too long")
