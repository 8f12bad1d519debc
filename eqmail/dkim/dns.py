"""DNS for DKIM: the TXT lookup the rest of the package is handed, and its two errors.

Everything else in eqmail.dkim takes a :data:`TxtLookup` (a function: record name ->
the TXT records at that name, each record's strings joined into one bytes value) and
never touches the network.  :func:`dnspython_txt_lookup` builds the real one on dnspython
with the resolvers of control/dnsservers and a bounded time (eqmail.dns's resolver, the
one remote delivery uses); it is the one module of eqmail.dkim that may reach the network
(tests/unit/test_layers.py).
"""

from __future__ import annotations

from collections.abc import Callable

from eqmail.dns import LookupHard, LookupSoft, Resolver


class DnsTempError(Exception):
    """A lookup that may succeed later (timeout, SERVFAIL)."""


class DnsPermError(Exception):
    """No such record, or an answer that can never be used."""


TxtLookup = Callable[[str], list[bytes]]


def dnspython_txt_lookup(servers: tuple[tuple[str, int], ...], timeout: float) -> TxtLookup:
    """A :data:`TxtLookup` asking ``servers`` (control/dnsservers as parsed:
    ``Controls.dnsservers``), through the resolver remote delivery uses
    (:class:`eqmail.dns.Resolver`), each lookup bounded by ``timeout`` seconds.

    NXDOMAIN, "no TXT record" and an impossible name raise :class:`DnsPermError`; a
    timeout, SERVFAIL from every server or a malformed answer raise :class:`DnsTempError`.
    """
    resolver = Resolver(servers, lifetime=timeout)

    def lookup(name: str) -> list[bytes]:
        try:
            return resolver.txt(name)
        except LookupHard as e:
            raise DnsPermError(f"{name}: {e}") from None
        except LookupSoft as e:
            raise DnsTempError(f"{name}: {e}") from None

    return lookup
