"""The parsed configuration: :class:`Controls` and the value types of its fields.

Every field is required: the defaults live in one place, the table of
eqmail.control.files, and eqmail.control.load builds a Controls with one constructor
call naming every field, so mypy checks each value's type.  Attribute names follow the
file names.  Pure data.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from eqmail.authlimit import AuthLimit
from eqmail.control.assign import Assign
from eqmail.control.dkimsign import DkimSignRule
from eqmail.control.listen import ListenerSpec
from eqmail.logformat import LogFormat
from eqmail.srs import SrsKeys
from eqmail.tcprules import Rules

V = TypeVar("V")


@dataclass(frozen=True)
class Route:
    """One smtproutes value: relay host (may be empty = MX lookup), port, credentials."""

    relay: str
    port: int = 25
    user: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file without reading it (a certificate's key
    may be readable by root alone): device, inode, size, modification and change time
    (a chmod or chown changes the last)."""

    name: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


class DmarcAction(enum.StrEnum):
    """control/dmarcreject: what a message gets whose DMARC disposition is ``reject``
    (a failing message of a domain with p=reject, after pct=).  A disposition of
    ``quarantine`` is marked with every value but HEADER, as OpenDMARC with
    RejectFailures quarantines p=quarantine failures instead of rejecting them."""

    HEADER = "header"          # the Authentication-Results field only (default)
    REJECT = "reject"          # 550 5.7.1 at end of DATA, nothing queued
    QUARANTINE = "quarantine"  # delivered with an X-Eqmail-DMARC: quarantine field


def domain_lookup(table: Mapping[str, V], host: str) -> V | None:
    """qmail's lookup of a host in smtproutes and virtualdomains: the host (lowercased),
    then each suffix starting at a dot (``.example.com``), then the empty key."""
    host = host.lower()
    if host in table:
        return table[host]
    i = host.find(".")
    while i >= 0:
        if host[i:] in table:
            return table[host[i:]]
        i = host.find(".", i + 1)
    return table.get("")


@dataclass(frozen=True)
class Controls:
    """The parsed control directory (and users/assign)."""

    root: Path
    me: str
    badmailfrom: tuple[str, ...]
    bouncefrom: str
    bouncehost: str
    concurrencylocal: int
    concurrencyremote: int
    databytes: int
    defaultdomain: str
    defaulthost: str
    defaultdelivery: str
    doublebouncehost: str
    doublebounceto: str
    envnoathost: str
    helohost: str
    idhost: str
    localiphost: str
    locals: frozenset[str]
    morercpthosts: tuple[str, ...]
    percenthack: frozenset[str]
    plusdomain: str
    queuelifetime: int
    rcpthosts: tuple[str, ...] | None
    smtpgreeting: str
    smtproutes: tuple[tuple[str, Route], ...]
    timeoutconnect: int
    timeoutprogram: int
    timeoutremote: int
    timeoutsmtpd: int
    virtualdomains: tuple[tuple[str, str], ...]
    # eqmail additions
    listen: tuple[ListenerSpec, ...]
    dnsservers: tuple[tuple[str, int], ...]
    spptimeout: int
    logfile: str  # empty = stdout
    logformat: LogFormat  # the logger's time stamps
    tcp_smtp: str  # the text of control/tcp.smtp as read, for eqmailctl check only
    tcprules: tuple[Rules, ...]  # every rules file a listener names, parsed (rules_for)
    assign: Assign | None  # users/assign, compiled; None: no such file
    authlimit: AuthLimit  # control/authlimit (eqmail.authlimit; a bad file: defaults + warning)
    tlsclients: frozenset[str]  # control/tlsclients: addresses of certificate relay clients
    tlsfiles: tuple[FileStamp, ...]  # the server TLS files the supervisor loads for listeners
    # (servercert.pem, dh2048.pem, clientca.pem, clientcrl.pem; of tlsclients, whether it exists)
    # remote delivery (eqmail.workers.remote): outbound TLS (eQmail §6), before-remote hook
    tlsclientciphers: str  # control/tlsclientciphers, lines joined with ':'
    tlsserverciphers: str  # control/tlsserverciphers, likewise
    clientcert: bool  # control/clientcert.pem exists
    tlshosts: frozenset[str]  # <name> of every control/tlshosts/<name>.pem
    tlshosts_exhaustive: bool  # control/tlshosts/exhaustivelist exists
    notlshosts: frozenset[str]  # names of the files in control/notlshosts/
    beforemote: tuple[str, ...]  # control/beforemote: one command per line
    # backscatter (eqmail): RCPT check of local recipients, bounce size and rate
    rcptchecklocal: int
    bouncemaxbytes: int
    bouncelimit: int
    # what one SMTP client may take (issue 12; Postfix's smtpd_* defaults)
    concurrencyperclient: int
    concurrencyperclientrelay: int
    mindatarate: int
    maxrcpt: int
    smtperrorsoftlimit: int
    smtperrorhardlimit: int
    smtperrorsleep: int
    smtpjunklimit: int
    # DKIM signing of outgoing mail (issue 16; eqmail.control.dkimsign)
    dkimsign: tuple[DkimSignRule, ...]
    # SRS (eqmail.srs): control/srs, control/srsdomain, control/srssecrets (never in repr)
    srs: int
    srsdomain: str
    srssecrets: tuple[bytes, ...] = field(repr=False)
    srsexclude: tuple[str, ...]  # lower case; ".suffix" entries match subdomains
    # inbound verification (issue 16; the listener, eqmail.workers.smtpconn)
    authcheck: int  # 1: SPF/DKIM/DMARC/ARC + Authentication-Results for non-relay clients
    authservid: str  # the authserv-id (default: me)
    dmarcreject: DmarcAction
    authtimeout: int  # seconds the checks of one message may take
    # outbound TLS policy (issue 17; remote delivery, the MTA-STS policy worker)
    dnssec: int  # 1: the AD bit of control/dnsservers' answers counts (DANE)
    mtasts: int  # 1: MTA-STS policies are fetched and honoured
    tlsca: bool  # control/tlsca.pem exists: CAs added to the system's for MTA-STS
    # problems that do not refuse the configuration (the file's default is used):
    # logged by the worker that uses the file, shown by eqmailctl check
    warnings: tuple[str, ...]
    sources: Mapping[str, str] = field(compare=False, hash=False)  # file -> path it was read from

    def route_for(self, host: str) -> Route | None:
        """smtproutes lookup: the host, each suffix from a dot, then the empty key."""
        return domain_lookup(self._routes, host)

    @functools.cached_property
    def _routes(self) -> dict[str, Route]:
        return dict(self.smtproutes)  # once per configuration, not per delivery

    @functools.cached_property
    def srs_keys(self) -> SrsKeys | None:
        """What forwarding and reversing need; None when SRS is off (control/srs 0) or
        there is no secret — then remote delivery sends the queue's sender unchanged
        and nothing is reversed or refused, as in qmail."""
        if not self.srs or not self.srssecrets:
            return None
        return SrsKeys(self.srssecrets, self.srsdomain or self.me)

    def rules_for(self, fn: str) -> Rules | None:
        """The parsed tcprules file control/``fn`` (a listener's ``rules=``); None when
        it is absent or empty (every connection allowed, no variables)."""
        name = f"control/{fn}"
        return next((rules for rules in self.tcprules if rules.filename == name), None)
