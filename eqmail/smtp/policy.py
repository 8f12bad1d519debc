"""Relay and sender policy matchers used by the SMTP session: rcpthosts and badmailfrom.

Owns: qmail's rcpthosts rule (exact domain or a ``.suffix`` line, case-insensitive, the
domain being what follows the *last* ``@``; morercpthosts uses the same rule) and
eQmail's badmailfrom rule (exact address, ``@domain``, and every dot-suffix
``.domain``), reference/qmail-core.md §5.1 and eqmail-features.md §1.

Inputs: the lines of the control files (already read by eqmail.control; this module
opens no file).  Outputs: frozen matchers the session queries.  Pure, never raises.

eqmail is stricter than qmail: a missing rcpthosts must not make an open relay.  The
caller then builds the matcher from ``locals`` and the domains of ``virtualdomains``
with :meth:`RcptHosts.from_lines` — the session only ever sees a matcher.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def _suffixes(domain: str) -> Iterable[str]:
    """``a.b.c`` -> ``.b.c``, ``.c`` (every suffix starting at a dot, longest first)."""
    start = domain.find(".")
    while start >= 0:
        yield domain[start:]
        start = domain.find(".", start + 1)


@dataclass(frozen=True)
class RcptHosts:
    """Domains we accept mail for (rcpthosts + morercpthosts, or locals + virtualdomains)."""

    entries: frozenset[str]

    @classmethod
    def from_lines(cls, *sources: Iterable[str]) -> RcptHosts:
        """Build from any number of line lists.  Lines are lowercased; empty lines and
        ``#`` comments are dropped (control-file rules).  A virtualdomains line may be
        passed whole: anything from the first ``:`` on is ignored, and ``user@domain``
        entries (which name one address, not a domain) are skipped."""
        entries: set[str] = set()
        for source in sources:
            for raw in source:
                line = raw.strip().lower()
                if not line or line.startswith("#"):
                    continue
                line = line.split(":", 1)[0]
                if line and "@" not in line:
                    entries.add(line)
        return cls(frozenset(entries))

    def allows(self, address: str) -> bool:
        """True when ``address`` may be accepted as a recipient without RELAYCLIENT.
        Addresses without ``@`` always pass (qmail-send qualifies them locally)."""
        at = address.rfind("@")
        if at < 0:
            return True
        domain = address[at + 1:].lower()
        if domain in self.entries:
            return True
        return any(suffix in self.entries for suffix in _suffixes(domain))


@dataclass(frozen=True)
class BadMailFrom:
    """Senders refused at RCPT time (``553 ... badmailfrom list``)."""

    entries: frozenset[str] = frozenset()

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> BadMailFrom:
        entries = set()
        for raw in lines:
            line = raw.strip().lower()
            if line and not line.startswith("#"):
                entries.add(line)
        return cls(frozenset(entries))

    def matches(self, sender: str) -> bool:
        """Exact address, ``@domain`` and eQmail's ``.domain`` (any parent domain).
        Case-insensitive, as qmail's constmap is."""
        if not self.entries:
            return False
        sender = sender.lower()
        if sender in self.entries:
            return True
        at = sender.rfind("@")
        if at < 0:
            return False
        domain = sender[at + 1:]
        if "@" + domain in self.entries:
            return True
        return any(suffix in self.entries for suffix in _suffixes(domain))
