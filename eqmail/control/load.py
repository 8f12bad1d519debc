"""Loading: the whole control directory into one :class:`Controls`, or qmail-inject's five files.

Every file is read and parsed once, here (the one-line files by their row in the
table of eqmail.control.files, the others by eqmail.control.parsers), and the values
go into one constructor call that names every field.  Where qmail silently keeps a
default for a value it cannot parse (a non-numeric ``databytes``), eqmail refuses the
whole configuration and names the file and line (``control/databytes:1: not a
number``) — see docs/compatibility.md.

Failure modes: :class:`ControlErrors` listing every bad file:line (never just the
first), an OSError other than "file absent" reported as ``control/<name>:0:
unreadable: ...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eqmail.control import parsers as p
from eqmail.control.ciphers import client_ciphers_ok, server_ciphers_ok
from eqmail.control.dkimsign import parse_dkimsign
from eqmail.control.listen import parse_listen
from eqmail.control.reader import Reader
from eqmail.control.values import Controls
from eqmail.errors import ControlErrors


def load_controls(root: Path) -> Controls:
    """Parse the whole control directory of the instance at ``root``.

    Raises :class:`ControlErrors` with every problem found (never just the first)."""
    r = Reader(Path(root))
    me = r.line("me")
    if not me:
        r.error("me", 0, "missing: run 'eqmailctl setup'")
        me = ""
    locals_ = r.hostlist("locals")
    tcp_smtp = r.raw("tcp.smtp") or ""
    listen = parse_listen(r)
    warnings: list[str] = []
    c = Controls(
        root=Path(root),
        me=me,
        badmailfrom=r.stripped("badmailfrom"),
        bouncefrom=r.text("bouncefrom"),
        bouncehost=r.text("bouncehost", me),
        concurrencylocal=r.number("concurrencylocal"),
        concurrencyremote=r.number("concurrencyremote"),
        databytes=r.number("databytes"),
        defaultdomain=r.text("defaultdomain", me),
        defaulthost=r.text("defaulthost", me),
        defaultdelivery=p.parse_defaultdelivery(r),
        doublebouncehost=r.text("doublebouncehost", me),
        doublebounceto=r.text("doublebounceto"),
        envnoathost=r.text("envnoathost", me),
        helohost=r.text("helohost", me),
        idhost=r.text("idhost", me),
        localiphost=r.text("localiphost", me),
        locals=frozenset(locals_ if locals_ is not None else ([me.lower()] if me else [])),
        morercpthosts=r.hostlist("morercpthosts") or (),
        percenthack=frozenset(r.hostlist("percenthack") or ()),
        plusdomain=r.text("plusdomain", me),
        queuelifetime=r.number("queuelifetime"),
        rcpthosts=r.hostlist("rcpthosts"),
        smtpgreeting=r.text("smtpgreeting", me),
        smtproutes=p.parse_smtproutes(r),
        timeoutconnect=r.number("timeoutconnect"),
        timeoutprogram=r.number("timeoutprogram"),
        timeoutremote=r.number("timeoutremote"),
        timeoutsmtpd=max(1, r.number("timeoutsmtpd")),  # qmail-smtpd: <= 0 means 1 second
        virtualdomains=p.parse_virtualdomains(r),
        listen=listen,
        dnsservers=p.parse_dnsservers(r),
        spptimeout=r.number("spptimeout"),
        logfile=r.text("logfile"),
        logformat=p.parse_logformat(r),
        tcp_smtp=tcp_smtp,
        rcptchecklocal=r.number("rcptchecklocal"),
        bouncemaxbytes=r.number("bouncemaxbytes"),
        bouncelimit=r.number("bouncelimit"),
        concurrencyperclient=r.number("concurrencyperclient"),
        concurrencyperclientrelay=r.number("concurrencyperclientrelay"),
        mindatarate=r.number("mindatarate"),
        maxrcpt=r.number("maxrcpt"),
        smtperrorsoftlimit=r.number("smtperrorsoftlimit"),
        smtperrorhardlimit=r.number("smtperrorhardlimit"),
        smtperrorsleep=r.number("smtperrorsleep"),
        smtpjunklimit=r.number("smtpjunklimit"),
        authcheck=r.number("authcheck"),
        authservid=p.parse_authservid(r, me),
        dmarcreject=p.parse_dmarcreject(r),
        authtimeout=r.number("authtimeout"),
        dnssec=r.number("dnssec"),
        mtasts=r.number("mtasts"),
        tlsca=(r.root / "control" / "tlsca.pem").is_file(),
        tlsclientciphers=p.parse_cipher_list(r, "tlsclientciphers", client_ciphers_ok),
        tlsserverciphers=p.parse_cipher_list(r, "tlsserverciphers", server_ciphers_ok),
        clientcert=(r.root / "control" / "clientcert.pem").is_file(),
        tlshosts=frozenset(n[:-4].lower() for n in p.dir_names(r, "tlshosts") if n.endswith(".pem")),
        tlshosts_exhaustive=(r.root / "control" / "tlshosts" / "exhaustivelist").exists(),
        notlshosts=frozenset(n.lower() for n in p.dir_names(r, "notlshosts")),
        beforemote=r.stripped("beforemote"),
        tcprules=p.parse_tcprules(r, listen, tcp_smtp),
        assign=p.parse_assign(r),
        authlimit=p.parse_authlimit(r, warnings),
        tlsclients=p.parse_tlsclients(r),
        tlsfiles=p.stamp_tlsfiles(r),
        dkimsign=parse_dkimsign(r),
        srs=r.number("srs"),
        srsdomain=r.text("srsdomain", me),
        srssecrets=p.parse_srssecrets(r, warnings),
        srsexclude=r.hostlist("srsexclude") or (),
        warnings=tuple(warnings),
        sources=dict(r.sources),
    )
    if r.errors:
        raise ControlErrors(r.errors)
    return c


@dataclass(frozen=True)
class InjectControls:
    """The five files qmail-inject reads; nothing else may stop local injection."""

    me: str
    defaultdomain: str
    defaulthost: str
    plusdomain: str
    idhost: str


def load_inject_controls(root: Path) -> InjectControls:
    """Like qmail-inject: only me, defaultdomain, defaulthost, plusdomain and idhost are
    read, so a broken unrelated file (say databytes) does not stop local mail."""
    r = Reader(Path(root))
    me = r.line("me") or ""
    values = InjectControls(me, r.text("defaultdomain", me), r.text("defaulthost", me),
                            r.text("plusdomain", me), r.text("idhost", me))
    if r.errors:
        raise ControlErrors(r.errors)
    return values
