"""Control files (qmail-core §6, DESIGN §3): defaults from me, file:line errors, parsers."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqmail.control import (
    KNOWN_FILES,
    TLS_INTERMEDIATE_CIPHERS,
    ListenerSpec,
    Route,
    describe,
    load_controls,
    parse_listen_line,
    parse_route_value,
)
from eqmail.errors import ControlErrors

ERROR_RE = re.compile(r"^(control|users)/[^:\s]+:\d+: \S.*$")


def make(root: Path, **files: str | bytes) -> Path:
    (root / "control").mkdir(parents=True, exist_ok=True)
    (root / "users").mkdir(exist_ok=True)
    for name, text in files.items():
        name = name.replace("_", ".") if name in ("tcp_smtp", "servercert_pem") else name
        path = root / "users" / "assign" if name == "assign" else root / "control" / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def errors_of(root: Path) -> list[str]:
    with pytest.raises(ControlErrors) as info:
        load_controls(root)
    out = [str(e) for e in info.value.errors]
    assert all(ERROR_RE.match(line) for line in out), out
    return out


def test_defaults_come_from_me(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, me="mx.test.example\n"))
    for attr in ("bouncehost", "defaultdomain", "defaulthost", "doublebouncehost", "envnoathost",
                 "helohost", "idhost", "localiphost", "plusdomain", "smtpgreeting"):
        assert getattr(c, attr) == "mx.test.example", attr
    assert c.locals == frozenset({"mx.test.example"})
    assert (c.bouncefrom, c.doublebounceto, c.queuelifetime) == ("MAILER-DAEMON", "postmaster", 604800)
    assert (c.concurrencylocal, c.concurrencyremote, c.databytes) == (10, 20, 0)
    assert (c.timeoutconnect, c.timeoutremote, c.timeoutsmtpd) == (60, 1200, 1200)
    assert c.rcpthosts is None and c.virtualdomains == () and c.smtproutes == ()
    assert c.defaultdelivery == "./Maildir/"


def test_single_line_files_use_first_line_trailing_blanks_stripped(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, me="mx.example \t\nignored\n", bouncehost="bh.example\t \n",
                           databytes="1000  \nxyz\n"))
    assert (c.me, c.bouncehost, c.databytes) == ("mx.example", "bh.example", 1000)


def test_list_files_drop_comments_and_blank_lines(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, me="mx.example", locals="# comment\n\nA.Example\nb.example  \n",
                           rcpthosts="\n#x\nmx.example\n"))
    assert c.locals == frozenset({"a.example", "b.example"})
    assert c.rcpthosts == ("mx.example",)


def test_missing_me_is_an_error(tmp_path: Path) -> None:
    assert errors_of(make(tmp_path)) == ["control/me:0: missing: run 'eqmailctl setup'"]


@pytest.mark.parametrize(("name", "value", "message"), [
    ("databytes", "abc", "control/databytes:1: not a number: 'abc'"),
    ("databytes", "1_000", "control/databytes:1: not a number: '1_000'"),
    ("databytes", "-5", "control/databytes:1: -5 out of range 0..4611686018427387904"),
    ("concurrencylocal", "121", "control/concurrencylocal:1: 121 out of range 1..120"),
    ("concurrencyremote", "0", "control/concurrencyremote:1: 0 out of range 1..120"),
    ("queuelifetime", "1 week", "control/queuelifetime:1: not a number: '1 week'"),
    ("timeoutremote", "\u0661\u0662", "control/timeoutremote:1: not a number: '\u0661\u0662'"),
    ("defaultdelivery", "Maildir/", "control/defaultdelivery:1: must start with ./ / | or &"),
    ("rcptchecklocal", "2", "control/rcptchecklocal:1: 2 out of range 0..1"),
    ("bouncemaxbytes", "50k", "control/bouncemaxbytes:1: not a number: '50k'"),
    ("bouncelimit", "-1", "control/bouncelimit:1: -1 out of range 0..1000000000"),
])
def test_bad_values_name_file_and_line(tmp_path: Path, name: str, value: str, message: str) -> None:
    assert errors_of(make(tmp_path, me="mx.example", **{name: value + "\n"})) == [message]


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    out = errors_of(make(tmp_path, me="mx.example", databytes="abc\n", concurrencylocal="x\n",
                         virtualdomains="ok.example:p\n\nnocolon\n",
                         smtproutes="# c\na.example:relay:99999\nb.example\n"))
    assert sorted(out) == sorted([
        "control/databytes:1: not a number: 'abc'",
        "control/concurrencylocal:1: not a number: 'x'",
        "control/virtualdomains:3: missing ':'",
        "control/smtproutes:2: port 99999 out of range",
        "control/smtproutes:3: missing ':'",
    ])


def test_backscatter_controls_defaults_and_values(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, me="m"))
    assert (c.rcptchecklocal, c.bouncemaxbytes, c.bouncelimit) == (1, 50000, 20)
    c = load_controls(make(tmp_path, me="m", rcptchecklocal="0\n", bouncemaxbytes="0\n",
                           bouncelimit="5\n"))
    assert (c.rcptchecklocal, c.bouncemaxbytes, c.bouncelimit) == (0, 0, 5)
    shown = {name: value for name, value, _source in describe(c)}
    assert (shown["rcptchecklocal"], shown["bouncemaxbytes"], shown["bouncelimit"]) == ("0", "0", "5")


def test_timeoutsmtpd_nonpositive_means_one_second(tmp_path: Path) -> None:
    assert load_controls(make(tmp_path, me="m", timeoutsmtpd="0\n")).timeoutsmtpd == 1


def test_virtualdomains_lowercase_keys_keep_prepend(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, me="m", virtualdomains="Virt.Example:VUser\n:catch\njoe@x.org:j\n"))
    assert c.virtualdomains == (("virt.example", "VUser"), ("", "catch"), ("joe@x.org", "j"))


# ------------------------------------------------------------------ listen


def test_listen_missing_gives_defaults_empty_gives_none(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, me="m"))
    assert len(c.listen) == 2 and {s.service for s in c.listen} == {"smtp"}
    assert load_controls(make(tmp_path, listen="")).listen == ()


def test_listen_lines(tmp_path: Path) -> None:
    text = ("smtp 0.0.0.0:25\n"
            "smtp [::]:25\n"
            "# a comment\n"
            'submission [::1]:587 TLSREQUIRED=1 checkpassword="/bin/ckpw /bin/true" concurrency=5\n'
            "smtps 127.0.0.1:465 rules=tcp.smtps processes=2\n")
    c = load_controls(make(tmp_path, me="m", listen=text))
    assert c.listen == (
        ListenerSpec("smtp", "0.0.0.0", 25),
        ListenerSpec("smtp", "::", 25),
        ListenerSpec("submission", "::1", 587, (("TLSREQUIRED", "1"),), concurrency=5,
                     checkpassword=("/bin/ckpw", "/bin/true")),
        ListenerSpec("smtps", "127.0.0.1", 465, (("SMTPS", "1"),), rules="tcp.smtps", processes=2),
    )
    assert c.listen[1].key == "smtp [::]:25" and c.listen[0].display_address == "0.0.0.0:25"


@pytest.mark.parametrize(("line", "reason"), [
    ("smtp", "expected SERVICE ADDRESS:PORT [OPTION ...]"),
    ("pop3 0.0.0.0:110", "unknown service 'pop3' (smtp, submission, smtps)"),
    ("smtp ::1:25", "IPv6 addresses must be bracketed: [::1]:25"),
    ("smtp host.example:25", "not an IP address: 'host.example'"),
    ("smtp 0.0.0.0:99999", "bad port '99999'"),
    ("smtp 0.0.0.0", "expected ADDRESS:PORT, got '0.0.0.0'"),
    ("smtp 0.0.0.0:25 concurrency=0", "concurrency must be a number 1..10000"),
    ("smtp 0.0.0.0:25 bogus=1", "unknown option 'bogus'"),
    ("smtp 0.0.0.0:25 rules=../x", "rules must name a file in control/"),
    ("smtp 0.0.0.0:25 NOEQUALS", "option 'NOEQUALS' is not NAME=value"),
    ('smtp 0.0.0.0:25 checkpassword="/bin/x', "No closing quotation"),
])
def test_listen_errors(tmp_path: Path, line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_listen_line(line)
    out = errors_of(make(tmp_path, me="m", listen=f"# first\n{line}\n"))
    assert out == [f"control/listen:2: {reason}"]


def test_listen_duplicate_address(tmp_path: Path) -> None:
    out = errors_of(make(tmp_path, me="m", listen="smtp 127.0.0.1:25\nsubmission 127.0.0.1:25\n"))
    assert out == ["control/listen:2: 127.0.0.1:25 listed twice"]


# ------------------------------------------------------------------ smtproutes / dnsservers


def test_route_values() -> None:
    assert parse_route_value("relay.example") == Route("relay.example", 25)
    assert parse_route_value("relay.example:2525") == Route("relay.example", 2525)
    assert parse_route_value("") == Route("", 25)
    assert parse_route_value("[10.0.0.1]:26") == Route("[10.0.0.1]", 26)
    assert parse_route_value("[2001:db8::1]:587 user pass word") == Route("[2001:db8::1]", 587, "user", "pass word")
    for bad in ("[2001:db8::1", "relay:abc", "relay:0", "[1.2.3.4]x"):
        with pytest.raises(ValueError):
            parse_route_value(bad)


def test_smtproutes_lookup(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, me="m", smtproutes="A.Example:relay1\n.b.example:relay2:26\n:smart\n"))
    assert c.route_for("a.example") == Route("relay1")
    assert c.route_for("x.a.example") == Route("smart")
    assert c.route_for("x.B.example") == Route("relay2", 26)
    assert c.route_for("b.example") == Route("smart")
    c = load_controls(make(tmp_path, smtproutes="a.example:\n"))
    assert c.route_for("a.example") == Route("") and c.route_for("z.example") is None


def test_dnsservers(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, me="m", dnsservers="127.0.0.1\n127.0.0.1:5353\n::1\n[::1]:5353\n"))
    assert c.dnsservers == (("127.0.0.1", 53), ("127.0.0.1", 5353), ("::1", 53), ("::1", 5353))
    out = errors_of(make(tmp_path, dnsservers="localhost\n"))
    assert out == ["control/dnsservers:1: 'localhost' does not appear to be an IPv4 or IPv6 address"]


def test_users_assign_errors_name_the_file(tmp_path: Path) -> None:
    out = errors_of(make(tmp_path, me="m", assign="=joe:joe:1000:1000:/home/joe:::\n"))
    assert out and out[0].startswith("users/assign:")


# ------------------------------------------------------------------ fuzz


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from([*KNOWN_FILES, "assign"]), data=st.binary(max_size=200)
       | st.text(alphabet="0123456789abc:.[]@ \t\n#-=\"'_", max_size=80).map(str.encode))
def test_any_file_text_gives_controls_or_control_errors(name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = make(Path(d), me="mx.example\n")
        target = root / "users" / "assign" if name == "assign" else root / "control" / name
        target.write_bytes(data)
        try:
            load_controls(root)
        except ControlErrors as e:
            for err in e.errors:
                assert ERROR_RE.match(str(err).split("\n")[0]), str(err)


# ------------------------------------------------------------------ TLS cipher policy


def test_cipher_defaults_are_mozilla_intermediate(tmp_path: Path) -> None:
    import ssl

    c = load_controls(make(tmp_path, me="m"))
    assert c.tlsserverciphers == c.tlsclientciphers == TLS_INTERMEDIATE_CIPHERS
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers(TLS_INTERMEDIATE_CIPHERS)
    tls12 = [s for s in ctx.get_ciphers() if s["protocol"] == "TLSv1.2"]
    assert tls12 and all(s["aead"] and s["kea"] in ("kx-ecdhe", "kx-dhe") for s in tls12), tls12
    assert not any("CBC" in s["description"] or "SHA1" in s["description"] for s in tls12)


def test_cipher_files_are_read_as_netqmail_does(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, me="m", tlsserverciphers="# mine\nECDHE-RSA-AES128-GCM-SHA256\nAES128-SHA\n",
                           tlsclientciphers="HIGH:!aNULL\n"))
    assert c.tlsserverciphers == "ECDHE-RSA-AES128-GCM-SHA256:AES128-SHA"
    assert c.tlsclientciphers == "HIGH:!aNULL"
    assert dict((row[0], row[1]) for row in describe(c))["tlsserverciphers"] == c.tlsserverciphers


@pytest.mark.parametrize(("name", "text", "message"), [
    ("tlsserverciphers", "# c\nNO-SUCH-CIPHER\n", "control/tlsserverciphers:2: OpenSSL selects no cipher from 'NO-SUCH-CIPHER'"),
    ("tlsserverciphers", "!aNULL\nBOGUS\n", "control/tlsserverciphers:2: OpenSSL selects no cipher from 'BOGUS'"),
    ("tlsclientciphers", "nonsense\n", "control/tlsclientciphers:1: OpenSSL selects no cipher from 'nonsense'"),
])
def test_unusable_cipher_string_names_file_and_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    assert errors_of(make(tmp_path, me="m", **{name: text})) == [message]


def test_listen_clientcert_and_tlsciphers_options(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, me="m", listen="smtp 127.0.0.1:25 clientcert=0\nsmtps 127.0.0.1:465\n"))
    assert [spec.clientcert for spec in c.listen] == [False, True]
    with pytest.raises(ValueError, match="clientcert must be 0 or 1"):
        parse_listen_line("smtp 127.0.0.1:25 clientcert=no")
    out = errors_of(make(tmp_path, me="m", listen="smtp 127.0.0.1:25 TLSCIPHERS=NOPE\n"))
    assert out == ["control/listen:1: TLSCIPHERS: OpenSSL selects no cipher from 'NOPE'"]


def test_plugin_files_are_what_the_shipped_plugins_read() -> None:
    """eqmailctl check must know every control file the plugins in plugins/ read: the
    names in their control_lines/control_int calls are all known, and PLUGIN_FILES has
    no row that no plugin reads."""
    from eqmail.control import PLUGIN_FILES, known_file

    plugins = Path(__file__).resolve().parents[2] / "plugins"
    read: set[str] = set()
    for f in plugins.iterdir():
        if f.is_file() and ("." not in f.name or f.name == "sppkit.py"):
            text = f.read_text()
            read |= set(re.findall(r'control_(?:lines|int)\(\s*"([^"]+)"', text))
            read |= set(re.findall(r'os\.path\.join\("control", "([^"]+)"\)', text))
    assert {"greylistdelay", "tarpitcount", "spfsoftfail", "dnsbl"} <= read  # the scan works
    assert sorted(n for n in read if not known_file(n)) == []
    assert {fn for fn, _, _ in PLUGIN_FILES} <= read


def test_client_limits_defaults_and_relay_default(tmp_path: Path) -> None:
    """Issue 12: Postfix's smtpd defaults; the relay limit follows concurrencyperclient
    unless set (relay clients are exempt only when the admin says so)."""
    c = load_controls(make(tmp_path, me="mx.example"))
    assert (c.concurrencyperclient, c.concurrencyperclientrelay, c.mindatarate, c.maxrcpt) == (50, 50, 500, 1000)
    assert (c.smtperrorsoftlimit, c.smtperrorhardlimit, c.smtperrorsleep, c.smtpjunklimit) == (10, 20, 1, 100)
    c = load_controls(make(tmp_path, me="mx.example", concurrencyperclient="7\n"))
    assert (c.concurrencyperclient, c.concurrencyperclientrelay) == (7, 7)
    c = load_controls(make(tmp_path, me="mx.example", concurrencyperclientrelay="0\n"))
    assert (c.concurrencyperclient, c.concurrencyperclientrelay) == (7, 0)
    assert sorted(errors_of(make(tmp_path, me="mx.example", maxrcpt="0\n", mindatarate="fast\n"))) == [
        "control/maxrcpt:1: 0 out of range 1..1000000", "control/mindatarate:1: not a number: 'fast'"]


# ------------------------------------------------------------------ parsed once (issue 13)


def test_controls_has_no_defaults_of_its_own_and_the_table_gives_every_one(tmp_path: Path) -> None:
    """Each default is written once, in eqmail.control.files: Controls fields have none,
    and a directory with only control/me gives every row's default."""
    from dataclasses import MISSING, fields

    from eqmail.control import FILES, Controls, value_of
    from eqmail.control.files import Number, Text

    assert [f.name for f in fields(Controls) if f.default is not MISSING or f.default_factory is not MISSING] == []
    c = load_controls(make(tmp_path, me="mx.example\n"))
    numbers: dict[str, int] = {}
    for row in FILES:
        value = value_of(c, row.name)  # every row names a Controls field
        if isinstance(row, Number):
            numbers[row.name] = row.default if isinstance(row.default, int) else numbers[row.default]
            assert value == numbers[row.name], row
        elif isinstance(row, Text):
            assert value == ("mx.example" if row.from_me else row.default), row


def test_rules_assign_authlimit_and_tlsclients_are_part_of_controls(tmp_path: Path) -> None:
    from eqmail.authlimit import AuthLimit

    root = make(tmp_path, me="mx.example\n", listen="smtp 127.0.0.1:25\nsmtp 127.0.0.1:26 rules=tcp.other\n",
                tcp_smtp='127.0.0.1:allow,RELAYCLIENT=""\n:deny\n', assign="=joe:joe:1000:1000:/home/joe:::\n.\n",
                authlimit="4 120 2\n", tlsclients="# who\na@client.example\n\nb@client.example \n")
    (root / "control" / "tcp.other").write_text("127.0.0.2:deny\n")
    c = load_controls(root)
    smtp, other = c.rules_for("tcp.smtp"), c.rules_for("tcp.other")
    assert smtp is not None and smtp.match("127.0.0.1").env == {"RELAYCLIENT": ""}
    assert not smtp.match("10.0.0.1").allow
    assert other is not None and not other.match("127.0.0.2").allow and other.match("127.0.0.1").allow
    assert c.rules_for("tcp.absent") is None
    assert c.tcp_smtp == '127.0.0.1:allow,RELAYCLIENT=""\n:deny\n'  # shown by eqmailctl check
    assert c.assign is not None and (entry := c.assign.lookup("joe")) is not None and entry.uid == 1000
    assert c.authlimit == AuthLimit(4, 120.0, 2.0) and c.warnings == ()
    assert c.tlsclients == frozenset({"a@client.example", "b@client.example"})
    # the same files parse to an equal value (a reload compares them), a change does not
    assert load_controls(root) == c and hash(load_controls(root)) == hash(c)
    (root / "control" / "tcp.other").write_text("127.0.0.3:deny\n")
    changed = load_controls(root)
    assert changed != c and changed.rules_for("tcp.smtp") == smtp and changed.rules_for("tcp.other") != other


def test_defaults_of_the_files_the_workers_used_to_read(tmp_path: Path) -> None:
    from eqmail.authlimit import AuthLimit

    c = load_controls(make(tmp_path, me="mx.example\n"))
    assert c.tcprules == () and c.rules_for("tcp.smtp") is None and c.tcp_smtp == ""
    assert c.assign is None and c.authlimit == AuthLimit() and c.tlsclients == frozenset()
    assert c.warnings == () and c.tlsfiles == ()


def test_a_bad_authlimit_is_a_warning_with_the_defaults(tmp_path: Path) -> None:
    from eqmail.authlimit import AuthLimit

    c = load_controls(make(tmp_path, me="mx.example\n", authlimit="lots\n"))
    assert c.authlimit == AuthLimit()
    assert c.warnings == ("control/authlimit:1: FAILURES is not a number: 'lots'; using defaults",)


def test_a_bad_rules_file_is_an_error_only_when_a_listener_names_it(tmp_path: Path) -> None:
    root = make(tmp_path, me="mx.example\n", tcp_smtp="127.0.0.1:maybe\n",
                listen="smtp 127.0.0.1:25 rules=tcp.other\n")
    (root / "control" / "tcp.other").write_text("# c\n300.0.0.1:allow\n")
    out = errors_of(root)
    assert len(out) == 1 and out[0].startswith("control/tcp.other:2: bad address '300.0.0.1'")
    (root / "control" / "listen").write_text("smtp 127.0.0.1:25\nsmtp 127.0.0.1:26\n")
    assert errors_of(root) == ["control/tcp.smtp:1: no ':allow' or ':deny' instruction"] * 2


def test_tlsfiles_change_when_a_certificate_is_replaced(tmp_path: Path) -> None:
    root = make(tmp_path, me="mx.example\n", servercert_pem="one\n")
    first = load_controls(root)
    assert [s.name for s in first.tlsfiles] == ["servercert.pem"]
    assert load_controls(root) == first
    new = root / "control" / "servercert.pem.new"
    new.write_text("two, longer\n")
    new.rename(root / "control" / "servercert.pem")
    assert load_controls(root).tlsfiles != first.tlsfiles


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["authlimit", "tlsclients"]), data=st.binary(max_size=200)
       | st.text(alphabet="0123456789 .#\t\n@abc", max_size=60).map(str.encode))
def test_authlimit_and_tlsclients_never_refuse_the_configuration(name: str, data: bytes) -> None:
    """What the listener used to read for itself keeps its rules: a bad authlimit is a
    warning with the defaults, tlsclients is a list of whatever lines it has."""
    with tempfile.TemporaryDirectory() as d:
        root = make(Path(d), me="mx.example\n")
        (root / "control" / name).write_bytes(data)
        c = load_controls(root)
        assert all(w.startswith("control/authlimit:1: ") and w.endswith("; using defaults") for w in c.warnings)
        assert all(addr and addr == addr.strip() for addr in c.tlsclients)
