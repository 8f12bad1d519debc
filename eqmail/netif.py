"""This machine's interface addresses (qmail's ipme), IPv4 and IPv6: the one place that
knows them.

Every address of every interface, secondary IPv4 addresses included (they have no
interface label, so the SIOCGIFCONF/SIOCGIFADDR ioctls miss them), from getifaddrs(3)
through psutil; in the calling process's network namespace.  Plus ``0.0.0.0`` and
``::``, which qmail's ipme also counts as "me" (an MX pointing there is a loop).
Used for localiphost substitution in the SMTP session and for "am I an MX" in remote
delivery.  Never raises: if the interfaces cannot be read, the loopback addresses.
"""

from __future__ import annotations

import ipaddress
import socket

import psutil

_ALWAYS = frozenset({"0.0.0.0", "::"})


def local_addresses() -> frozenset[str]:
    """Every address of this host's interfaces, plus 0.0.0.0 and ::."""
    out: set[str] = set()
    try:
        interfaces = psutil.net_if_addrs()
    except (OSError, RuntimeError):
        return _ALWAYS | {"127.0.0.1", "::1"}
    for addrs in interfaces.values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:  # link-local IPv6 comes as fe80::1%eth0
                out.add(str(ipaddress.ip_address(a.address.split("%", 1)[0])))
            except ValueError:
                continue
    return frozenset(out) | _ALWAYS
