"""tcprules source files (control/tcp.smtp): parse, then decide per connection.

Owns: the rule syntax of ucspi-tcp's tcprules, with the IPv6 forms of ucspi-tcp6, and
tcpserver's lookup order.  Parsed once by eqmail.control (``Controls.tcprules``); the listener
matches every accepted connection against it.

Syntax (one rule per line; ``#`` lines and empty lines ignored, no extra spaces)::

    ADDRESS:INSTRUCTION[,VAR="value"[,VAR=value...]]

INSTRUCTION is ``allow`` or ``deny``.  A value may be quoted with any repeated
character (``RELAYCLIENT=""``, ``X=/a,b/``, tcprules' rule: the first character after
``=`` is the quote when the value ends with it), or left bare up to the next comma.
ADDRESS is one of:

- ``1.2.3.4`` (one address), ``1.2.3.`` / ``1.2.`` / ``1.`` (dotted prefix),
  ``1.2.3.4-7`` (range in the last octet: tcprules expands it into single addresses),
  ``1.2.3.0/24`` (CIDR, an eqmail convenience);
- IPv6: ``::1``, ``2001:db8::/32`` (ucspi-tcp6 CIDR), ``2001:db8:`` (leading groups
  ending in ``:``, i.e. ``2001:db8::/32``); any spelling of an address matches;
- ``=host.example.com`` / ``=.example.com`` (by TCPREMOTEHOST, case-insensitive),
  ``=`` (any connection whose host name is known);
- ``info@ADDRESS`` / ``info@=host`` (by TCPREMOTEINFO);
- empty: the default.

Lookup order — tcpserver's, not "first line wins" (ucspi-tcp's tcprules(1) lists it):
``info@ip``, ``info@=host``, the exact ``ip``, ``=host``, IP prefixes longest first,
``=.suffix`` longest first, ``=``, then the empty default.  tcpserver finds these keys in
a cdb where the first line with a given key wins; so do we for duplicates.  IPv4
peers on an IPv6 socket (``::ffff:1.2.3.4``) are matched as IPv4, as ucspi-tcp's IPv6
patch presents them.  No rule matching means allow with no variables (tcpserver
without a matching rule accepts the connection).

Inputs: file text and name.  Outputs: :class:`Rules`, :class:`RuleResult`.
Failure modes: :class:`eqmail.errors.ControlFileError` (file, line, reason) for a line
that cannot be a rule; matching never raises.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from eqmail.errors import ControlFileError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class RuleResult:
    allow: bool
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Table:
    """Rules of one kind of key, first occurrence of a key kept."""

    exact: dict[str, RuleResult] = field(default_factory=dict)   # ip / =host / info@...
    prefixes: dict[IPNetwork, RuleResult] = field(default_factory=dict)

    def add_exact(self, key: str, result: RuleResult) -> None:
        self.exact.setdefault(key, result)

    def add_prefix(self, net: IPNetwork, result: RuleResult) -> None:
        if net.prefixlen == net.max_prefixlen:
            self.add_exact(str(net.network_address), result)
        else:
            self.prefixes.setdefault(net, result)

    def longest_prefix(self, ip: IPAddress) -> RuleResult | None:
        best: tuple[int, RuleResult] | None = None
        for net, result in self.prefixes.items():
            if ip.version == net.version and ip in net:
                if best is None or net.prefixlen > best[0]:
                    best = (net.prefixlen, result)
        return None if best is None else best[1]


class Rules:
    """A parsed tcp.smtp.  Two are equal when they were parsed from the same text of
    the same file (a reload compares configurations)."""

    def __init__(self, filename: str = "", text: str = "") -> None:
        self.filename = filename
        self.text = text
        self._main = _Table()
        self._by_info: dict[str, _Table] = {}
        self._default: RuleResult | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rules):
            return NotImplemented
        return (self.filename, self.text) == (other.filename, other.text)

    def __hash__(self) -> int:
        return hash((self.filename, self.text))

    def __repr__(self) -> str:
        return f"Rules({self.filename!r}, {len(self.text)} characters)"

    def __reduce__(self) -> tuple[Callable[[str, str], Rules], tuple[str, str]]:
        # A reload pushes the parsed configuration to running listeners
        # (eqmail.ipc.config): the rules travel as the text they were parsed from and
        # are parsed again on arrival, so no internal table crosses the boundary.
        return rules_from_text, (self.text, self.filename)

    @classmethod
    def parse(cls, text: str, filename: str) -> Rules:
        rules = cls(filename, text)
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.rstrip("\r")
            if not line.strip() or line.startswith("#"):
                continue
            try:
                rules._add(line)
            except ValueError as exc:
                raise ControlFileError(filename, number, str(exc)) from None
        return rules

    def _add(self, line: str) -> None:
        address, instructions = _split_rule(line)
        result = _instructions(instructions)
        info, at, rest = address.rpartition("@") if "@" in address else ("", "", address)
        if at and not info:
            raise ValueError(f"empty info before @ in {address!r}")
        table = self._by_info.setdefault(info, _Table()) if at else self._main
        if rest == "":
            if at:
                raise ValueError(f"no address after @ in {address!r}")
            if self._default is None:
                self._default = result
        elif rest.startswith("="):
            table.add_exact(rest.lower(), result)
        else:
            for key in _ip_keys(rest):
                if isinstance(key, str):
                    table.add_exact(key, result)
                else:
                    table.add_prefix(key, result)

    def match(self, ip: str, host: str | None = None, info: str | None = None) -> RuleResult:
        """The rule for a connection from ``ip`` (TCPREMOTEIP), with TCPREMOTEHOST
        ``host`` and TCPREMOTEINFO ``info`` when known."""
        addr = _peer(ip)
        key = str(addr) if addr is not None else ip.lower()
        host = host.lower() if host else None
        if info is not None and info in self._by_info:
            table = self._by_info[info]
            found = table.exact.get(key)
            if found is None and host:
                found = table.exact.get("=" + host)
            if found is not None:
                return found
        table = self._main
        found = table.exact.get(key)
        if found is None and host:
            found = table.exact.get("=" + host)
        if found is None and addr is not None:
            found = table.longest_prefix(addr)
        if found is None and host:
            found = _host_suffix(table, host)
        if found is None:
            found = self._default
        return found if found is not None else RuleResult(True, {})


def _host_suffix(table: _Table, host: str) -> RuleResult | None:
    start = host.find(".")
    while start >= 0:
        found = table.exact.get("=" + host[start:])
        if found is not None:
            return found
        start = host.find(".", start + 1)
    return table.exact.get("=")


def _peer(ip: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _split_rule(line: str) -> tuple[str, str]:
    """Find the colon before the instruction; IPv6 addresses contain colons themselves,
    so the split is the first colon followed by ``allow`` or ``deny``."""
    start = 0
    while True:
        colon = line.find(":", start)
        if colon < 0:
            raise ValueError("no ':allow' or ':deny' instruction")
        word = line[colon + 1:].split(",", 1)[0]
        if word in ("allow", "deny"):
            return line[:colon], line[colon + 1:]
        start = colon + 1


def _instructions(text: str) -> RuleResult:
    action, _, rest = text.partition(",")
    env: dict[str, str] = {}
    while rest:
        name, eq, after = rest.partition("=")
        if not eq or not name or not all(c.isalnum() or c == "_" for c in name):
            raise ValueError(f"bad variable setting {rest.split(',', 1)[0]!r}")
        value, rest = _value(after)
        env.setdefault(name, value)
    return RuleResult(action == "allow", env)


def _value(text: str) -> tuple[str, str]:
    """A quoted (any repeated character) or bare value; returns (value, remaining)."""
    if text and not (text[0].isalnum() or text[0] in "@._-"):
        quote = text[0]
        end = text.find(quote, 1)
        if end < 0:
            raise ValueError(f"unterminated value {text!r}")
        value, rest = text[1:end], text[end + 1:]
    else:
        value, _, rest = text.partition(",")
        return value, rest
    if rest and not rest.startswith(","):
        raise ValueError(f"junk after quoted value: {rest!r}")
    return value, rest[1:]


def _ip_keys(text: str) -> list[str | IPNetwork]:
    """Exact keys (normalised address text) or networks for one address field."""
    try:
        if "/" in text:
            return [ipaddress.ip_network(text, strict=False)]
        if ":" in text:
            return [_ipv6(text)]
        return _ipv4(text)
    except ValueError as exc:
        raise ValueError(f"bad address {text!r}: {exc}") from None


def _ipv6(text: str) -> str | IPNetwork:
    if text.endswith(":") and not text.endswith("::"):
        groups = text[:-1].split(":")
        if len(groups) >= 8:
            raise ValueError("too many groups")
        return ipaddress.IPv6Network(f"{text}:/{16 * len(groups)}")
    addr = _peer(text)
    if addr is None:
        raise ValueError("not an IPv6 address")
    return str(addr)


def _ipv4(text: str) -> list[str | IPNetwork]:
    parts = text.split(".")
    if text.endswith("."):
        octets = parts[:-1]
        if not 1 <= len(octets) <= 3:
            raise ValueError("a prefix has one to three octets")
        _octets(octets)
        net = ".".join(octets + ["0"] * (4 - len(octets)))
        return [ipaddress.IPv4Network(f"{net}/{8 * len(octets)}")]
    if len(parts) != 4:
        raise ValueError("an IPv4 address has four octets (a prefix ends with '.')")
    last = parts[3]
    low, dash, high = last.partition("-")
    _octets(parts[:3] + [low] + ([high] if dash else []))
    stem = ".".join(str(int(p)) for p in parts[:3])
    if not dash:
        return [f"{stem}.{int(low)}"]
    if int(low) > int(high):
        raise ValueError("range runs backwards")
    return [f"{stem}.{n}" for n in range(int(low), int(high) + 1)]


def _octets(octets: list[str]) -> None:
    for octet in octets:
        if not octet.isdigit() or int(octet) > 255:
            raise ValueError(f"bad octet {octet!r}")


def rules_from_text(text: str, filename: str) -> Rules:
    """:meth:`Rules.parse` as a plain function: what a pickled Rules is rebuilt with."""
    return Rules.parse(text, filename)
