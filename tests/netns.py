"""Network namespaces for tests that need hosts of their own (port 25 on addresses that
are not this machine's, so qmail's "am I an MX" rule sees other hosts).

:func:`pair` makes two namespaces — "client" (where the delivery workers run) and
"peer" (where DNS, HTTPS and SMTP receivers listen) — joined by a veth pair, each held
open by a ``sleep`` in ``unshare --net``, and removes them at the end.  :func:`in_netns`
runs a block in a namespace (sockets made there stay there); :func:`sh` runs commands
there (``ip addr ...``).  Needs root and unshare; nothing leaves the machine.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

CLONE_NEWNET = 0x40000000


@contextmanager
def in_netns(pid: int | None) -> Iterator[None]:
    """Run the block (in this thread) inside the network namespace of ``pid`` (None:
    where we are)."""
    if pid is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def sh(pid: int, *cmds: str) -> None:
    for cmd in cmds:
        subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "sh", "-c", cmd], check=True)


@contextmanager
def pair(client_cmds: Sequence[str], peer_cmds: Sequence[str],
         seconds: int = 900) -> Iterator[tuple[int, int]]:
    """(client pid, peer pid): two new namespaces, a veth ``v0`` (client) – ``v1``
    (peer) between them, lo up in both, then ``client_cmds`` and ``peer_cmds`` (the
    addresses).  Skips the test when namespaces cannot be made."""
    host_ns = os.stat("/proc/self/ns/net").st_ino
    holders = [subprocess.Popen(["unshare", "--net", "sleep", str(seconds)]) for _ in range(2)]
    try:
        client, peer = (h.pid for h in holders)
        for pid in (client, peer):  # never configure the host's own namespace
            for _ in range(100):
                if os.stat(f"/proc/{pid}/ns/net").st_ino != host_ns:
                    break
                time.sleep(0.01)
            else:
                pytest.skip("could not create a network namespace")
        sh(client, f"ip link add v0 type veth peer name v1 netns {peer}", "ip link set lo up",
           "ip link set v0 up", *client_cmds)
        sh(peer, "ip link set lo up", "ip link set v1 up", *peer_cmds)
        yield client, peer
    finally:
        for h in holders:
            h.kill()
            h.wait()
