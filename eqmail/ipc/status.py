"""The messages of run/status.sock (eqmailctl and monitors -> supervisor).

The socket is line-based, not framed, so that a person with socat can ask too:

  client -> supervisor  :class:`StatusRequest`: the line ``status\\n``
  supervisor -> client  :class:`StatusAnswer`: the report as one JSON object on one
                        line (eqmail.supervisor.status.supervisor_report builds it),
                        at most MAX_STATUS_ANSWER bytes; the supervisor then closes

The answer's fields that eqmailctl's commands act on are checked on decoding (their
types), and ``eqmailctl status --json`` prints the object as it came.
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


def _check(report: Mapping[str, Any]) -> None:
    for fields, required in ((_REQUIRED, True), (_OPTIONAL, False)):
        for name, types in fields.items():
            if name not in report:
                if required:
                    raise ProtocolError(f"status answer without {name}")
                continue
            value = report[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ProtocolError(f"status answer with a bad {name}")
    if not all(isinstance(w, dict) for w in report["workers"]) or not all(
            isinstance(lst, dict) for lst in report["listeners"]):
        raise ProtocolError("status answer with a bad worker or listener")
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
