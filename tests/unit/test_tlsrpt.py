"""TLS-RPT records and reports (eqmail.delivery.tlsrpt, RFC 8460 §4): the day files'
round trip, damaged lines, latest(), the report objects (checked against the JSON
schema written from RFC 8460 §4.4, tests/tlsrpt_schema.json), and the text views of
eqmailctl (eqmail.cli.tlsrpt)."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqmail.cli import tlsrpt as cli
from eqmail.delivery import tlsrpt
from eqmail.delivery.tlspolicy import PolicyKind, ResultType, SessionResult

SCHEMA = json.loads((Path(__file__).parents[1] / "tlsrpt_schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
DAY = dt.date(2026, 12, 7)
T0 = dt.datetime(2026, 12, 7, 10, 0, tzinfo=dt.UTC).timestamp()
STS = ("version: STSv1", "mode: enforce", "mx: mx.example.net", "max_age: 86400")
TESTING = ("version: STSv1", "mode: testing", "mx: mx.example.net", "max_age: 86400")
TLSA = ("3 1 1 " + "ab" * 32,)


def validate(report: dict[str, Any]) -> None:
    errors = sorted(VALIDATOR.iter_errors(report), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def sts(when: float = T0, result: ResultType | None = None, **kw: Any) -> SessionResult:
    base: dict[str, Any] = dict(when=when, domain="example.net", policy=PolicyKind.STS_ENFORCE,
                                mx_host="mx.example.net", receiving_ip="10.99.0.2",
                                sending_ip="10.99.0.1", result=result, policy_strings=STS,
                                mx_patterns=("mx.example.net",))
    base.update(kw)
    return SessionResult(**base)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "tlsrpt").mkdir()
    return tmp_path


# ---------------------------------------------------------------- the day files


def test_record_and_read_back(root: Path) -> None:
    rows = [sts(), sts(T0 + 1, ResultType.CERTIFICATE_HOST_MISMATCH, detail="received certificate for x.test"),
            SessionResult(T0 + 2, "dane.example", PolicyKind.DANE, "mx.dane.example", "2001:db8::2",
                          "2001:db8::1", None, matched="TLSA 3 1 1 abab", policy_strings=TLSA)]
    for r in rows:
        tlsrpt.record(root, r)
    path = root / "tlsrpt" / "2026-12-07"
    assert list(tlsrpt.read_day(root, DAY)) == rows
    assert path.read_bytes().count(b"\n") == 3
    assert (path.stat().st_mode & 0o777) == 0o644
    assert list(tlsrpt.read_day(root, DAY + dt.timedelta(days=1))) == []


def test_the_day_is_the_utc_day_of_the_session(root: Path) -> None:
    late = dt.datetime(2026, 12, 7, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    tlsrpt.record(root, sts(late))
    tlsrpt.record(root, sts(late + 1))
    assert sorted(os.listdir(root / "tlsrpt")) == ["2026-12-07", "2026-12-08"]


def test_file_mode_whatever_the_umask(root: Path) -> None:
    old = os.umask(0o077)
    try:
        tlsrpt.record(root, sts())
    finally:
        os.umask(old)
    assert ((root / "tlsrpt" / "2026-12-07").stat().st_mode & 0o777) == 0o644


def test_record_never_raises(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    tlsrpt._warned = 0.0
    tlsrpt.record(tmp_path / "missing", sts())  # no tlsrpt/ directory
    tlsrpt.record(tmp_path / "missing", sts())
    err = capfd.readouterr().err
    assert err.count("warning: tlsrpt: no directory ") == 1  # once a minute
    assert "(made by 'eqmailctl setup'): sessions not recorded" in err
    tlsrpt._warned = 0.0
    (tmp_path / "missing" / "tlsrpt").mkdir(parents=True)
    os.chmod(tmp_path / "missing" / "tlsrpt", 0o555)
    tlsrpt.record(tmp_path / "missing", sts())
    if os.geteuid() != 0:  # root writes anyway
        assert "warning: tlsrpt: cannot record the session with mx.example.net" in capfd.readouterr().err


def test_new_day_file_prunes_old_ones(root: Path) -> None:
    for name in ("2026-10-01", "2026-11-06", "2026-11-05", "notes"):
        (root / "tlsrpt" / name).write_text("")
    tlsrpt.record(root, sts())
    assert sorted(os.listdir(root / "tlsrpt")) == ["2026-11-06", "2026-12-07", "notes"]


def test_damaged_lines_are_skipped(root: Path) -> None:
    good = tlsrpt.encode(sts())
    bad_policy = good.replace(b'"mta-sts enforce"', b'"telepathy"')
    bad_result = good.replace(b'"result":null', b'"result":"fine"')
    glued = good[:40] + good  # a line whose end a crash lost, glued to the next one
    overlong = b'{"x":"' + b"y" * (tlsrpt.MAX_LINE * 2) + b'"}\n'
    data = b"".join([b"garbage\n", good, b"[1,2]\n", bad_policy, bad_result, glued, b"\n",
                     overlong, b'{"when": NaN}\n', b"\xff\xfe\n", good, good[:-1]])
    (root / "tlsrpt" / "2026-12-07").write_bytes(data)
    assert list(tlsrpt.read_day(root, DAY)) == [sts(), sts()]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_decode_of_any_bytes_never_raises(data: bytes) -> None:
    found = tlsrpt.decode(data)
    assert found is None or isinstance(found, SessionResult)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=200).filter(lambda b: b"\n" not in b), max_size=8))
def test_garbage_between_records_loses_nothing_else(root: Path, junk: list[bytes]) -> None:
    good = [sts(T0 + i) for i in range(len(junk) + 1)]
    lines = [tlsrpt.encode(good[0])]
    for j, r in zip(junk, good[1:], strict=True):
        lines += [j + b"\n", tlsrpt.encode(r)]
    (root / "tlsrpt" / "2026-12-07").write_bytes(b"".join(lines))
    found = list(tlsrpt.read_day(root, DAY))
    assert [r for r in found if r in good] == good  # a junk line that decodes is a record too


texts = st.text(max_size=60)
results = st.builds(
    SessionResult,
    when=st.floats(min_value=T0 - 86400, max_value=T0 + 2 * 86400).map(lambda t: round(t, 3)),
    domain=st.sampled_from(["example.net", "EXAMPLE.net.", "dane.example", "[10.0.0.1]", "x\udcff.test"]) | texts,
    policy=st.sampled_from(list(PolicyKind)),
    mx_host=st.sampled_from(["mx.example.net", ""]) | texts,
    receiving_ip=st.sampled_from(["10.99.0.2", "2001:db8::2", ""]) | texts,
    sending_ip=st.sampled_from(["10.99.0.1", "::1", ""]) | texts,
    result=st.none() | st.sampled_from(list(ResultType)),
    detail=texts, matched=texts,
    policy_strings=st.lists(texts, max_size=4).map(tuple),
    mx_patterns=st.lists(texts, max_size=3).map(tuple),
)


@given(results)
def test_encode_decode_round_trip(r: SessionResult) -> None:
    line = tlsrpt.encode(r)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and len(line) <= tlsrpt.MAX_LINE
    assert tlsrpt.decode(line) == r


def test_long_fields_are_cut_to_fit_one_line() -> None:
    big = sts(detail="d" * 5000, policy_strings=tuple("3 0 0 " + "ab" * 2000 for _ in range(10)))
    line = tlsrpt.encode(big)
    back = tlsrpt.decode(line)
    assert back is not None and len(line) <= tlsrpt.MAX_LINE
    assert back.detail == "d" * tlsrpt.MAX_TEXT and 0 < len(back.policy_strings) < 10


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(results, max_size=25))
def test_any_sessions_aggregate_into_schema_valid_reports(rows: list[SessionResult]) -> None:
    reports = tlsrpt.reports(rows, DAY, "mx.test.example")
    for rep in reports:
        validate(rep)
        json.dumps(rep).encode("utf-8")  # every string encodable: no lone surrogates
    counted = [r for r in rows if tlsrpt.day_of(r.when) == DAY and tlsrpt.norm_domain(r.domain)
               and (r.policy in tlsrpt.POLICY_TYPES or r.result in tlsrpt.STS_LOOKUP_FAILURES)]
    totals = [p["summary"] for rep in reports for p in rep["policies"]]
    assert sum(t["total-successful-session-count"] for t in totals) == sum(r.result is None for r in counted)
    assert sum(t["total-failure-session-count"] for t in totals) == sum(r.result is not None for r in counted)
    domains = [rep["policies"][0]["policy"]["policy-domain"] for rep in reports]
    assert domains == sorted(set(domains))  # one report per policy domain
    for rep in reports:
        assert {p["policy"]["policy-domain"] for p in rep["policies"]} == {rep["policies"][0]["policy"]["policy-domain"]}
        for p in rep["policies"]:
            assert sum(d["failed-session-count"] for d in p["failure-details"]) == p["summary"]["total-failure-session-count"]


def test_report_of_a_day_exactly(root: Path) -> None:
    mismatch = ResultType.CERTIFICATE_HOST_MISMATCH
    rows = [sts(), sts(T0 + 5), sts(T0 + 9, mismatch, detail="received certificate for x.test"),
            sts(T0 + 10, mismatch, detail="received certificate for x.test"),
            sts(T0 + 11, policy=PolicyKind.STS_TESTING, result=ResultType.STARTTLS_NOT_SUPPORTED,
                mx_host="mx2.example.net", receiving_ip="10.99.0.3", policy_strings=TESTING),
            SessionResult(T0, "Dane.Example.", PolicyKind.DANE, "mx.dane.example", "10.99.1.2",
                          "10.99.0.1", None, policy_strings=TLSA),
            SessionResult(T0, "plain.example", PolicyKind.OPPORTUNISTIC, "mx.plain.example",
                          "10.99.2.2", "10.99.0.1", None),
            SessionResult(T0, "nofetch.example", PolicyKind.STS_TESTING, "", "", "",
                          ResultType.STS_POLICY_FETCH_ERROR, detail="timed out"),
            sts(T0 + 86400)]  # the next day
    for r in rows:
        tlsrpt.record(root, r)
    reports = tlsrpt.day_reports(root, DAY, "mx.test.example")
    for rep in reports:
        validate(rep)
    assert [r["report-id"] for r in reports] == [
        "2026-12-07T00:00:00Z_dane.example@mx.test.example",
        "2026-12-07T00:00:00Z_example.net@mx.test.example",
        "2026-12-07T00:00:00Z_nofetch.example@mx.test.example"]
    dane, net, nofetch = reports
    assert dane["organization-name"] == "mx.test.example"
    assert dane["contact-info"] == "postmaster@mx.test.example"
    assert dane["date-range"] == {"start-datetime": "2026-12-07T00:00:00Z",
                                  "end-datetime": "2026-12-07T23:59:59Z"}
    assert dane["policies"] == [{
        "policy": {"policy-type": "tlsa", "policy-string": list(TLSA), "policy-domain": "dane.example",
                   "mx-host": ["mx.dane.example"]},
        "summary": {"total-successful-session-count": 1, "total-failure-session-count": 0},
        "failure-details": []}]
    [enforce, testing] = net["policies"]
    assert enforce["policy"] == {"policy-type": "sts", "policy-string": list(STS),
                                 "policy-domain": "example.net", "mx-host": ["mx.example.net"]}
    assert enforce["summary"] == {"total-successful-session-count": 2, "total-failure-session-count": 2}
    assert enforce["failure-details"] == [{
        "result-type": "certificate-host-mismatch", "sending-mta-ip": "10.99.0.1",
        "receiving-mx-hostname": "mx.example.net", "receiving-ip": "10.99.0.2",
        "failed-session-count": 2, "failure-reason-code": "received certificate for x.test"}]
    # the policy changed to testing during the day: its own policies[] entry
    assert testing["policy"]["policy-string"] == list(TESTING)
    assert testing["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    assert testing["failure-details"][0]["result-type"] == "starttls-not-supported"
    assert nofetch["policies"] == [{
        "policy": {"policy-type": "no-policy-found", "policy-domain": "nofetch.example"},
        "summary": {"total-successful-session-count": 0, "total-failure-session-count": 1},
        "failure-details": [{"result-type": "sts-policy-fetch-error", "failed-session-count": 1,
                             "failure-reason-code": "timed out"}]}]


def test_failure_details_are_bounded() -> None:
    rows = [sts(result=ResultType.VALIDATION_FAILURE, detail=f"error {i}")
            for i in range(tlsrpt.MAX_FAILURE_DETAILS + 50)]
    [rep] = tlsrpt.reports(rows, DAY, "me.example")
    [p] = rep["policies"]
    assert len(p["failure-details"]) == tlsrpt.MAX_FAILURE_DETAILS
    assert p["summary"]["total-failure-session-count"] == len(rows)


# ---------------------------------------------------------------- latest()


def test_latest_reads_today_then_yesterday(root: Path) -> None:
    now = T0 + 86400 + 60  # the next day, 10:01 UTC
    tlsrpt.record(root, sts(T0, ResultType.CERTIFICATE_EXPIRED))
    tlsrpt.record(root, sts(T0 + 1, domain="other.example"))
    tlsrpt.record(root, sts(T0 + 2))  # yesterday's last for example.net: a success
    assert tlsrpt.latest(root, "example.net", now) == sts(T0 + 2)
    assert tlsrpt.latest(root, "EXAMPLE.NET.", now) == sts(T0 + 2)
    tlsrpt.record(root, sts(T0 + 86400, ResultType.STARTTLS_NOT_SUPPORTED))
    assert tlsrpt.latest(root, "example.net", now) == sts(T0 + 86400, ResultType.STARTTLS_NOT_SUPPORTED)
    assert tlsrpt.latest(root, "other.example", now) == sts(T0 + 1, domain="other.example")
    assert tlsrpt.latest(root, "unknown.example", now) is None
    assert tlsrpt.latest(root, "example.net", now + 2 * 86400) is None  # older than yesterday
    assert tlsrpt.latest_many(root, ["example.net", "nope.example"], now) == {
        "example.net": sts(T0 + 86400, ResultType.STARTTLS_NOT_SUPPORTED)}


def test_latest_reads_a_bounded_tail(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tlsrpt.record(root, sts(T0, domain="early.example"))
    for i in range(200):
        tlsrpt.record(root, sts(T0 + i))
    monkeypatch.setattr(tlsrpt, "LATEST_SCAN", 2000)
    assert tlsrpt.latest(root, "early.example", T0 + 300) is None  # beyond the scanned tail
    assert tlsrpt.latest(root, "example.net", T0 + 300) == sts(T0 + 199)


# ---------------------------------------------------------------- eqmailctl's views


def test_text_view_and_status_line(root: Path) -> None:
    tlsrpt.record(root, sts())
    tlsrpt.record(root, sts(T0 + 1, ResultType.CERTIFICATE_HOST_MISMATCH, detail="received certificate for x.test"))
    text = cli.format_text(tlsrpt.day_reports(root, DAY, "mx.test.example"), DAY, False)
    assert text == (
        "TLS-RPT 2026-12-07, reporting as mx.test.example\n"
        "\n"
        "example.net: 1 successful, 1 failed\n"
        "  sts             mx mx.example.net: 1 successful, 1 failed\n"
        "        1 x certificate-host-mismatch mx.example.net [10.99.0.2] from 10.99.0.1: "
        "received certificate for x.test\n")
    assert cli.format_text([], DAY, True) == (
        "TLS-RPT 2026-12-07 (so far): no sessions under a DANE or MTA-STS policy\n")
    assert cli.status_failures(root, T0) == {"example.net": 1}
    assert cli.status_line({}) is None
    assert cli.status_line({"b.example": 1, "a.example": 3}) == (
        "TLS policy failures today (eqmailctl tlsrpt): a.example 3, b.example 1")


def test_queue_lines(root: Path) -> None:
    tlsrpt.record(root, sts(T0, ResultType.CERTIFICATE_HOST_MISMATCH, detail="received certificate for x.test"))
    tlsrpt.record(root, SessionResult(T0 + 1, "ok.example", PolicyKind.OPPORTUNISTIC, "mx.ok.example",
                                      "10.0.0.9", "10.0.0.1", None))
    found = dict(cli.queue_tls(root, ["example.net", "ok.example", "none.example"], T0 + 10))
    assert found["none.example"] is None
    assert cli._describe(found["example.net"]) == (  # type: ignore[arg-type]
        "mta-sts enforce, last attempt 2026-12-07 10:00:00 UTC: certificate-host-mismatch at "
        "mx.example.net [10.99.0.2]: received certificate for x.test")
    assert cli._describe(found["ok.example"]) == (  # type: ignore[arg-type]
        "opportunistic, last attempt 2026-12-07 10:00:01 UTC: ok to mx.ok.example [10.0.0.9]")


def test_queue_show_names_the_policy_of_pending_remote_domains(root: Path) -> None:
    from eqmail.queue import inspect
    from eqmail.queue.layout import create_queue

    q = create_queue(root / "queue")
    q.mess(30).write_bytes(b"Subject: hi\n\nbody\n")
    q.info(30).write_bytes(b"Fjoe@mx.test.example\0")
    q.remote(30).write_bytes(b"Ta@Example.NET\0Tb@example.net\0Dc@done.example\0Td@none.example\0")
    q.local(30).write_bytes(b"Tjoe@mx.test.example\0")
    tlsrpt.record(root, sts(time.time(), ResultType.CERTIFICATE_HOST_MISMATCH,
                            detail="received certificate for x.test"))  # queue show reads today's
    m = inspect.message(root, 30)
    assert inspect.pending_domains(m) == ["example.net", "none.example"]
    text = inspect.show(root, 30, lambda d: cli.queue_lines(root, d))
    lines = text.split("\n")
    at = lines.index("origin: network")
    assert lines[at + 1].startswith("tls: example.net: mta-sts enforce, last attempt ")
    assert lines[at + 1].endswith(" UTC: certificate-host-mismatch at mx.example.net [10.99.0.2]: "
                                  "received certificate for x.test")
    assert lines[at + 2] == ("tls: none.example: opportunistic (no DANE, MTA-STS or tlshosts pin "
                             "session recorded today or yesterday)")
    assert lines[at + 3] == "" and lines[at + 4] == "Subject: hi"
    assert inspect.show(root, 30).split("\n")[at + 1] == ""  # without the callback: as before
    shown = inspect.show_json(root, 30, lambda d: cli.queue_json(root, d))
    assert [t["domain"] for t in shown["tls"]] == ["example.net", "none.example"]
    assert shown["tls"][1] == {"domain": "none.example", "policy": None}
