"""qmail-send's recipient rewriting (qmail-core §1.5), pure.

Order: add ``@envnoathost`` when there is no ``@``; percenthack; exact ``locals`` match
-> local; virtualdomains (whole address, domain, each dot-suffix, then the empty key;
an empty prepend means "not virtual"); otherwise remote.  Lookups are case-insensitive.
Also the VERP sender expansion applied when a delivery starts (senderadd).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from eqmail.control.values import domain_lookup
from eqmail.queue.schedule import Channel

if TYPE_CHECKING:
    from eqmail.control import Controls


@dataclass(frozen=True)
class RewriteRules:
    envnoathost: str
    locals: frozenset[str]
    virtualdomains: tuple[tuple[str, str], ...]
    percenthack: frozenset[str] = frozenset()

    @classmethod
    def from_controls(cls, c: Controls) -> RewriteRules:
        """The rules of a control directory: the scanner's, and the RCPT check's."""
        return cls(c.envnoathost, c.locals, c.virtualdomains, c.percenthack)

    def vmap(self) -> dict[str, str]:
        # first line wins, as constmap does
        table: dict[str, str] = {}
        for key, value in self.virtualdomains:
            table.setdefault(key.lower(), value)
        return table


def rewrite(addr: str, rules: RewriteRules, vmap: dict[str, str] | None = None) -> tuple[Channel, str]:
    if "@" not in addr:
        addr = f"{addr}@{rules.envnoathost}"
    local, _, domain = addr.rpartition("@")
    while domain.lower() in rules.percenthack and "%" in local:
        i = local.rfind("%")
        local, domain = local[:i], local[i + 1 :]
        addr = f"{local}@{domain}"
    if domain.lower() in rules.locals:
        return Channel.LOCAL, addr
    table = rules.vmap() if vmap is None else vmap
    prepend = _virtual_lookup(addr, domain, table)
    if prepend:
        return Channel.LOCAL, f"{prepend}-{addr}"
    return Channel.REMOTE, addr


def _virtual_lookup(addr: str, domain: str, table: dict[str, str]) -> str | None:
    """virtualdomains: the whole address first, then the domain as smtproutes looks hosts up."""
    found = table.get(addr.lower())
    return found if found is not None else domain_lookup(table, domain)


def strip_virtual_prepend(addr: str, rules: RewriteRules, vmap: dict[str, str] | None = None) -> str:
    """qmail-send's stripvdomprepend for bounce notes: ``prepend-user@dom`` -> ``user@dom``
    when ``prepend`` is the virtualdomains value for ``dom``."""
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr
    table = rules.vmap() if vmap is None else vmap
    prepend = _virtual_lookup(addr.split("-", 1)[-1] if "-" in local else addr, domain, table)
    if prepend and local.startswith(prepend + "-"):
        return addr[len(prepend) + 1 :]
    return addr


def verp_sender(sender: str, recipient: str) -> str:
    """senderadd: ``pre@host-@[]`` + ``box@domain`` -> ``prebox=domain@host``."""
    if not sender.endswith("-@[]") or "@" not in recipient:
        return sender
    base = sender[: -len("-@[]")]
    pre, at, host = base.rpartition("@")
    if not at:
        return sender
    box, _, domain = recipient.rpartition("@")
    return f"{pre}{box}={domain}@{host}"
