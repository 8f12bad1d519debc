"""control/listen: one listener per line (DESIGN §3), parsed into :class:`ListenerSpec`.

Syntax: ``SERVICE ADDRESS:PORT [OPTION ...]`` with shell quoting; SERVICE is smtp,
submission or smtps; an IPv6 address is bracketed; an option is ``NAME=value`` — upper
case names (and TCP*) are environment variables for the session, the lower case ones
are concurrency, processes, checkpassword, clientcert, rules and proxy.  The option
defaults are the ListenerSpec field defaults (written there only).  Without the file:
smtp on 0.0.0.0 and :: port 25 (root), or 127.0.0.1 and ::1 port 2525.

``proxy=ADDR[,ADDR...]`` (each an IPv4 or IPv6 address or CIDR prefix, host bits zero)
names the load balancers trusted to send a PROXY protocol header (v1 or v2) first on
that listener; the listener then serves only them (eqmail.workers.listener).  It is
parsed here into :class:`TrustedNet` values, the only form the listener sees.

Pure apart from :func:`default_listeners` asking for the effective uid.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
from dataclasses import dataclass, replace

from eqmail.control.ciphers import server_ciphers_ok
from eqmail.control.reader import Reader

LISTEN_SERVICES = ("smtp", "submission", "smtps")


@dataclass(frozen=True)
class TrustedNet:
    """One ``proxy=`` entry: an IPv4 or IPv6 prefix as integers (a plain eqmail
    dataclass, so a Controls pickled for a reload carries it; eqmail.ipc.config)."""

    version: int  # 4 or 6
    network: int  # the prefix's address as an integer, host bits zero
    prefixlen: int

    @classmethod
    def parse(cls, text: str) -> TrustedNet:
        """``ADDR`` or ``ADDR/LEN``; ValueError naming the entry otherwise."""
        if "%" in text:
            raise ValueError(f"proxy: {text!r} has a zone index")
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            if "host bits set" in str(e):
                raise ValueError(f"proxy: {text!r} has host bits set") from None
            raise ValueError(f"proxy: {text!r} is not an IP address or prefix") from None
        return cls(net.version, int(net.network_address), net.prefixlen)

    def __contains__(self, ip: object) -> bool:
        """Whether the peer address ``ip`` (text) is in this prefix; an IPv4-mapped
        IPv6 peer (a dual-stack socket) counts as its IPv4 address."""
        if not isinstance(ip, str):
            return False
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.version != self.version:
            return False
        shift = addr.max_prefixlen - self.prefixlen
        return int(addr) >> shift == self.network >> shift

    def __str__(self) -> str:
        kind = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
        net = kind((self.network, self.prefixlen))
        return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


@dataclass(frozen=True)
class ListenerSpec:
    """One line of control/listen (DESIGN §3)."""

    service: str  # smtp | submission | smtps
    address: str  # "0.0.0.0", "::1" (no brackets)
    port: int
    env: tuple[tuple[str, str], ...] = ()
    concurrency: int = 100
    checkpassword: tuple[str, ...] = ()
    rules: str = "tcp.smtp"
    processes: int = 1
    clientcert: bool = True  # clientcert=0: never ask for a client certificate
    # proxy=: the balancers whose PROXY header is read; () means no PROXY protocol
    proxy: tuple[TrustedNet, ...] = ()

    @property
    def family_v6(self) -> bool:
        return ":" in self.address

    @property
    def key(self) -> str:
        """Identity of the socket: what must be rebound when it changes."""
        return f"{self.service} [{self.address}]:{self.port}" if self.family_v6 else (
            f"{self.service} {self.address}:{self.port}"
        )

    def trusts(self, ip: str) -> bool:
        """Whether a connection from ``ip`` may send a PROXY header here."""
        return any(ip in net for net in self.proxy)

    @property
    def display_address(self) -> str:
        return f"[{self.address}]:{self.port}" if self.family_v6 else f"{self.address}:{self.port}"


def split_hostport(text: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` or ``[ADDRESS]:PORT`` with an IP address; ValueError otherwise."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected [ADDRESS]:PORT, got {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected ADDRESS:PORT, got {text!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    return str(ip), int(port_text)


def parse_listen_line(line: str) -> ListenerSpec:
    words = shlex.split(line, comments=True)
    if len(words) < 2:
        raise ValueError("expected SERVICE ADDRESS:PORT [OPTION ...]")
    service, hostport, *options = words
    if service not in LISTEN_SERVICES:
        raise ValueError(f"unknown service {service!r} (smtp, submission, smtps)")
    address, port = split_hostport(hostport)
    if ":" in address and not hostport.startswith("["):
        raise ValueError("IPv6 addresses must be bracketed: [::1]:25")
    spec = ListenerSpec(service, address, port)
    env: list[tuple[str, str]] = []
    for opt in options:
        name, sep, value = opt.partition("=")
        if not sep:
            raise ValueError(f"option {opt!r} is not NAME=value")
        if name.isupper() or name.startswith("TCP"):
            env.append((name, value))
        else:
            spec = _option(spec, name, value)
    if service == "smtps" and "SMTPS" not in dict(env):
        env.append(("SMTPS", "1"))
    return replace(spec, env=tuple(env))


def _option(spec: ListenerSpec, name: str, value: str) -> ListenerSpec:
    """``spec`` with the lower-case option ``name=value`` applied."""
    if name in ("concurrency", "processes"):
        if not value.isdigit() or not 1 <= int(value) <= 10000:
            raise ValueError(f"{name} must be a number 1..10000")
        if name == "concurrency":
            return replace(spec, concurrency=int(value))
        return replace(spec, processes=int(value))
    if name == "checkpassword":
        argv = tuple(shlex.split(value))
        if not argv:
            raise ValueError("checkpassword is empty")
        return replace(spec, checkpassword=argv)
    if name == "clientcert":
        if value not in ("0", "1"):
            raise ValueError("clientcert must be 0 or 1")
        return replace(spec, clientcert=value == "1")
    if name == "rules":
        if "/" in value or value.startswith("."):
            raise ValueError("rules must name a file in control/")
        return replace(spec, rules=value)
    if name == "proxy":
        entries = value.split(",")
        if not value or "" in entries:
            raise ValueError("proxy= needs ADDR[,ADDR...] (addresses or prefixes of load balancers)")
        return replace(spec, proxy=tuple(dict.fromkeys(TrustedNet.parse(e) for e in entries)))
    raise ValueError(f"unknown option {name!r}")


def default_listeners() -> tuple[ListenerSpec, ...]:
    if os.geteuid() == 0:
        return (ListenerSpec("smtp", "0.0.0.0", 25), ListenerSpec("smtp", "::", 25))
    return (ListenerSpec("smtp", "127.0.0.1", 2525), ListenerSpec("smtp", "::1", 2525))


def parse_listen(r: Reader) -> tuple[ListenerSpec, ...]:
    """control/listen; errors name the line (a bad option, unusable TLSCIPHERS, an
    address listed twice)."""
    lines = r.lines("listen")
    if lines is None:
        return default_listeners()
    out: list[ListenerSpec] = []
    seen: set[tuple[str, int]] = set()
    for n, ln in lines:
        try:
            spec = parse_listen_line(ln)
        except ValueError as e:
            r.error("listen", n, str(e))
            continue
        tlsciphers = dict(spec.env).get("TLSCIPHERS")
        if tlsciphers and not server_ciphers_ok(tlsciphers):
            r.error("listen", n, f"TLSCIPHERS: OpenSSL selects no cipher from {tlsciphers!r}")
            continue
        if (spec.address, spec.port) in seen:
            r.error("listen", n, f"{spec.display_address} listed twice")
            continue
        seen.add((spec.address, spec.port))
        out.append(spec)
    return tuple(out)
