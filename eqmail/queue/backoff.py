"""Per-destination back-off: a dead site costs one connection attempt per period (pure).

qmail has only tcpto, which remembers single addresses that timed out; with a dead
destination every due message is still handed to remote delivery, which tries (and
fails) on its own.  Postfix instead marks the destination dead and sends nothing there
until its back-off expires, then lets one delivery probe it.  This module is that
policy, as data: no I/O, no clock of its own (every call gets ``now``).

A destination is a recipient domain as the scanner sees it (lower case, after
rewriting).  The facts come from delivery reports (eqmail.ipc.delivery.Site):

* UNREACHABLE (no connection to any host of the domain, or its DNS failed
  temporarily): a domain not yet dead becomes dead for ``initial`` seconds; the probe's
  UNREACHABLE doubles the period, up to ``cap`` (Postfix's minimal_backoff_time and
  maximal_backoff_time, 300 s and 4000 s).  Reports of deliveries that were already
  running when the domain was marked change nothing.
* anything else for that domain (a success, a failure, a deferral after a server was
  reached): the domain is alive, its back-off ends at once.

While dead, :meth:`admit` holds the domain's deliveries; once the period has expired it
admits exactly one, the probe, and holds the others until the probe's report.  A probe
whose report never comes (its delivery worker died: the scanner abandons the
probe that told nothing, :meth:`abandon`) cannot wedge the domain.  ``clear``
forgets everything (``eqmailctl queue flush``, as qmail-tcpok clears tcpto).

The per-message schedule stays qmail's (eqmail.queue.schedule): a held delivery is
simply not attempted at that pass and the message keeps its retry times.  On a
message's last pass (queuelifetime) a held recipient is not tried either: it bounces at
that pass, with the domain's last UNREACHABLE text (Postfix's "delivery temporarily
suspended"), so back-off never delays or advances a bounce.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from eqmail.ipc.delivery import Site

INITIAL = 300.0  # Postfix's minimal_backoff_time
CAP = 4000.0  # Postfix's maximal_backoff_time


class Admission(enum.Enum):
    GO = "go"  # the domain is not known to be dead
    PROBE = "probe"  # dead, period over: this delivery is the one probe
    HOLD = "hold"  # dead: do not try now


@dataclass
class Dead:
    """One dead destination."""

    since: float
    until: float  # end of the current period
    period: float
    text: str  # the last UNREACHABLE report's text, for logs and a dying message's bounce
    probing: bool = False  # the probe is running


@dataclass(frozen=True)
class DeadView:
    domain: str
    since: float
    until: float
    probing: bool


class Backoff:
    def __init__(self, initial: float = INITIAL, cap: float = CAP) -> None:
        if not 0 < initial <= cap:
            raise ValueError("back-off: need 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.dead: dict[str, Dead] = {}

    def admit(self, domain: str, now: float) -> Admission:
        """May a delivery to ``domain`` start now?  PROBE marks it as the probe."""
        d = self.dead.get(domain)
        if d is None:
            return Admission.GO
        if d.probing or now < d.until:
            return Admission.HOLD
        d.probing = True
        return Admission.PROBE

    def holds(self, domain: str, now: float) -> bool:
        """Would :meth:`admit` hold ``domain`` now?  (Without taking the probe.)"""
        d = self.dead.get(domain)
        return d is not None and (d.probing or now < d.until)

    def report(self, domain: str, site: Site, now: float, text: str = "",
               probe: bool = False) -> bool | None:
        """A delivery to ``domain`` ended (``probe``: the one :meth:`admit` let through).
        True: the domain just became dead (or stays dead after its probe); False: a
        dead domain just came back; None: no change."""
        d = self.dead.get(domain)
        if site is Site.UNREACHABLE:
            if d is None:
                self.dead[domain] = Dead(now, now + self.initial, self.initial, text)
                return True
            if not (probe and d.probing):
                return None  # started before the domain was marked: nothing new
            d.period = min(d.period * 2, self.cap)
            d.until = now + d.period
            d.probing = False
            d.text = text or d.text
            return True
        if d is None:
            return None
        del self.dead[domain]
        return False

    def abandon(self, domain: str) -> None:
        """The probe ended without telling anything (its delivery worker died, the
        request never reached it): the next delivery may probe."""
        d = self.dead.get(domain)
        if d is not None:
            d.probing = False

    def clear(self) -> list[str]:
        """Forget every dead destination; returns their names."""
        names = list(self.dead)
        self.dead.clear()
        return names

    def text(self, domain: str) -> str:
        d = self.dead.get(domain)
        return d.text if d is not None else ""

    def expiries(self) -> list[tuple[str, float]]:
        """(domain, end of period) of each dead domain waiting for its probe."""
        return [(name, d.until) for name, d in self.dead.items() if not d.probing]

    def view(self) -> tuple[DeadView, ...]:
        return tuple(DeadView(name, d.since, d.until, d.probing)
                     for name, d in sorted(self.dead.items()))


def domain_of(address: str) -> str:
    """The destination of a remote recipient: its domain, in lower case."""
    return address.rpartition("@")[2].lower()
