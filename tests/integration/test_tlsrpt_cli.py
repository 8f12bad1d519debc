"""TLS-RPT as an operator and a report receiver see it, on a real instance directory:
sessions recorded under <root>/tlsrpt/ (as the remote delivery user would), ``eqmailctl
tlsrpt [--date] [--json]`` (the JSON checked against the schema written from RFC 8460
§4.4), ``queue show`` naming the TLS policy of a deferred remote domain, ``status``'s
failure line, and the daily report mail: ``send_due`` with a loopback DNS server
(tests/dnsserver.py) publishing ``_smtp._tls`` records and a running instance, the
report arriving in a local user's Maildir and read back with Python's email package."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import json
import pwd
import random
import re
import shutil
import stat
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path

import jsonschema
import pytest
from dnsserver import DnsServer, txt
from harness import IS_ROOT, ME, VENV_BIN, Instance, poll
from smtpsink import Script, SmtpSink, mint

from eqmail.control import load_controls
from eqmail.delivery import tlsrpt
from eqmail.delivery.tlspolicy import (
    PolicyKind,
    ResultType,
    SessionResult,
    StsLookup,
    StsMode,
    StsPolicy,
)
from eqmail.instance import Instance as EqInstance
from eqmail.ipc.delivery import Verdict
from eqmail.workers.tlsrptsend import marker_dir, send_due

pytestmark = pytest.mark.timeout(240)

SCHEMA = json.loads((Path(__file__).parents[1] / "tlsrpt_schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
STS = ("version: STSv1", "mode: enforce", "mx: mx.example.net", "max_age: 86400")


def session(when: float, domain: str = "example.net", result: ResultType | None = None,
            policy: PolicyKind = PolicyKind.STS_ENFORCE, **kw: str) -> SessionResult:
    return SessionResult(when, domain, policy, kw.get("mx", f"mx.{domain}"), kw.get("ip", "10.99.0.2"),
                         "127.0.0.1", result, detail=kw.get("detail", ""), policy_strings=STS,
                         mx_patterns=(f"mx.{domain}",))


def validate(reports: object) -> None:
    assert isinstance(reports, list)
    for rep in reports:
        errors = [f"{list(e.path)}: {e.message}" for e in VALIDATOR.iter_errors(rep)]
        assert not errors, errors


def test_setup_makes_the_records_directory(instance: Instance) -> None:
    d = instance.root / "tlsrpt"
    st = d.stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    if IS_ROOT:
        assert st.st_uid == pwd.getpwnam("eqmailr").pw_uid
        # the remote delivery user can record; the file is readable by everyone
        code = ("import sys, time; from pathlib import Path; from eqmail.delivery import tlsrpt; "
                "from eqmail.delivery.tlspolicy import PolicyKind, SessionResult; "
                "tlsrpt.record(Path(sys.argv[1]), SessionResult(time.time(), 'example.net', "
                "PolicyKind.DANE, 'mx.example.net', '10.99.0.2', '127.0.0.1', None))")
        proc = subprocess.run(["runuser", "-u", "eqmailr", "--", str(VENV_BIN / "python"), "-c", code,
                               str(instance.root)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        [f] = d.iterdir()
        assert (f.stat().st_uid, stat.S_IMODE(f.stat().st_mode)) == (pwd.getpwnam("eqmailr").pw_uid, 0o644)


def test_tlsrpt_command(instance: Instance) -> None:
    inst = instance
    now = time.time()
    empty = inst.ctl("tlsrpt")
    assert empty.stdout == f"TLS-RPT {tlsrpt.day_of(now)} (so far): no sessions under a DANE or MTA-STS policy\n"
    assert json.loads(inst.ctl("tlsrpt", "--json").stdout) == []

    root = inst.root
    tlsrpt.record(root, session(now - 5))
    tlsrpt.record(root, session(now - 4, result=ResultType.CERTIFICATE_HOST_MISMATCH,
                                detail="received certificate for other.test"))
    tlsrpt.record(root, session(now - 3, "dane.example", policy=PolicyKind.DANE))
    tlsrpt.record(root, session(now - 2, "plain.example", policy=PolicyKind.OPPORTUNISTIC))
    yesterday = now - 86400
    tlsrpt.record(root, session(yesterday, "old.example", ResultType.STARTTLS_NOT_SUPPORTED))

    reports = json.loads(inst.ctl("tlsrpt", "--json").stdout)
    validate(reports)
    assert [r["policies"][0]["policy"]["policy-domain"] for r in reports] == ["dane.example", "example.net"]
    net = reports[1]
    assert net["organization-name"] == ME and net["contact-info"] == f"postmaster@{ME}"
    assert net["date-range"]["start-datetime"] == f"{tlsrpt.day_of(now)}T00:00:00Z"
    end = dt.datetime.strptime(net["date-range"]["end-datetime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    assert abs(end.timestamp() - time.time()) < 60  # today so far: the range ends now
    [p] = net["policies"]
    assert p["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    assert p["failure-details"] == [{
        "result-type": "certificate-host-mismatch", "sending-mta-ip": "127.0.0.1",
        "receiving-mx-hostname": "mx.example.net", "receiving-ip": "10.99.0.2",
        "failed-session-count": 1, "failure-reason-code": "received certificate for other.test"}]

    text = inst.ctl("tlsrpt").stdout
    assert text.startswith(f"TLS-RPT {tlsrpt.day_of(now)} (so far), reporting as {ME}\n")
    assert "\nexample.net: 1 successful, 1 failed\n" in text
    assert ("        1 x certificate-host-mismatch mx.example.net [10.99.0.2] from 127.0.0.1: "
            "received certificate for other.test\n") in text
    assert "\ndane.example: 1 successful, 0 failed\n" in text and "plain.example" not in text

    old_day = str(tlsrpt.day_of(yesterday))
    old = json.loads(inst.ctl("tlsrpt", "--date", old_day, "--json").stdout)
    validate(old)
    [rep] = old
    assert rep["date-range"] == {"start-datetime": f"{old_day}T00:00:00Z", "end-datetime": f"{old_day}T23:59:59Z"}
    assert rep["policies"][0]["failure-details"][0]["result-type"] == "starttls-not-supported"
    assert inst.ctl("tlsrpt", "--date", old_day).stdout.startswith(f"TLS-RPT {old_day}, reporting as")

    for bad in ("yesterday", "2026-13-01", "2026-1-5", "20261205"):
        proc = inst.ctl("tlsrpt", "--date", bad, check=False)
        assert proc.returncode == 2 and proc.stdout == ""
        assert f"eqmailctl tlsrpt: error: argument --date: not a date (YYYY-MM-DD): '{bad}'" in proc.stderr


def _wait_remote_deferral(inst: Instance) -> int:
    def deferred() -> int | None:
        listing = inst.ctl("queue", "list").stdout
        if re.search(r"delivery \d+: deferral", inst.log()) and "\tremote\tsomeone@remote.example" in listing:
            return int(re.findall(r"#(\d+)", listing)[0])
        return None
    return int(poll(deferred, 60, "the remote deferral", inst))  # type: ignore[arg-type]


def test_queue_show_and_status_name_the_policy(instance: Instance) -> None:
    inst = instance
    inst.write_control("smtproutes", "remote.example:127.0.0.1:1")  # nobody listens: deferred
    inst.start()
    proc = inst.sendmail(["-f", f"testuser@{ME}", "someone@remote.example"], b"Subject: tls\n\nhi\n")
    assert proc.returncode == 0, proc.stderr
    msgid = _wait_remote_deferral(inst)
    tlsrpt.record(inst.root, session(time.time(), "remote.example", ResultType.CERTIFICATE_HOST_MISMATCH,
                                     detail="received certificate for x.test"))
    shown = inst.ctl("queue", "show", str(msgid)).stdout
    lines = shown.split("\n")
    at = lines.index("origin: local")
    assert re.fullmatch(r"tls: remote\.example: mta-sts enforce, last attempt \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: "
                        r"certificate-host-mismatch at mx\.remote\.example \[10\.99\.0\.2\]: "
                        r"received certificate for x\.test", lines[at + 1]), lines[at + 1]
    assert lines[at + 2] == "" and "Subject: tls" in shown
    js = json.loads(inst.ctl("queue", "show", str(msgid), "--json").stdout)
    [tls] = js["tls"]
    assert (tls["domain"], tls["policy"], tls["result"], tls["mx_host"]) == (
        "remote.example", "mta-sts enforce", "certificate-host-mismatch", "mx.remote.example")

    status = inst.ctl("status").stdout
    assert "\nTLS policy failures today (eqmailctl tlsrpt): remote.example 1" in status
    assert json.loads(inst.ctl("status", "--json").stdout)["tls_failures"] == {"remote.example": 1}


def test_daily_reports_are_mailed_once(instance: Instance, capfd: pytest.CaptureFixture[str]) -> None:
    inst = instance
    rua = f"testuser@{ME}"
    zone = {"_smtp._tls.example.net": {"TXT": [txt(f"v=TLSRPTv1; rua=mailto:{rua},https://r.example/tlsrpt")]},
            "_smtp._tls.norpt.example": {"TXT": [txt("v=spf1 -all")]},
            "_smtp._tls.broken.example": "SERVFAIL"}
    server = DnsServer(zone)
    port = server.start()
    try:
        inst.write_control("dnsservers", f"127.0.0.1:{port}")
        inst.start()
        now = time.time()
        when = now - 2 * 86400  # a finished day within the look-back window
        day = tlsrpt.day_of(when)
        for d in ("example.net", "norpt.example", "broken.example"):
            tlsrpt.record(inst.root, session(when, d))
        tlsrpt.record(inst.root, session(when + 1, "example.net", ResultType.CERTIFICATE_EXPIRED,
                                         detail="certificate expired 2026-01-01"))
        tlsrpt.record(inst.root, session(now, "example.net"))  # today's: not yet reported
        eq = EqInstance(inst.root)
        assert send_due(eq, load_controls(inst.root), now) == 1
        [path] = inst.wait_for_mail(1)
        marker = marker_dir(inst.root) / day.isoformat()
        assert marker.read_text() == "example.net sent\nnorpt.example none\n"  # broken: retried later
        assert ("_smtp._tls.broken.example", "TXT") in server.queries

        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        assert msg["From"] == f"postmaster@{ME}" and msg["To"] == rua
        assert msg["TLS-Report-Domain"] == "example.net" and msg["TLS-Report-Submitter"] == ME
        rid = f"{day.isoformat()}T00:00:00Z_example.net@{ME}"
        assert re.sub(r"\s+", " ", str(msg["Subject"])) == (
            f"Report Domain: example.net Submitter: {ME} Report-ID: <{rid}>")
        assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
        _text, part = msg.iter_parts()
        assert part.get_content_type() == "application/tlsrpt+gzip"
        begin = int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp())
        assert re.fullmatch(rf"{re.escape(ME)}!example\.net!{begin}!{begin + 86399}![0-9a-f]+\.json\.gz",
                            part.get_filename() or "")
        report = json.loads(gzip.decompress(part.get_content()))
        validate([report])
        assert report["report-id"] == rid
        assert report["policies"][0]["summary"] == {"total-successful-session-count": 1,
                                                    "total-failure-session-count": 1}

        # once: a second call mails nothing; a domain whose lookup failed is tried again
        assert send_due(eq, load_controls(inst.root), now + 3600) == 0
        assert len(inst.maildir_files()) == 1
        server.zone["_smtp._tls.broken.example"] = {"TXT": [txt(f"v=TLSRPTv1; rua=mailto:{rua}")]}
        assert send_due(eq, load_controls(inst.root), now + 7200) == 1
        inst.wait_for_mail(2)
        assert marker.read_text() == "example.net sent\nnorpt.example none\nbroken.example sent\n.\n"
        assert send_due(eq, load_controls(inst.root), now + 10800) == 0
        time.sleep(0.5)
        assert len(inst.maildir_files()) == 2
        logged = capfd.readouterr().err  # send_due logs to fd 2, as in the policy worker
        assert f"tlsrpt: report {rid} mailed to {rua}: qp " in logged
        assert "tlsrpt: _smtp._tls.broken.example: temporary DNS failure" in logged
    finally:
        server.stop()


# ---------------------------------------------------------------- end to end (issue 17)


class PolicySource:
    """The MTA-STS policy a domain publishes, as the policy worker would answer it."""

    def __init__(self, policy: StsPolicy) -> None:
        self.policy = policy

    def lookup(self, domain: str) -> StsLookup:
        return StsLookup(self.policy if domain == "sts.test" else None)


def _port25_sinks(tmp_path: Path) -> tuple[list[SmtpSink], list[str], Path]:
    """Two STARTTLS peers on port 25 of a random 127.x.y.1/.2 pair: mx1 with a
    certificate for another name, mx2 with one for its own; the test CA's file."""
    good, good_key, ca = mint(tmp_path, ["mx2.sts.test"])
    ca_key = next(tmp_path.glob("ca-*.key"))
    bad, bad_key, _ = mint(tmp_path, ["other.test"], ca=(ca, ca_key))
    rng = random.Random()
    for _ in range(20):
        net = f"127.{rng.randint(100, 250)}.{rng.randint(0, 255)}"
        sinks = [SmtpSink(Script(starttls=True), bad, bad_key), SmtpSink(Script(starttls=True), good, good_key)]
        try:
            for i, s in enumerate(sinks, 1):
                s.listen(f"{net}.{i}", 25)
            return sinks, [f"{net}.1", f"{net}.2"], ca
        except OSError:
            for s in sinks:
                s.stop()
    raise AssertionError("no free 127.x.y.1-2:25")


@pytest.mark.skipif(not IS_ROOT, reason="MX delivery is to port 25: binding it needs root")
def test_a_delivery_under_mta_sts_shows_in_tlsrpt_at_once(instance: Instance, tmp_path: Path) -> None:
    """Remote delivery to a domain with an MTA-STS enforce policy (*.sts.test): its first
    MX presents a certificate for another name (certificate-host-mismatch, never sent
    to), the second a valid one (delivered over TLS); ``eqmailctl tlsrpt --json`` shows
    both sessions at once, in a report that validates against RFC 8460's schema."""
    from eqmail.delivery import remote
    from eqmail.queue import tcpto
    from eqmail.queue.layout import QueuePaths
    from eqmail.smtp.transport import TlsConfig
    from eqmail.spp.bfrmtclient import run_chain

    inst = instance
    sinks, ips, ca = _port25_sinks(tmp_path)
    server = DnsServer({"sts.test": {"MX": [(10, "mx1.sts.test"), (20, "mx2.sts.test")]},
                        "mx1.sts.test": {"A": [ips[0]]}, "mx2.sts.test": {"A": [ips[1]]}})
    try:
        inst.write_control("dnsservers", f"127.0.0.1:{server.start()}")
        shutil.copy(ca, inst.root / "control" / "tlsca.pem")
        text = "version: STSv1\nmode: enforce\nmx: *.sts.test\nmax_age: 86400\n"
        policy = StsPolicy(StsMode.ENFORCE, ("*.sts.test",), 86400, "id1", text, time.time())
        root = inst.root
        job = remote.RemoteJob(load_controls(root), frozenset(), tcpto.Tcpto(root / "queue" / "lock" / "tcpto"),
                               remote.ConnectionCache(1), TlsConfig(root / "control"), run_chain, None,
                               PolicySource(policy), root)
        msgid = 4242
        QueuePaths(root / "queue").mess(msgid).write_bytes(b"Subject: sts\n\nhello\n")
        [outcome] = remote.deliver_batch(job, EqInstance(root), msgid, f"testuser@{ME}", ["rcpt@sts.test"])
        assert outcome.verdict is Verdict.SUCCESS, outcome
        assert not sinks[0].transactions or not sinks[0].transactions[0].mail  # nothing to mx1
        assert sinks[1].transactions[0].tls and sinks[1].transactions[0].rcpts

        [report] = json.loads(inst.ctl("tlsrpt", "--json").stdout)
        validate([report])
        [p] = report["policies"]
        assert p["policy"] == {"policy-type": "sts", "policy-string": text.splitlines(),
                               "policy-domain": "sts.test", "mx-host": ["*.sts.test"]}
        assert p["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
        [fail] = p["failure-details"]
        assert (fail["result-type"], fail["receiving-mx-hostname"], fail["receiving-ip"],
                fail["failed-session-count"]) == ("certificate-host-mismatch", "mx1.sts.test", ips[0], 1)
        assert "other.test" in fail.get("failure-reason-code", "")
        assert "\nsts.test: 1 successful, 1 failed\n" in inst.ctl("tlsrpt").stdout
    finally:
        server.stop()
        for s in sinks:
            s.stop()
