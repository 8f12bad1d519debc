"""The messages of run/scanner.sock (eqmailctl -> scanner; root only).

Line-based like run/status.sock, so that the postmaster can ask with socat too:

  client -> scanner   :class:`AdminRequest`: one line, ``status``, ``delete <id>`` or
                      ``bounce <id>`` (at most MAX_ADMIN_REQUEST bytes)
  scanner -> client   one JSON object on one line (at most MAX_ADMIN_ANSWER bytes), then
                      the scanner closes:
                      :class:`QueueActivity` answers ``status`` — the messages with a
                      delivery pass in progress and the scanner's channel counts;
                      :class:`Removed` answers a delete/bounce that found the message;
                      :class:`AdminRefusal` answers anything else.

``decode`` checks every field and raises :class:`ProtocolError` and nothing else.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from eqmail.ipc.framing import ProtocolError

MAX_ADMIN_REQUEST = 256
MAX_ADMIN_ANSWER = 1 << 20
MAX_ERROR_TEXT = 512
_MAX_MSGID = (1 << 64) - 1  # an inode number


class AdminAction(enum.Enum):
    STATUS = "status"
    DELETE = "delete"
    BOUNCE = "bounce"


@dataclass(frozen=True)
class AdminRequest:
    """What eqmailctl asks the scanner; ``msgid`` is set exactly for delete/bounce."""

    action: AdminAction
    msgid: int | None = None

    def __post_init__(self) -> None:
        wants_id = self.action is not AdminAction.STATUS
        if wants_id != (self.msgid is not None):
            raise ProtocolError(f"admin request {self.action.value} with a bad message id")
        if self.msgid is not None and not 0 <= self.msgid <= _MAX_MSGID:
            raise ProtocolError("admin request with a message id out of range")

    def encode(self) -> bytes:
        if self.msgid is None:
            return f"{self.action.value}\n".encode()
        return f"{self.action.value} {self.msgid}\n".encode()

    @classmethod
    def decode(cls, payload: bytes) -> AdminRequest:
        if len(payload) > MAX_ADMIN_REQUEST:
            raise ProtocolError("admin request too long")
        words = payload.decode("ascii", "replace").split()
        try:
            action = AdminAction(words[0]) if words else None
        except ValueError:
            action = None
        if action is None:
            raise ProtocolError("unknown admin request")
        if action is AdminAction.STATUS:
            if len(words) != 1:
                raise ProtocolError("admin request status takes no argument")
            return cls(action)
        if len(words) != 2 or not (words[1].isascii() and words[1].isdigit()):
            raise ProtocolError(f"admin request {action.value} needs one message id")
        return cls(action, int(words[1]))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Delivery:
    """One message with a delivery pass in progress (``eqmailctl status``)."""

    msgid: int
    channel: str   # "local" or "remote"
    running: int   # deliveries handed to the worker
    waiting: int   # recipients not yet handed out

    def as_dict(self) -> dict[str, object]:
        return {"msgid": self.msgid, "channel": self.channel, "running": self.running,
                "waiting": self.waiting}


_COUNTS = ("local_pending", "remote_pending", "local_active", "remote_active")
MAX_DOMAIN = 255


@dataclass(frozen=True)
class DeadDestination:
    """A destination the scanner holds back (per-destination back-off): no delivery to
    ``domain`` is tried before ``until`` (Unix time), then one probe; ``held``
    messages wait for it."""

    domain: str
    since: float
    until: float
    probing: bool
    held: int

    def as_dict(self) -> dict[str, object]:
        return {"domain": self.domain, "since": self.since, "until": self.until,
                "probing": self.probing, "held": self.held}


@dataclass(frozen=True)
class QueueActivity:
    deliveries: tuple[Delivery, ...]
    counts: tuple[tuple[str, int], ...]  # the names in _COUNTS, in that order
    dead: tuple[DeadDestination, ...] = ()

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"deliveries": [d.as_dict() for d in self.deliveries],
                                  "counts": dict(self.counts)}
        if self.dead:  # only then: an answer without any has the bytes of before
            out["dead"] = [d.as_dict() for d in self.dead]
        return out


@dataclass(frozen=True)
class Removed:
    removed: int  # recipients taken out of the queue


@dataclass(frozen=True)
class AdminRefusal:
    error: str


AdminAnswer = QueueActivity | Removed | AdminRefusal


def encode_answer(answer: AdminAnswer) -> bytes:
    obj: dict[str, Any]
    if isinstance(answer, QueueActivity):
        obj = answer.as_dict()
    elif isinstance(answer, Removed):
        obj = {"ok": True, "removed": answer.removed}
    else:
        obj = {"ok": False, "error": answer.error[:MAX_ERROR_TEXT]}
    data = json.dumps(obj).encode() + b"\n"
    if len(data) > MAX_ADMIN_ANSWER:
        raise ProtocolError("admin answer too long")
    return data


def _delivery(obj: object) -> Delivery:
    if not isinstance(obj, dict):
        raise ProtocolError("admin answer with a bad delivery")
    msgid, channel, running, waiting = (obj.get(k) for k in ("msgid", "channel", "running", "waiting"))
    if not (_is_int(msgid) and channel in ("local", "remote") and _is_int(running)
            and _is_int(waiting)):
        raise ProtocolError("admin answer with a bad delivery")
    assert isinstance(msgid, int) and isinstance(channel, str)  # narrowed above
    assert isinstance(running, int) and isinstance(waiting, int)
    return Delivery(msgid, channel, running, waiting)


def _dead(obj: object) -> DeadDestination:
    if not isinstance(obj, dict):
        raise ProtocolError("admin answer with a bad dead destination")
    domain, since, until, probing, held = (obj.get(k) for k in
                                           ("domain", "since", "until", "probing", "held"))
    if not (isinstance(domain, str) and 0 < len(domain) <= MAX_DOMAIN
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (since, until))
            and isinstance(probing, bool) and _is_int(held)):
        raise ProtocolError("admin answer with a bad dead destination")
    assert isinstance(since, (int, float)) and isinstance(until, (int, float))
    assert isinstance(held, int)
    return DeadDestination(domain, float(since), float(until), probing, held)


def decode_answer(payload: bytes) -> AdminAnswer:
    if len(payload) > MAX_ADMIN_ANSWER:
        raise ProtocolError("admin answer too long")
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        raise ProtocolError("admin answer is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("admin answer is not a JSON object")
    if "deliveries" in obj:
        deliveries, counts = obj.get("deliveries"), obj.get("counts")
        if not isinstance(deliveries, list) or not isinstance(counts, dict):
            raise ProtocolError("admin answer with bad activity")
        if set(counts) != set(_COUNTS) or not all(_is_int(counts[k]) for k in _COUNTS):
            raise ProtocolError("admin answer with bad counts")
        dead = obj.get("dead", [])
        if not isinstance(dead, list):
            raise ProtocolError("admin answer with bad dead destinations")
        return QueueActivity(tuple(_delivery(d) for d in deliveries),
                             tuple((k, int(counts[k])) for k in _COUNTS),
                             tuple(_dead(d) for d in dead))
    ok = obj.get("ok")
    if ok is True and _is_int(obj.get("removed")):
        return Removed(int(obj["removed"]))
    if ok is False and isinstance(obj.get("error"), str):
        return AdminRefusal(str(obj["error"])[:MAX_ERROR_TEXT])
    raise ProtocolError("admin answer of no known kind")
