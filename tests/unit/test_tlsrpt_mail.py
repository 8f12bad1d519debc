"""The daily TLS-RPT mail (eqmail.delivery.tlsrptmail): RFC 8460 §3's TXT record
(``v=TLSRPTv1; rua=...``), parsed from untrusted DNS text, and the §5.3 message, read
back with Python's email package."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import json
import re
from email.message import EmailMessage
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.delivery import tlsrpt
from eqmail.delivery.tlspolicy import PolicyKind, ResultType, SessionResult
from eqmail.delivery.tlsrptmail import (
    MAX_URIS,
    RecordError,
    TlsRptRecord,
    choose_record,
    is_hostname,
    parse_txt,
    report_message,
)

SCHEMA = json.loads((Path(__file__).parents[1] / "tlsrpt_schema.json").read_text())
DAY = dt.date(2026, 12, 7)
T0 = dt.datetime(2026, 12, 7, 10, 0, tzinfo=dt.UTC).timestamp()
NOW = T0 + 86400


# ---------------------------------------------------------------- the TXT record


@pytest.mark.parametrize("text, mailto, https", [
    ("v=TLSRPTv1; rua=mailto:reports@example.com", ("reports@example.com",), ()),
    ("v=TLSRPTv1;rua=mailto:a@example.com,mailto:b@example.org;", ("a@example.com", "b@example.org"), ()),
    ("v=TLSRPTv1; rua=mailto:a@example.com , https://r.example/v1/tlsrpt",
     ("a@example.com",), ("https://r.example/v1/tlsrpt",)),
    ("v=TLSRPTv1; rua=https://reporting.example.com/v1/tlsrpt", (), ("https://reporting.example.com/v1/tlsrpt",)),
    ("v=TLSRPTv1; rua=mailto:tls%2Brpt@example.com?subject=x", ("tls+rpt@example.com",), ()),
    ("v=TLSRPTv1; ext-1=abc; rua=MAILTO:a@example.com", ("a@example.com",), ()),
    ("v=TLSRPTv1 ;\trua=mailto:a@example.com,mailto:a@example.com", ("a@example.com",), ()),
])
def test_valid_records(text: str, mailto: tuple[str, ...], https: tuple[str, ...]) -> None:
    assert parse_txt(text) == TlsRptRecord(mailto, https)


@pytest.mark.parametrize("text", [
    "", "v=TLSRPTv2; rua=mailto:a@example.com", "rua=mailto:a@example.com; v=TLSRPTv1",
    "v=TLSRPTv1", "v=TLSRPTv1;", "v=TLSRPTv1; rua=", "v=TLSRPTv1; rua=ftp://x.example/",
    "v=TLSRPTv1; rua=mailto:a@example.com; rua=mailto:b@example.com",
    "v=TLSRPTv1; rua=mailto:not-an-address", "v=TLSRPTv1; rua=mailto:a@b@example.com",
    "v=TLSRPTv1; rua=mailto:a@[10.0.0.1]", "v=TLSRPTv1; rua=mailto:a b@example.com",
    "v=TLSRPTv1; rua=mailto:a@localhost", "v=TLSRPTv1; rua=mailto:%0a@example.com",
    "v=TLSRPTv1; rua=mailto:%ff@example.com",
    "v=TLSRPTv1; rua=mailto:a@example.com; bad field", "v=TLSRPTv1; x=a=b; rua=mailto:a@example.com",
    "v=TLSRPTv1; rua=mailto:\u00e9@example.com", "v=TLSRPTv1; rua=mailto:a@" + "x" * 300 + ".com",
    "v=TLSRPTv1; rua=mailto:a@example.com" + "," * 5000,
])
def test_invalid_records(text: str) -> None:
    with pytest.raises(RecordError):
        parse_txt(text)


def test_uris_are_bounded() -> None:
    text = "v=TLSRPTv1; rua=" + ",".join(f"mailto:r{i}@example.com" for i in range(20))
    assert len(parse_txt(text).mailto) == MAX_URIS


def test_exactly_one_record_counts() -> None:
    good = b"v=TLSRPTv1; rua=mailto:a@example.com"
    assert choose_record([b"v=spf1 -all", good]).mailto == ("a@example.com",)
    for texts in ([], [b"v=spf1 -all"], [good, b"v=TLSRPTv1; rua=mailto:b@example.com"],
                  [b"v=TLSRPTv1; rua=mailto:\xff@example.com"]):
        with pytest.raises(RecordError):
            choose_record(texts)


@given(st.text(max_size=300))
def test_any_text_is_a_record_or_refused(text: str) -> None:
    try:
        rec = parse_txt(text)
    except RecordError:
        return
    assert all(is_hostname(a.split("@")[1]) for a in rec.mailto)


@given(st.lists(st.binary(max_size=200), max_size=4))
def test_any_txt_answer_is_a_record_or_refused(texts: list[bytes]) -> None:
    try:
        choose_record(texts)
    except RecordError:
        pass


# ---------------------------------------------------------------- the message


def _report() -> dict[str, object]:
    rows = [SessionResult(T0, "example.net", PolicyKind.STS_ENFORCE, "mx.example.net", "10.99.0.2",
                          "10.99.0.1", None, policy_strings=("version: STSv1", "mode: enforce"),
                          mx_patterns=("mx.example.net",)),
            SessionResult(T0 + 1, "example.net", PolicyKind.STS_ENFORCE, "mx.example.net", "10.99.0.2",
                          "10.99.0.1", ResultType.CERTIFICATE_HOST_MISMATCH,
                          detail="received certificate for x.test",
                          policy_strings=("version: STSv1", "mode: enforce"), mx_patterns=("mx.example.net",))]
    [report] = tlsrpt.reports(rows, DAY, "mx.test.example")
    return report


def test_message_is_rfc8460_section_5_3() -> None:
    report = _report()
    raw = report_message(report, "mx.test.example", "postmaster@mx.test.example",
                         ("tls@example.net", "rua2@example.org"), NOW, "mx.test.example")
    assert b"\r" not in raw  # the queue stores LF line ends
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg["From"] == "postmaster@mx.test.example"
    assert msg["To"] == "tls@example.net, rua2@example.org"
    rid = "2026-12-07T00:00:00Z_example.net@mx.test.example"
    assert re.sub(r"\s+", " ", str(msg["Subject"])) == (
        f"Report Domain: example.net Submitter: mx.test.example Report-ID: <{rid}>")
    assert msg["TLS-Report-Domain"] == "example.net"
    assert msg["TLS-Report-Submitter"] == "mx.test.example"
    assert msg["TLS-Required"] == "No"
    assert msg["Date"] and msg["Message-ID"].endswith("@mx.test.example>")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    text, attachment = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "aggregate TLS report" in text.get_content() and "1 successful, 1 failed" in text.get_content()
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_content_disposition() == "attachment"
    begin = int(dt.datetime(2026, 12, 7, tzinfo=dt.UTC).timestamp())
    name = attachment.get_filename()
    assert name is not None
    assert re.fullmatch(rf"mx\.test\.example!example\.net!{begin}!{begin + 86399}![A-Za-z0-9]+\.json\.gz",
                        name), name
    body = json.loads(gzip.decompress(attachment.get_content()))
    jsonschema.validate(body, SCHEMA)
    assert body == report


def test_same_report_same_name_and_id() -> None:
    """A report sent again (a crash before the marker) carries the same Report-ID and
    file name, so a receiver can tell it is the same one."""
    a = email.message_from_bytes(report_message(_report(), "m.example", "p@m.example", ("r@example.net",),
                                                NOW, "m.example"), policy=email.policy.default)
    b = email.message_from_bytes(report_message(_report(), "m.example", "p@m.example", ("r@example.net",),
                                                NOW + 3600, "m.example"), policy=email.policy.default)
    assert a["Subject"] == b["Subject"]
    assert list(a.iter_parts())[1].get_filename() == list(b.iter_parts())[1].get_filename()
