"""This machine's interface addresses (qmail's ipme), IPv4 and IPv6.

IPv4 through the SIOCGIFADDR ioctl for every interface name, IPv6 from
/proc/net/if_inet6; no external command.  Used for localiphost substitution in the SMTP
session and for "am I an MX" in remote delivery.  Never raises: an interface that
cannot be read is skipped.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFADDR = 0x8915


def _ipv4_addresses() -> list[str]:
    out: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)
            except OSError:
                continue
            out.append(socket.inet_ntoa(res[20:24]))
    return out


def _ipv6_addresses() -> list[str]:
    out: list[str] = []
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                out.append(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except (OSError, ValueError, IndexError):
        pass
    return out


def local_addresses() -> list[str]:
    return _ipv4_addresses() + _ipv6_addresses()
