"""The messages between eqmail's processes, in one package.

Every message that crosses a process boundary is a frozen value with ``encode()`` and
``decode()`` here; ``decode`` checks lengths and fields and raises
:class:`ProtocolError` (and nothing else) for bad bytes.  No module outside this
package builds or parses a payload by hand.

- :mod:`eqmail.ipc.framing`    the frame (type byte, 4-byte length, payload), the bound
  of each frame type, ProtocolError, the read helpers and the SO_PEERCRED peer check.
- :mod:`eqmail.ipc.queue`      run/queue.sock: role hello, body chunks, envelope and the
  writer's answer (qmail-queue's exit code, :class:`~eqmail.ipc.queue.QQExit`);
  qmail-clean's request and answer (scanner -> queue writer).
- :mod:`eqmail.ipc.admin`      run/scanner.sock: status, delete and bounce (eqmailctl -> scanner).
- :mod:`eqmail.ipc.status`     run/status.sock: the status request and the supervisor's
  report (eqmailctl -> supervisor).
- :mod:`eqmail.ipc.logtarget`  supervisor -> logger: where the log goes now.
- :mod:`eqmail.ipc.sandbox`    run/sandbox.sock and run/sandbox-remote.sock: plugin
  sections, checkpassword and before-remote chains (listener / remote worker -> sandbox).
- :mod:`eqmail.ipc.hooks`      the values of a plugin section's result (HookStage,
  HookVerdict, HookOutcome) and the shape rules its texts must meet.
- :mod:`eqmail.ipc.delivery`   run/local.sock and run/remote.sock (scanner <-> delivery
  workers): DeliveryRequest, DeliveryReport with its :class:`~eqmail.ipc.delivery.Verdict`,
  the attach/adopt/detach hand-over frames, and the local spawner's job for its child.
- :mod:`eqmail.ipc.config`     supervisor -> listener: the configuration a reload pushes
  to a listener that keeps running.

The framing names are re-exported here for the modules that only frame bytes.
"""

from __future__ import annotations

from eqmail.ipc.framing import (
    HEADER,
    MAX_FRAME,
    SLOT_MAX,
    ProtocolError,
    accept_from,
    check_header,
    expect,
    frame,
    next_frame,
    peer_uid,
    read_frame_async,
    read_frames,
    read_requests,
    recv_exact,
    recv_frame,
    take_frames,
)

__all__ = ["HEADER", "MAX_FRAME", "SLOT_MAX", "ProtocolError", "accept_from", "check_header",
           "expect", "frame", "next_frame", "peer_uid", "read_frame_async", "read_frames",
           "read_requests", "recv_exact", "recv_frame", "take_frames"]
