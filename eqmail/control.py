"""Every control file, parsed in one place into one frozen value.

Owns: reading ``<root>/control`` (qmail-core §6, eQmail's additions, eqmail's own files)
and ``users/assign``.  Workers receive a :class:`Controls`; none of them opens control/
itself.  Runs in the supervisor (and in ``eqmailctl`` for validation) — no privileges
needed beyond read access.

qmail's reading rules: single-line files use the first line with trailing spaces and
tabs removed; list files drop empty lines and lines starting with ``#``.  Defaults that
say "me" fall back to control/me.  Where qmail silently keeps a default for a value it
cannot parse (a non-numeric ``databytes``), eqmail refuses the whole configuration and
names the file and line (``control/databytes:1: not a number``) — see
docs/compatibility.md.

Failure modes: :class:`ControlErrors` listing every bad file:line, or an OSError other
than "file absent" reported as ``control/<name>:0: unreadable: ...``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqmail.errors import ControlErrors, ControlFileError
from eqmail.logformat import LogFormat

SPAWN_LIMIT = 120  # conf-spawn: hard cap on concurrent deliveries per channel
MAX_CONTROL_BYTES = 4 * 1024 * 1024  # bounded read of any one control file
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
# Mozilla's "intermediate" TLS 1.2 list (ssl-config.mozilla.org, guideline 5.7):
# ECDHE/DHE key exchange with AEAD ciphers only — no RSA key exchange, no CBC, no SHA-1
# MAC.  TLS 1.3 suites are not set by cipher strings and keep OpenSSL's defaults.
TLS_INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305"))


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

    @property
    def family_v6(self) -> bool:
        return ":" in self.address

    @property
    def key(self) -> str:
        """Identity of the socket: what must be rebound when it changes."""
        return f"{self.service} [{self.address}]:{self.port}" if self.family_v6 else (
            f"{self.service} {self.address}:{self.port}"
        )

    @property
    def display_address(self) -> str:
        return f"[{self.address}]:{self.port}" if self.family_v6 else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Route:
    """One smtproutes value: relay host (may be empty = MX lookup), port, credentials."""

    relay: str
    port: int = 25
    user: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class Controls:
    """The parsed control directory.  Attribute names follow the file names."""

    root: Path
    me: str
    badmailfrom: tuple[str, ...] = ()
    bouncefrom: str = "MAILER-DAEMON"
    bouncehost: str = ""
    concurrencylocal: int = 10
    concurrencyremote: int = 20
    databytes: int = 0
    defaultdomain: str = ""
    defaulthost: str = ""
    defaultdelivery: str = "./Maildir/"
    doublebouncehost: str = ""
    doublebounceto: str = "postmaster"
    envnoathost: str = ""
    helohost: str = ""
    idhost: str = ""
    localiphost: str = ""
    locals: frozenset[str] = frozenset()
    morercpthosts: tuple[str, ...] = ()
    percenthack: frozenset[str] = frozenset()
    plusdomain: str = ""
    queuelifetime: int = 604800
    rcpthosts: tuple[str, ...] | None = None
    smtpgreeting: str = ""
    smtproutes: tuple[tuple[str, Route], ...] = ()
    timeoutconnect: int = 60
    timeoutprogram: int = 1000  # eqmail: seconds a |program may run (Postfix command_time_limit)
    timeoutremote: int = 1200
    timeoutsmtpd: int = 1200
    virtualdomains: tuple[tuple[str, str], ...] = ()
    # eqmail additions
    listen: tuple[ListenerSpec, ...] = ()
    dnsservers: tuple[tuple[str, int], ...] = ()
    spptimeout: int = 30
    logfile: str = ""  # empty = stdout
    logformat: LogFormat = LogFormat.LOCAL  # control/logformat: the logger's time stamps
    tcp_smtp: str = ""  # raw text of control/tcp.smtp, parsed by eqmail.tcprules
    assign: str | None = None  # raw text of users/assign (parsed by eqmail.delivery.users)
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    # remote delivery (eqmail.workers.remote): outbound TLS (eQmail §6), before-remote hook
    tlsclientciphers: str = TLS_INTERMEDIATE_CIPHERS  # control/tlsclientciphers, lines joined with ':'
    tlsserverciphers: str = TLS_INTERMEDIATE_CIPHERS  # control/tlsserverciphers, likewise
    clientcert: bool = False  # control/clientcert.pem exists
    tlshosts: frozenset[str] = frozenset()  # <name> of every control/tlshosts/<name>.pem
    tlshosts_exhaustive: bool = False  # control/tlshosts/exhaustivelist exists
    notlshosts: frozenset[str] = frozenset()  # names of the files in control/notlshosts/
    beforemote: tuple[str, ...] = ()  # control/beforemote: one command per line
    # backscatter (eqmail): RCPT check of local recipients, bounce size and rate
    rcptchecklocal: int = 1  # 1: unknown local recipients get 550 at RCPT; 0: qmail (accept all)
    bouncemaxbytes: int = 50000  # bytes of the original message in a bounce; 0 = all (qmail)
    bouncelimit: int = 20  # bounces per sender address per hour, more are dropped; 0 = no limit
    # what one SMTP client may take (issue 12; Postfix's smtpd_* defaults)
    concurrencyperclient: int = 50  # sessions per IPv4 address / IPv6 /64, all listeners; 0 = no limit
    concurrencyperclientrelay: int = 50  # the same for RELAYCLIENT clients (default: concurrencyperclient)
    mindatarate: int = 500  # DATA bytes/s on average (smtpd_min_data_rate); 0 = no minimum
    maxrcpt: int = 1000  # recipients per message (smtpd_recipient_limit)
    smtperrorsoftlimit: int = 10  # error replies after which each reply waits smtperrorsleep
    smtperrorhardlimit: int = 20  # error replies after which the session gets 421; 0 = never
    smtperrorsleep: int = 1  # seconds (smtpd_error_sleep_time)
    smtpjunklimit: int = 100  # NOOP/RSET/VRFY/HELP without a delivered message; 0 = no limit

    def route_for(self, host: str) -> Route | None:
        """smtproutes lookup: the host, each suffix from a dot, then the empty key."""
        table = dict(self.smtproutes)
        host = host.lower()
        if host in table:
            return table[host]
        i = host.find(".")
        while i >= 0:
            if host[i:] in table:
                return table[host[i:]]
            i = host.find(".", i + 1)
        return table.get("")


# ---------------------------------------------------------------- raw readers


class _Reader:
    """Reads files under control/, remembering where each value came from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.errors: list[ControlFileError] = []
        self.sources: dict[str, str] = {}

    def name(self, fn: str) -> str:
        return f"control/{fn}"

    def raw(self, fn: str, base: str = "control") -> str | None:
        path = self.root / base / fn
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_CONTROL_BYTES + 1)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            return None
        except OSError as e:
            self.errors.append(ControlFileError(f"{base}/{fn}", 0, f"unreadable: {e.strerror}"))
            return None
        if len(data) > MAX_CONTROL_BYTES:
            self.errors.append(ControlFileError(f"{base}/{fn}", 0, "file too large"))
            return None
        self.sources[fn] = str(path)
        return data.decode("utf-8", "surrogateescape")

    def line(self, fn: str) -> str | None:
        text = self.raw(fn)
        if text is None:
            return None
        first = text.split("\n", 1)[0]
        return first.rstrip(" \t\r")

    def lines(self, fn: str) -> list[tuple[int, str]] | None:
        text = self.raw(fn)
        if text is None:
            return None
        out: list[tuple[int, str]] = []
        for n, ln in enumerate(text.split("\n"), 1):
            ln = ln.rstrip(" \t\r")
            if not ln or ln.startswith("#"):
                continue
            out.append((n, ln))
        return out

    def integer(self, fn: str, default: int, lo: int, hi: int) -> int:
        value = self.line(fn)
        if value is None or value == "":
            return default
        text = value.strip()
        # ASCII digits with an optional sign only: Python's int() would also take
        # "1_000" and non-ASCII digits, which no qmail tool reads as that number.
        if not _INTEGER.fullmatch(text):
            self.errors.append(ControlFileError(self.name(fn), 1, f"not a number: {value!r}"))
            return default
        n = int(text)
        if not lo <= n <= hi:
            self.errors.append(ControlFileError(self.name(fn), 1, f"{n} out of range {lo}..{hi}"))
            return default
        return n


# ------------------------------------------------------------ special parsers


def _parse_virtualdomains(r: _Reader) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for n, ln in r.lines("virtualdomains") or []:
        if ":" not in ln:
            r.errors.append(ControlFileError("control/virtualdomains", n, "missing ':'"))
            continue
        key, prepend = ln.split(":", 1)
        out.append((key.lower(), prepend))
    return tuple(out)


def parse_route_value(value: str) -> Route:
    """``relay[:port] [user password]``; relay may be ``[1.2.3.4]`` or ``[2001:db8::1]``."""
    creds = value.split(" ", 2)
    hostport = creds[0]
    user = creds[1] if len(creds) == 3 else None
    password = creds[2] if len(creds) == 3 else None
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError("unterminated '[' in relay")
        relay, rest = hostport[: end + 1], hostport[end + 1 :]
    else:
        relay, _, port_text = hostport.partition(":")
        rest = ":" + port_text if port_text else ""
    port = 25
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit():
            raise ValueError(f"bad port {rest!r}")
        port = int(rest[1:])
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
    return Route(relay=relay, port=port, user=user, password=password)


def _parse_smtproutes(r: _Reader) -> tuple[tuple[str, Route], ...]:
    out: list[tuple[str, Route]] = []
    for n, ln in r.lines("smtproutes") or []:
        if ":" not in ln:
            r.errors.append(ControlFileError("control/smtproutes", n, "missing ':'"))
            continue
        domain, value = ln.split(":", 1)
        try:
            out.append((domain.lower(), parse_route_value(value)))
        except ValueError as e:
            r.errors.append(ControlFileError("control/smtproutes", n, str(e)))
    return tuple(out)


def _split_hostport(text: str) -> tuple[str, int]:
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


LISTEN_SERVICES = ("smtp", "submission", "smtps")


def parse_listen_line(line: str) -> ListenerSpec:
    words = shlex.split(line, comments=True)
    if len(words) < 2:
        raise ValueError("expected SERVICE ADDRESS:PORT [OPTION ...]")
    service, hostport, *options = words
    if service not in LISTEN_SERVICES:
        raise ValueError(f"unknown service {service!r} (smtp, submission, smtps)")
    address, port = _split_hostport(hostport)
    if ":" in address and not hostport.startswith("["):
        raise ValueError("IPv6 addresses must be bracketed: [::1]:25")
    env: list[tuple[str, str]] = []
    kw: dict[str, Any] = {}
    for opt in options:
        name, sep, value = opt.partition("=")
        if not sep:
            raise ValueError(f"option {opt!r} is not NAME=value")
        if name.isupper() or name.startswith("TCP"):
            env.append((name, value))
        elif name in ("concurrency", "processes"):
            if not value.isdigit() or not 1 <= int(value) <= 10000:
                raise ValueError(f"{name} must be a number 1..10000")
            kw[name] = int(value)
        elif name == "checkpassword":
            argv = tuple(shlex.split(value))
            if not argv:
                raise ValueError("checkpassword is empty")
            kw["checkpassword"] = argv
        elif name == "clientcert":
            if value not in ("0", "1"):
                raise ValueError("clientcert must be 0 or 1")
            kw["clientcert"] = value == "1"
        elif name == "rules":
            if "/" in value or value.startswith("."):
                raise ValueError("rules must name a file in control/")
            kw["rules"] = value
        else:
            raise ValueError(f"unknown option {name!r}")
    if service == "smtps" and "SMTPS" not in dict(env):
        env.append(("SMTPS", "1"))
    return ListenerSpec(service, address, port, tuple(env), **kw)


def default_listeners() -> tuple[ListenerSpec, ...]:
    if os.geteuid() == 0:
        return (ListenerSpec("smtp", "0.0.0.0", 25), ListenerSpec("smtp", "::", 25))
    return (ListenerSpec("smtp", "127.0.0.1", 2525), ListenerSpec("smtp", "::1", 2525))


def _parse_listen(r: _Reader) -> tuple[ListenerSpec, ...]:
    lines = r.lines("listen")
    if lines is None:
        return default_listeners()
    out: list[ListenerSpec] = []
    seen: set[tuple[str, int]] = set()
    for n, ln in lines:
        try:
            spec = parse_listen_line(ln)
        except ValueError as e:
            r.errors.append(ControlFileError("control/listen", n, str(e)))
            continue
        tlsciphers = dict(spec.env).get("TLSCIPHERS")
        if tlsciphers and not _server_ciphers_ok(tlsciphers):
            r.errors.append(ControlFileError("control/listen", n,
                                             f"TLSCIPHERS: OpenSSL selects no cipher from {tlsciphers!r}"))
            continue
        if (spec.address, spec.port) in seen:
            r.errors.append(ControlFileError("control/listen", n, f"{spec.display_address} listed twice"))
            continue
        seen.add((spec.address, spec.port))
        out.append(spec)
    return tuple(out)


def _parse_dnsservers(r: _Reader) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for n, ln in r.lines("dnsservers") or []:
        try:
            if ln.startswith("[") or ln.count(":") == 1:
                out.append(_split_hostport(ln))
            else:
                out.append((str(ipaddress.ip_address(ln)), 53))
        except ValueError as e:
            r.errors.append(ControlFileError("control/dnsservers", n, str(e)))
    return tuple(out)


def _parse_logformat(r: _Reader) -> LogFormat:
    """control/logformat: local (default), tai64n, rfc3339 or json (eqmail.logformat)."""
    value = (r.line("logformat") or "").strip()
    if not value:
        return LogFormat.LOCAL
    try:
        return LogFormat(value.lower())
    except ValueError:
        names = ", ".join(f.value for f in LogFormat)
        r.errors.append(ControlFileError("control/logformat", 1, f"unknown format {value!r} (one of {names})"))
        return LogFormat.LOCAL


def _hostlist(r: _Reader, fn: str) -> tuple[str, ...] | None:
    lines = r.lines(fn)
    if lines is None:
        return None
    return tuple(ln.strip().lower() for _, ln in lines)


# ------------------------------------------------------------------- loading


def _me_default(me: str, literal: str) -> Callable[[str | None], str]:
    return lambda v: v if v else (me or literal)


def load_controls(root: Path) -> Controls:
    """Parse the whole control directory of the instance at ``root``.

    Raises :class:`ControlErrors` with every problem found (never just the first)."""
    r = _Reader(Path(root))
    me = r.line("me")
    if not me:
        r.errors.append(ControlFileError("control/me", 0, "missing: run 'eqmailctl setup'"))
        me = ""

    def me_or(fn: str, literal: str) -> str:
        v = r.line(fn)
        return v if v else (me or literal)

    locals_lines = _hostlist(r, "locals")
    kwargs: dict[str, Any] = dict(
        root=Path(root),
        me=me,
        badmailfrom=tuple(ln.strip() for _, ln in (r.lines("badmailfrom") or [])),
        bouncefrom=r.line("bouncefrom") or "MAILER-DAEMON",
        bouncehost=me_or("bouncehost", "bouncehost"),
        concurrencylocal=r.integer("concurrencylocal", 10, 1, SPAWN_LIMIT),
        concurrencyremote=r.integer("concurrencyremote", 20, 1, SPAWN_LIMIT),
        databytes=r.integer("databytes", 0, 0, 2**62),
        defaultdomain=me_or("defaultdomain", "defaultdomain"),
        defaulthost=me_or("defaulthost", "defaulthost"),
        defaultdelivery=r.line("defaultdelivery") or "./Maildir/",
        doublebouncehost=me_or("doublebouncehost", "doublebouncehost"),
        doublebounceto=r.line("doublebounceto") or "postmaster",
        envnoathost=me_or("envnoathost", "envnoathost"),
        helohost=me_or("helohost", ""),
        idhost=me_or("idhost", "idhost"),
        localiphost=me_or("localiphost", ""),
        locals=frozenset(locals_lines if locals_lines is not None else ([me.lower()] if me else [])),
        morercpthosts=_hostlist(r, "morercpthosts") or (),
        percenthack=frozenset(_hostlist(r, "percenthack") or ()),
        plusdomain=me_or("plusdomain", "plusdomain"),
        queuelifetime=r.integer("queuelifetime", 604800, 0, 10 * 365 * 86400),
        rcpthosts=_hostlist(r, "rcpthosts"),
        smtpgreeting=me_or("smtpgreeting", ""),
        smtproutes=_parse_smtproutes(r),
        timeoutconnect=r.integer("timeoutconnect", 60, 1, 86400),
        timeoutprogram=r.integer("timeoutprogram", 1000, 1, 86400),
        timeoutremote=r.integer("timeoutremote", 1200, 1, 86400),
        timeoutsmtpd=r.integer("timeoutsmtpd", 1200, -(2**31), 86400),
        virtualdomains=_parse_virtualdomains(r),
        listen=_parse_listen(r),
        dnsservers=_parse_dnsservers(r),
        spptimeout=r.integer("spptimeout", 30, 1, 3600),
        logfile=r.line("logfile") or "",
        logformat=_parse_logformat(r),
        tcp_smtp=r.raw("tcp.smtp") or "",
        assign=r.raw("assign", base="users"),
        rcptchecklocal=r.integer("rcptchecklocal", 1, 0, 1),
        bouncemaxbytes=r.integer("bouncemaxbytes", 50000, 0, 2**62),
        bouncelimit=r.integer("bouncelimit", 20, 0, 10**9),
        **_client_limits(r),
    )
    if kwargs["timeoutsmtpd"] <= 0:  # qmail-smtpd: a value <= 0 means 1 second
        kwargs["timeoutsmtpd"] = 1
    dd = kwargs["defaultdelivery"]
    if not (dd.startswith("./") or dd.startswith("/") or dd.startswith("|") or dd.startswith("&")):
        r.errors.append(ControlFileError("control/defaultdelivery", 1, "must start with ./ / | or &"))
    kwargs.update(_remote_files(r))
    _validate_extra(r, kwargs)
    if r.errors:
        raise ControlErrors(r.errors)
    kwargs["sources"] = dict(r.sources)
    return Controls(**kwargs)


def _client_limits(r: _Reader) -> dict[str, int]:
    """What one SMTP client may take (eqmail.connlimit, the session's limits)."""
    perclient = r.integer("concurrencyperclient", 50, 0, 1_000_000)
    return dict(
        concurrencyperclient=perclient,
        concurrencyperclientrelay=r.integer("concurrencyperclientrelay", perclient, 0, 1_000_000),
        mindatarate=r.integer("mindatarate", 500, 0, 1 << 30),
        maxrcpt=r.integer("maxrcpt", 1000, 1, 1_000_000),
        smtperrorsoftlimit=r.integer("smtperrorsoftlimit", 10, 0, 1_000_000),
        smtperrorhardlimit=r.integer("smtperrorhardlimit", 20, 0, 1_000_000),
        smtperrorsleep=r.integer("smtperrorsleep", 1, 0, 60),
        smtpjunklimit=r.integer("smtpjunklimit", 100, 0, 1_000_000),
    )


def _dir_names(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    except OSError:  # absent (the usual case) or unreadable: no entries
        return []


def _remote_files(r: _Reader) -> dict[str, Any]:
    """Outbound TLS files (by MX/relay host name) and control/beforemote."""
    control = r.root / "control"
    pems = [n[:-4].lower() for n in _dir_names(control / "tlshosts") if n.endswith(".pem")]
    return dict(
        tlsclientciphers=_cipher_list(r, "tlsclientciphers", _client_ciphers_ok),
        tlsserverciphers=_cipher_list(r, "tlsserverciphers", _server_ciphers_ok),
        clientcert=(control / "clientcert.pem").is_file(),
        tlshosts=frozenset(pems),
        tlshosts_exhaustive=(control / "tlshosts" / "exhaustivelist").exists(),
        notlshosts=frozenset(n.lower() for n in _dir_names(control / "notlshosts")),
        beforemote=tuple(ln.strip() for _, ln in (r.lines("beforemote") or [])),
    )


def _cipher_list(r: _Reader, fn: str, usable: Callable[[str], bool]) -> str:
    """netqmail's tlsserverciphers / tlsclientciphers: an OpenSSL cipher string (TLS 1.2
    and below), one or more lines joined with ':'.  One that selects no cipher is an
    error at the first line that selects none by itself (else the first line)."""
    lines = r.lines(fn)
    if not lines:
        return TLS_INTERMEDIATE_CIPHERS
    text = ":".join(ln.strip() for _, ln in lines)
    if usable(text):
        return text
    bad = next(((n, ln) for n, ln in lines if ln.strip()[:1] not in "!-+@" and not usable(ln.strip())),
               lines[0])
    r.errors.append(ControlFileError(f"control/{fn}", bad[0],
                                     f"OpenSSL selects no cipher from {bad[1].strip()!r}"))
    return TLS_INTERMEDIATE_CIPHERS


def _server_ciphers_ok(text: str) -> bool:
    """The listener's library: the ssl module's OpenSSL."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(text)
    except (ssl.SSLError, ValueError):  # ValueError: a NUL or an unencodable byte
        return False
    return True


def _client_ciphers_ok(text: str) -> bool:
    """Remote delivery's library: pyOpenSSL (eqmail.smtp.transport)."""
    from OpenSSL import SSL

    try:
        SSL.Context(SSL.TLS_CLIENT_METHOD).set_cipher_list(text.encode())
    except (SSL.Error, ValueError):  # ValueError: a NUL or an unencodable byte
        return False
    return True


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
    r = _Reader(Path(root))
    me = r.line("me") or ""

    def me_or(fn: str, literal: str) -> str:
        v = r.line(fn)
        return v if v else (me or literal)

    values = InjectControls(me, me_or("defaultdomain", "defaultdomain"), me_or("defaulthost", "defaulthost"),
                            me_or("plusdomain", "plusdomain"), me_or("idhost", "idhost"))
    if r.errors:
        raise ControlErrors(r.errors)
    return values


def _validate_extra(r: _Reader, kw: dict[str, Any]) -> None:
    """Cross-file checks that depend on other modules' parsers (tcp.smtp, users/assign)."""
    try:
        from eqmail.tcprules import Rules
    except ImportError:  # pragma: no cover - during bootstrap of the package
        Rules = None  # type: ignore[assignment,misc]
    if Rules is not None:
        for spec in kw["listen"]:
            fn = spec.rules
            text = kw["tcp_smtp"] if fn == "tcp.smtp" else r.raw(fn)
            if text:
                try:
                    Rules.parse(text, f"control/{fn}")
                except ControlFileError as e:
                    r.errors.append(e)
    if kw["assign"] is not None:
        try:
            from eqmail.delivery.users import Assign
        except ImportError:  # pragma: no cover
            return
        try:
            Assign.parse(kw["assign"], "users/assign")
        except ControlFileError as e:
            r.errors.append(e)


def describe(c: Controls) -> list[tuple[str, str, str]]:
    """(file, value, source) rows for ``eqmailctl check`` (qmail-showctl)."""
    rows: list[tuple[str, str, str]] = []
    for name in KNOWN_FILES:
        attr = name.replace(".", "_")
        value = getattr(c, attr, None)
        source = c.sources.get(name, "(default)")
        rows.append((name, _show(value), source))
    return rows


def _show(value: object) -> str:
    if isinstance(value, (frozenset, tuple, list)):
        items = sorted(value) if isinstance(value, frozenset) else list(value)
        return ", ".join(_show(v) for v in items) if items else "(none)"
    if isinstance(value, ListenerSpec):
        return f"{value.service} {value.display_address}"
    if value is None:
        return "(none)"
    return str(value)


KNOWN_FILES = (
    "me", "badmailfrom", "bouncefrom", "bouncehost", "concurrencylocal", "concurrencyremote",
    "databytes", "defaultdomain", "defaulthost", "defaultdelivery", "doublebouncehost",
    "doublebounceto", "envnoathost", "helohost", "idhost", "localiphost", "locals",
    "morercpthosts", "percenthack", "plusdomain", "queuelifetime", "rcpthosts",
    "smtpgreeting", "smtproutes", "timeoutconnect", "timeoutprogram", "timeoutremote",
    "timeoutsmtpd", "virtualdomains", "listen", "dnsservers", "spptimeout", "logfile", "logformat",
    "tcp.smtp", "tlsserverciphers", "tlsclientciphers",
    "rcptchecklocal", "bouncemaxbytes", "bouncelimit",
    "concurrencyperclient", "concurrencyperclientrelay", "mindatarate", "maxrcpt",
    "smtperrorsoftlimit", "smtperrorhardlimit", "smtperrorsleep", "smtpjunklimit",
)
# Files eqmail knows but does not show as values (certificates, plugin configuration).
OTHER_KNOWN_FILES = (
    "servercert.pem", "clientca.pem", "clientcrl.pem", "clientcert.pem", "dh2048.pem",
    "rsa2048.pem", "tlsclients", "tlshosts",
    "notlshosts", "smtpplugins", "beforemote", "morercpthosts.cdb", "qmqpservers",
    "authlimit", "servercert.csr", "servercert.key.pending", "dnsbl", "greylist",
    "passwords", "passwords.lock",
)
# Files the shipped plugins (plugins/) read for themselves: (file, plugin, default).
# ``eqmailctl check`` shows those present; tests/unit/test_control.py holds this list
# against the plugins' sources.
PLUGIN_FILES: tuple[tuple[str, str, str], ...] = (
    ("dnsbl", "dnsbl", "(no zones)"),
    ("greylistdir", "greylist", "spp/greylist"),
    ("greylistdelay", "greylist", "300"),
    ("greylistexpire", "greylist", "2592000"),
    ("spfsoftfail", "spf", "(accept softfail)"),
    ("tarpitcount", "tarpit", "50"),
    ("tarpitdelay", "tarpit", "5"),
)


def referenced_files(c: Controls) -> frozenset[str]:
    """Files in control/ that control/listen names: ``rules=FILE`` and an
    ``SPPCONFFILE=control/FILE`` (relative to the instance root, as qmail-smtpd reads it)."""
    names = {spec.rules for spec in c.listen}
    for spec in c.listen:
        conf = dict(spec.env).get("SPPCONFFILE", "")
        if conf.startswith("control/") and "/" not in conf[len("control/"):]:
            names.add(conf[len("control/"):])
    return frozenset(names)


def known_file(name: str) -> bool:
    """Whether eqmail or one of its shipped plugins reads control/``name``."""
    return (name in KNOWN_FILES or name in OTHER_KNOWN_FILES
            or any(name == fn for fn, _, _ in PLUGIN_FILES))
