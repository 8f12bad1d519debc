"""This machine's addresses (qmail's ipme): one implementation, every address."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from eqmail.netif import local_addresses


def test_local_addresses_has_loopback_and_the_wildcards() -> None:
    me = local_addresses()
    assert {"127.0.0.1", "::1", "0.0.0.0", "::"} <= me
    assert all("%" not in a for a in me)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_secondary_ipv4_addresses_are_mine_too() -> None:
    """A second IPv4 address on one interface has no label; the ioctls qmail-style code
    used did not see it.  Checked in a network namespace of the test's own."""
    ns = f"eqm-netif-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def ip(*args: str) -> None:
            subprocess.run(["ip", "-n", ns, *args], check=True)
        ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ip("addr", "add", "10.250.1.1/24", "dev", "d0")
        ip("addr", "add", "10.250.1.2/24", "dev", "d0")  # secondary: same subnet, no label
        ip("addr", "add", "fd55::7/64", "dev", "d0", "nodad")
        ip("link", "set", "d0", "up")
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c",
             "from eqmail.netif import local_addresses; print(sorted(local_addresses()))"],
            check=True, capture_output=True, text=True).stdout
        assert "'10.250.1.1'" in out and "'10.250.1.2'" in out and "'fd55::7'" in out, out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
