"""The messages of run/status.sock (eqmailctl and monitors -> supervisor).

The socket is line-based, not framed, so that a person with socat can ask too:

  client -> supervisor  :class:`StatusRequest`: the line ``status\\n``
  supervisor -> client  :class:`StatusAnswer`: the report as one JSON object on one
                        line (eqmail.supervisor.status.supervisor_report builds it),
                        at most MAX_STATUS_ANSWER bytes; the supervisor then closes

The answer's fields are checked on encoding and decoding: the top-level ones
eqmailctl's commands act on, and the minimum the design card promises for
``eqmailctl status --json`` (each worker's kind, pid, uid, state and title, each
listener's service, address and port, the queue's messages and todo counts).  The
command then prints the object as it came.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eqmail.ipc.framing import ProtocolError

MAX_STATUS_REQUEST = 64
MAX_STATUS_ANSWER = 1 << 20
_REQUEST = b"status\n"

# field -> the JSON types it may have; every one must be present
_REQUIRED: dict[str, tuple[type, ...]] = {
    "running": (bool,), "pid": (int,), "generation": (int,), "workers": (list,),
    "listeners": (list,), "queue": (dict,),
}
# present in a running supervisor's report
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "uptime": (int, float), "last_reload": (dict, type(None)), "stopping": (bool,),
    "log": (dict,),
}


@dataclass(frozen=True)
class StatusRequest:
    """The one request there is.  The supervisor reads at most MAX_STATUS_REQUEST bytes
    of it; anything else than ``status`` (with or without its line end) is refused."""

    def encode(self) -> bytes:
        return _REQUEST

    @classmethod
    def decode(cls, payload: bytes) -> StatusRequest:
        if payload.rstrip(b"\r\n") != b"status":
            raise ProtocolError("unknown status request")
        return cls()


# the design card's minimum of each worker and listener entry, and of the queue counts
_WORKER: dict[str, tuple[type, ...]] = {
    "kind": (str,), "pid": (int,), "uid": (int,), "state": (str,), "title": (str,)}
_LISTENER: dict[str, tuple[type, ...]] = {"service": (str,), "address": (str,), "port": (int,)}
_QUEUE: dict[str, tuple[type, ...]] = {"messages": (int,), "todo": (int,)}


def _fields(obj: Any, required: dict[str, tuple[type, ...]],
            optional: Mapping[str, tuple[type, ...]], what: str) -> None:
    """ProtocolError unless ``obj`` is an object with every required field, and every
    field named here present is of its types (a bool is no int)."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"status answer with a bad {what}")
    for fields, needed in ((required, True), (optional, False)):
        for name, types in fields.items():
            if name not in obj:
                if needed:
                    raise ProtocolError(f"status answer without {what} {name}")
                continue
            value = obj[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ProtocolError(f"status answer with a bad {what} {name}")


def _check(report: Mapping[str, Any]) -> None:
    _fields(report, _REQUIRED, _OPTIONAL, "report")
    for worker in report["workers"]:
        _fields(worker, _WORKER, {}, "worker")
    for listener in report["listeners"]:
        _fields(listener, _LISTENER, {}, "listener")
    if report["running"]:
        _fields(report["queue"], _QUEUE, {}, "queue")
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
               for k, v in report["queue"].items()):
        raise ProtocolError("status answer with bad queue counts")


@dataclass(frozen=True)
class StatusAnswer:
    """The supervisor's report: a JSON object (see supervisor_report for its fields)."""

    report: Mapping[str, Any]

    @property
    def running(self) -> bool:
        return bool(self.report["running"])

    def as_dict(self) -> dict[str, Any]:
        """A copy for the caller to add to (eqmailctl adds the scanner's deliveries)."""
        return json.loads(json.dumps(self.report))  # type: ignore[no-any-return]

    def encode(self) -> bytes:
        _check(self.report)
        data = json.dumps(self.report).encode() + b"\n"
        if len(data) > MAX_STATUS_ANSWER:
            raise ProtocolError("status answer too long")
        return data

    @classmethod
    def decode(cls, payload: bytes) -> StatusAnswer:
        if len(payload) > MAX_STATUS_ANSWER:
            raise ProtocolError("status answer too long")
        try:
            report = json.loads(payload)
        except (ValueError, RecursionError):
            raise ProtocolError("status answer is not JSON") from None
        if not isinstance(report, dict):
            raise ProtocolError("status answer is not a JSON object")
        _check(report)
        return cls(report)
