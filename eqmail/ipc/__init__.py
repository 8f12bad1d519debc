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
- :mod:`eqmail.ipc.status`     run/status.sock: the status request and the supervisor's
  report (eqmailctl -> supervisor).
- :mod:`eqmail.ipc.logtarget`  supervisor -> logger: where the log goes now.
- :mod:`eqmail.ipc.sandbox`    run/sandbox.sock and run/sandbox-remote.sock: plugin
  sections, checkpassword and before-remote chains (listener / remote worker -> sandbox).

Delivery sockets (run/local.sock and run/remote.sock, scanner only; eqmail.workers.local
and eqmail.workers.remote), served through eqmail.workers.jobs:
  scanner -> worker  ``D`` delivery request ``slot\\0msgid\\0sender\\0recipient\\0``; the slot
                     names the delivery and comes back in its report.  The scanner's slot
                     is ``msgid.offset`` (the recipient's record in the channel file), a
                     name that stays valid when the scanner is restarted
                     ``A`` attach (empty): "I am the scanner now"
                     ``Q`` detach (empty): a scanner that hands over, before it exits
  worker -> scanner  ``r`` report ``slot\\0`` + K/Z/D + text, exactly one per request
                     ``a`` the slot of a delivery this scanner takes over: still running,
                     or finished with a report nobody has received yet (sent next);
                     answers ``A``, followed by ``e`` (empty) at the end of the list
                     ``q`` (empty) answers ``Q``: nothing more comes on this connection

The framing names are re-exported here for the delivery channel's users.
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
