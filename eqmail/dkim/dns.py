"""DNS for DKIM: the TXT lookup the rest of the package is handed, and its two errors.

Everything else in eqmail.dkim takes a :data:`TxtLookup` (a function: record name ->
the TXT records at that name, each record's strings joined into one bytes value) and
never touches the network.  :func:`dnspython_txt_lookup` builds the real one on dnspython
with the resolvers of control/dnsservers and a bounded time; it is the one module of
eqmail.dkim allowed to open sockets (tests/unit/test_layers.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver


class DnsTempError(Exception):
    """A lookup that may succeed later (timeout, SERVFAIL)."""


class DnsPermError(Exception):
    """No such record, or an answer that can never be used."""


TxtLookup = Callable[[str], list[bytes]]


def _server(text: str) -> tuple[str, int]:
    """ADDRESS, ADDRESS:PORT or [IPv6]:PORT (control/dnsservers' forms) -> (ip, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return str(ipaddress.ip_address(host)), int(port)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return str(ipaddress.ip_address(host)), int(port)
    return str(ipaddress.ip_address(text)), 53


def dnspython_txt_lookup(servers: tuple[str, ...], timeout: float) -> TxtLookup:
    """A :data:`TxtLookup` asking ``servers`` (ADDRESS[:PORT] each; none: the system's
    resolvers), each lookup bounded by ``timeout`` seconds in all.

    NXDOMAIN and "no TXT record" raise :class:`DnsPermError`; a timeout, SERVFAIL from
    every server, a malformed answer or no usable resolver raise :class:`DnsTempError`.
    """
    parsed = tuple(_server(s) for s in servers)

    def lookup(name: str) -> list[bytes]:
        try:
            res = dns.resolver.Resolver(configure=not parsed)
        except dns.exception.DNSException as e:  # no resolv.conf, no nameservers
            raise DnsTempError(f"no DNS resolver: {e}") from None
        if parsed:
            res.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in parsed]
        res.use_edns(0, 0, 1232)
        res.timeout = timeout
        try:
            answer = res.resolve(name, dns.rdatatype.TXT, search=False, lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as e:
            raise DnsPermError(f"{name}: {e}") from None
        except (dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.EmptyLabel) as e:
            raise DnsPermError(f"{name}: {e}") from None
        except (dns.exception.DNSException, OSError, ValueError) as e:
            # dns.resolver.LifetimeTimeout, NoNameservers (SERVFAIL everywhere), bad answers
            raise DnsTempError(f"{name}: {e}") from None
        return [b"".join(rdata.strings) for rdata in answer]

    return lookup
