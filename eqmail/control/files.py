"""The table of control files: name, kind, default, bounds and what each one does.

Owns: every default of a control value (written here once: :class:`Controls` has no
defaults of its own), the order ``eqmailctl check`` shows them in, and the lists of
files eqmail knows without showing their values.  The one-line numbers and texts are
read by :class:`eqmail.control.reader.Reader` straight from their row; the files with
a syntax of their own (lists, listen, smtproutes, ...) are parsed by
:mod:`eqmail.control.parsers` and their row only says what their absence means.

Pure data and pure functions; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SPAWN_LIMIT = 120  # conf-spawn: hard cap on concurrent deliveries per channel


@dataclass(frozen=True)
class Number:
    """A one-line integer file.  ``default`` is a number, or the name of an earlier
    Number row whose value is the default (concurrencyperclientrelay)."""

    name: str
    default: int | str
    lo: int
    hi: int
    doc: str


@dataclass(frozen=True)
class Text:
    """A one-line text file; absent or empty gives ``default`` — with ``from_me``,
    control/me when that is set, and ``default`` only without it."""

    name: str
    default: str
    doc: str
    from_me: bool = False


@dataclass(frozen=True)
class Parsed:
    """A file with its own syntax (eqmail.control.parsers); ``default`` is what its
    absence means, in words."""

    name: str
    default: str
    doc: str


FileRow = Number | Text | Parsed

# In the order ``eqmailctl check`` shows them (qmail-showctl's, then eqmail's additions).
FILES: tuple[FileRow, ...] = (
    Parsed("me", "(required)", "this host's name; the default of the files marked 'me'"),
    Parsed("badmailfrom", "(none)", "envelope senders refused at MAIL (address or @domain)"),
    Text("bouncefrom", "MAILER-DAEMON", "sender user of bounces"),
    Text("bouncehost", "bouncehost", "sender host of bounces (default: me)", from_me=True),
    Number("concurrencylocal", 10, 1, SPAWN_LIMIT, "simultaneous local deliveries"),
    Number("concurrencyremote", 20, 1, SPAWN_LIMIT, "simultaneous remote deliveries"),
    Number("databytes", 0, 0, 2**62, "largest message accepted by SMTP; 0 = no limit"),
    Text("defaultdomain", "defaultdomain", "domain added to a host name without a dot (default: me)",
         from_me=True),
    Text("defaulthost", "defaulthost", "host added to an address without one (default: me)",
         from_me=True),
    Text("defaultdelivery", "./Maildir/", "delivery for users without .qmail (./ / | or &)"),
    Text("doublebouncehost", "doublebouncehost", "host of doublebounceto (default: me)", from_me=True),
    Text("doublebounceto", "postmaster", "user that gets double bounces"),
    Text("envnoathost", "envnoathost", "host added to an envelope address without @ (default: me)",
         from_me=True),
    Text("helohost", "", "name sent in HELO/EHLO by remote delivery (default: me)", from_me=True),
    Text("idhost", "idhost", "host of generated Message-IDs (default: me)", from_me=True),
    Text("localiphost", "", "name that replaces [local IP] in recipients (default: me)", from_me=True),
    Parsed("locals", "(me)", "domains delivered locally"),
    Parsed("morercpthosts", "(none)", "more domains accepted by SMTP"),
    Parsed("percenthack", "(none)", "domains where user%host@domain is rewritten"),
    Text("plusdomain", "plusdomain", "domain added to a host name ending in + (default: me)",
         from_me=True),
    Number("queuelifetime", 604800, 0, 10 * 365 * 86400, "seconds a message may stay in the queue"),
    Parsed("rcpthosts", "(locals and virtualdomains)", "domains accepted by SMTP"),
    Text("smtpgreeting", "", "text of the SMTP greeting (default: me)", from_me=True),
    Parsed("smtproutes", "(MX lookup)", "domain:relay[:port] [user password] for remote delivery"),
    Number("timeoutconnect", 60, 1, 86400, "seconds to wait for a remote SMTP connection"),
    Number("timeoutprogram", 1000, 1, 86400,
           "seconds a |program may run (eqmail; Postfix's command_time_limit)"),
    Number("timeoutremote", 1200, 1, 86400, "seconds to wait for a remote SMTP server"),
    Number("timeoutsmtpd", 1200, -(2**31), 86400, "seconds to wait for an SMTP client; <= 0 means 1"),
    Parsed("virtualdomains", "(none)", "domain:prepend for virtual domains"),
    Parsed("listen", "(smtp on port 25, or 2525 for a non-root instance)",
           "SERVICE ADDRESS:PORT [OPTION ...] per listener"),
    Parsed("dnsservers", "(/etc/resolv.conf)", "DNS servers, ADDRESS[:PORT]"),
    Number("spptimeout", 30, 1, 3600, "seconds a qmail-spp plugin may run"),
    Text("logfile", "", "log file under the instance, or syslog (default: standard output)"),
    Parsed("logformat", "local", "log time stamps: local, tai64n, rfc3339 or json"),
    Parsed("tcp.smtp", "(allow all)", "tcprules for the listeners (rules= names another file)"),
    Parsed("tlsserverciphers", "(Mozilla intermediate)", "OpenSSL cipher list of the listeners"),
    Parsed("tlsclientciphers", "(Mozilla intermediate)", "OpenSSL cipher list of remote delivery"),
    Number("rcptchecklocal", 1, 0, 1, "1: unknown local recipients get 550 at RCPT; 0: accept all"),
    Number("bouncemaxbytes", 50000, 0, 2**62, "bytes of the original message in a bounce; 0 = all"),
    Number("bouncelimit", 20, 0, 10**9, "bounces per sender address per hour; 0 = no limit"),
    Number("concurrencyperclient", 50, 0, 1_000_000,
           "sessions per IPv4 address / IPv6 /64, all listeners; 0 = no limit"),
    Number("concurrencyperclientrelay", "concurrencyperclient", 0, 1_000_000,
           "the same for RELAYCLIENT clients"),
    Number("mindatarate", 500, 0, 1 << 30, "DATA bytes/s on average; 0 = no minimum"),
    Number("maxrcpt", 1000, 1, 1_000_000, "recipients per message"),
    Number("smtperrorsoftlimit", 10, 0, 1_000_000, "error replies after which each waits smtperrorsleep"),
    Number("smtperrorhardlimit", 20, 0, 1_000_000, "error replies after which the session gets 421; 0 = never"),
    Number("smtperrorsleep", 1, 0, 60, "seconds of that wait"),
    Number("smtpjunklimit", 100, 0, 1_000_000, "NOOP/RSET/VRFY/HELP without a delivered message; 0 = no limit"),
    Parsed("dkimsign", "(relaxed/relaxed, the usual fields, From over-signed)",
           "DKIM signing per domain: DOMAIN|* canon= headers= oversign= expire="),
    # SRS for forwarded mail (issue 16, eqmail.srs): postsrsd's job, built in
    Number("srs", 1, 0, 1, "1: forwarded mail gets an SRS sender when srssecrets exists; 0: off"),
    Text("srsdomain", "", "domain of the SRS senders of forwarded mail (default: me)", from_me=True),
    Parsed("srssecrets", "(none: no SRS)",
           "SRS secrets, one per line: the first signs, all verify (eqmailctl setup makes one)"),
    Parsed("srsexclude", "(none)",
           "sender domains whose forwarded mail keeps its sender (.domain: its subdomains)"),
    # inbound verification (issue 16): off unless control/authcheck says 1, like Postfix
    Number("authcheck", 0, 0, 1,
           "1: SPF/DKIM/DMARC/ARC of mail from non-relay clients, Authentication-Results; 0: off"),
    Text("authservid", "authservid", "authserv-id of Authentication-Results (default: me)",
         from_me=True),
    Parsed("dmarcreject", "header",
           "a DMARC p=reject failure: header (only the result), reject (550) or quarantine (marked)"),
    Number("authtimeout", 10, 1, 300, "seconds the checks of one message may take (DNS included)"),
    # outbound TLS policy (issue 17, eqmail.delivery.tlspolicy)
    Number("dnssec", 0, 0, 1,
           "1: trust the AD bit of control/dnsservers (a local validating resolver): DANE on"),
    Number("mtasts", 1, 0, 1, "1: honour receiving domains' MTA-STS policies; 0: off"),
)
KNOWN_FILES: tuple[str, ...] = tuple(row.name for row in FILES)
NUMBERS: Mapping[str, Number] = {row.name: row for row in FILES if isinstance(row, Number)}
TEXTS: Mapping[str, Text] = {row.name: row for row in FILES if isinstance(row, Text)}

# Files eqmail reads but does not show as values (certificates, plugin configuration,
# users' tables).  authlimit and tlsclients are parsed into Controls too.
OTHER_KNOWN_FILES = (
    "servercert.pem", "clientca.pem", "clientcrl.pem", "clientcert.pem", "dh2048.pem",
    "rsa2048.pem", "tlsclients", "tlshosts",
    "notlshosts", "smtpplugins", "beforemote", "morercpthosts.cdb", "qmqpservers",
    "authlimit", "servercert.csr", "servercert.key.pending", "dnsbl", "greylist",
    "passwords", "passwords.lock", "tlsca.pem",
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


def known_file(name: str) -> bool:
    """Whether eqmail or one of its shipped plugins reads control/``name``."""
    return (name in KNOWN_FILES or name in OTHER_KNOWN_FILES
            or any(name == fn for fn, _, _ in PLUGIN_FILES))
