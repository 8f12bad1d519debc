"""The control files with a syntax of their own, each parsed into its value here.

Owns: virtualdomains, smtproutes, dnsservers, logformat, srssecrets, the cipher lists, the outbound
TLS directories, the tcprules files the listeners name (eqmail.tcprules), users/assign
(eqmail.control.assign), control/authlimit (eqmail.authlimit), control/tlsclients and
the stamps of the server TLS files.  Each function takes the :class:`Reader` (errors
and sources are collected there) and returns a typed value; a file that is absent gives
its default (the table in eqmail.control.files says which, in words).

Failure modes: none raised — errors are recorded on the Reader as file:line.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable

from eqmail import srs
from eqmail.authlimit import AuthLimit, read_authlimit
from eqmail.control.assign import Assign
from eqmail.control.ciphers import TLS_INTERMEDIATE_CIPHERS
from eqmail.control.listen import ListenerSpec, split_hostport
from eqmail.control.reader import Reader
from eqmail.control.values import DmarcAction, FileStamp, Route
from eqmail.errors import ControlFileError
from eqmail.logformat import LogFormat
from eqmail.tcprules import Rules

TLSCLIENTS_MAX = 1 << 20  # bytes of control/tlsclients read
# What the supervisor builds a listener's TLS context from (eqmail.tls.ServerTLS.load);
# of control/tlsclients only whether it exists counts (its lines are Controls.tlsclients).
SERVER_TLS_FILES = ("servercert.pem", "dh2048.pem", "clientca.pem", "clientcrl.pem")


def parse_virtualdomains(r: Reader) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for n, ln in r.lines("virtualdomains") or []:
        if ":" not in ln:
            r.error("virtualdomains", n, "missing ':'")
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


def parse_smtproutes(r: Reader) -> tuple[tuple[str, Route], ...]:
    out: list[tuple[str, Route]] = []
    for n, ln in r.lines("smtproutes") or []:
        if ":" not in ln:
            r.error("smtproutes", n, "missing ':'")
            continue
        domain, value = ln.split(":", 1)
        try:
            out.append((domain.lower(), parse_route_value(value)))
        except ValueError as e:
            r.error("smtproutes", n, str(e))
    return tuple(out)


def parse_dnsservers(r: Reader) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for n, ln in r.lines("dnsservers") or []:
        try:
            if ln.startswith("[") or ln.count(":") == 1:
                out.append(split_hostport(ln))
            else:
                out.append((str(ipaddress.ip_address(ln)), 53))
        except ValueError as e:
            r.error("dnsservers", n, str(e))
    return tuple(out)


def parse_logformat(r: Reader) -> LogFormat:
    """control/logformat: local (default), tai64n, rfc3339 or json (eqmail.logformat)."""
    value = (r.line("logformat") or "").strip()
    if not value:
        return LogFormat.LOCAL
    try:
        return LogFormat(value.lower())
    except ValueError:
        names = ", ".join(f.value for f in LogFormat)
        r.error("logformat", 1, f"unknown format {value!r} (one of {names})")
        return LogFormat.LOCAL


# RFC 8601's authserv-id is a value (token or quoted-string); eqmail takes the form a
# host name has, which is what every MTA writes and every filter matches on.
_AUTHSERVID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}", re.ASCII)


def parse_authservid(r: Reader, me: str) -> str:
    """control/authservid (default: me): the authserv-id of Authentication-Results."""
    value = r.text("authservid", me).strip()
    if not _AUTHSERVID.fullmatch(value):
        line = 1 if "authservid" in r.sources else 0
        where = "" if line else " (from control/me)"
        r.error("authservid", line, f"not a host-name-like authserv-id{where}: {value!r}")
    return value


def parse_dmarcreject(r: Reader) -> DmarcAction:
    """control/dmarcreject: header (default), reject or quarantine (DmarcAction)."""
    value = (r.line("dmarcreject") or "").strip()
    if not value:
        return DmarcAction.HEADER
    try:
        return DmarcAction(value.lower())
    except ValueError:
        names = ", ".join(a.value for a in DmarcAction)
        r.error("dmarcreject", 1, f"unknown action {value!r} (one of {names})")
        return DmarcAction.HEADER


def parse_defaultdelivery(r: Reader) -> str:
    value = r.text("defaultdelivery")
    if not value.startswith(("./", "/", "|", "&")):
        r.error("defaultdelivery", 1, "must start with ./ / | or &")
    return value


def parse_cipher_list(r: Reader, fn: str, usable: Callable[[str], bool]) -> str:
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
    r.error(fn, bad[0], f"OpenSSL selects no cipher from {bad[1].strip()!r}")
    return TLS_INTERMEDIATE_CIPHERS


def dir_names(r: Reader, sub: str) -> list[str]:
    """Names in control/``sub``/ (outbound TLS by host name), dot files left out."""
    try:
        return sorted(p.name for p in (r.root / "control" / sub).iterdir() if not p.name.startswith("."))
    except OSError:  # absent (the usual case) or unreadable: no entries
        return []


def parse_tcprules(r: Reader, listen: tuple[ListenerSpec, ...], tcp_smtp: str) -> tuple[Rules, ...]:
    """Every tcprules file a listener names (``rules=``, default tcp.smtp, whose text
    ``tcp_smtp`` is read already), parsed once; absent or empty files are left out
    (every connection allowed).  A bad file's error is listed once per listener naming
    it, as it always was."""
    out: list[Rules] = []
    failed: dict[str, ControlFileError] = {}
    for fn in dict.fromkeys(spec.rules for spec in listen):
        text = tcp_smtp if fn == "tcp.smtp" else r.raw(fn)
        if not text:
            continue
        try:
            out.append(Rules.parse(text, f"control/{fn}"))
        except ControlFileError as e:
            failed[fn] = e
    r.errors += [failed[spec.rules] for spec in listen if spec.rules in failed]
    return tuple(out)


def parse_assign(r: Reader) -> Assign | None:
    """users/assign (qmail-users(5)), compiled; None when the file is absent."""
    text = r.raw("assign", base="users")
    if text is None:
        return None
    try:
        return Assign.parse(text, "users/assign")
    except ControlFileError as e:
        r.errors.append(e)
        return None


def parse_authlimit(r: Reader, warnings: list[str]) -> AuthLimit:
    """control/authlimit; a file that does not parse keeps the defaults and adds a
    warning (a typo must not turn the lock-out off or stop the listeners)."""
    limit, problem = read_authlimit(r.root / "control")
    if problem:
        warnings.append(problem)
    return limit


def parse_tlsclients(r: Reader) -> frozenset[str]:
    """control/tlsclients: one email address per line (netqmail); unreadable or absent
    is an empty list (no certificate relay clients)."""
    try:
        with open(r.root / "control" / "tlsclients", "rb") as f:
            text = f.read(TLSCLIENTS_MAX).decode("utf-8", "surrogateescape")
    except OSError:
        return frozenset()
    return frozenset(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))


def stamp_tlsfiles(r: Reader) -> tuple[FileStamp, ...]:
    """The server TLS files as they are now (absent ones left out): a listener whose
    files changed needs a new TLS context, which only the supervisor can load."""
    out: list[FileStamp] = []
    for name in SERVER_TLS_FILES:
        try:
            st = os.stat(r.root / "control" / name)
        except OSError:
            continue
        out.append(FileStamp(name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    if (r.root / "control" / "tlsclients").exists():
        out.append(FileStamp("tlsclients", 0, 0, 0, 0, 0))
    return tuple(out)


def parse_srssecrets(r: Reader, warnings: list[str]) -> tuple[bytes, ...]:
    """control/srssecrets (eqmail.srs): one secret per line, the first signs and every
    one verifies, so a new secret goes first and an old one stays until its addresses
    expired (21 days).  Absent: () — no SRS.  Only root reads the file (eqmailctl setup
    makes it root 0600): a process that cannot (``sendmail -bs`` as a user, eqmailctl
    check as a user) gets () and a warning instead of refusing the whole configuration,
    since it does not forward mail.  A secret shorter than eqmail.srs.SECRET_MIN
    characters is an error (a guessable secret lets anyone reverse us into an open
    relay); a file others may read is a warning."""
    path = r.root / "control" / "srssecrets"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    except OSError as e:
        r.error("srssecrets", 0, f"unreadable: {e.strerror}")
        return ()
    if not os.access(path, os.R_OK):
        warnings.append("control/srssecrets: not readable by this user: no SRS here "
                        "(the daemon reads it as root)")
        return ()
    if st.st_mode & 0o077:
        warnings.append(f"control/srssecrets: mode {st.st_mode & 0o777:04o} lets others read "
                        "the SRS secret (anyone who has it can forge bounces): chmod 600")
    out: list[bytes] = []
    for n, ln in r.lines("srssecrets") or []:
        secret = ln.strip()
        if len(secret) < srs.SECRET_MIN:
            r.error("srssecrets", n, f"secret shorter than {srs.SECRET_MIN} characters")
            continue
        out.append(secret.encode("utf-8", "surrogateescape"))
    return tuple(out)
