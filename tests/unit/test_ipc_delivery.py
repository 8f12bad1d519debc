"""The delivery protocol (eqmail.ipc.delivery): every message round-trips, the bytes are
those qmail-style workers and scanners have always exchanged, and bad bytes raise only
ProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.ipc import SLOT_MAX, ProtocolError, frame, take_frames
from eqmail.ipc.delivery import (
    REPORT_MAX,
    Adopted,
    Attach,
    BadMessageId,
    Channel,
    DeliveryReport,
    DeliveryRequest,
    Detach,
    Detached,
    EndOfList,
    LocalChildJob,
    Outcome,
    Site,
    Verdict,
    decode_to_scanner,
    decode_to_worker,
    parse_scanner_slot,
    scanner_slot,
)
from eqmail.textio import decode

# Envelope text as eqmail keeps it: any bytes but NUL, decoded with surrogateescape.
text = st.binary(max_size=200).map(lambda b: decode(b.replace(b"\0", b"")))
slots = st.binary(min_size=1, max_size=SLOT_MAX).map(lambda b: b.replace(b"\0", b"x"))
keys = st.from_regex(r"[a-z0-9][a-z0-9-]{0,31}", fullmatch=True)
options = st.dictionaries(keys, text, max_size=4).map(lambda d: tuple(d.items()))
requests = st.builds(DeliveryRequest, slots, st.integers(0, 10**20 - 1), text, text,
                     st.sampled_from(Channel), options)
outcomes = st.builds(Outcome, st.sampled_from(Verdict), text, st.sampled_from(Site))
reports = st.builds(DeliveryReport, slots, outcomes)


@given(requests)
def test_a_request_round_trips(req: DeliveryRequest) -> None:
    assert DeliveryRequest.decode(req.encode(), req.channel) == req
    ((kind, payload),) = take_frames(bytearray(req.frame()))
    assert decode_to_worker(kind, payload, req.channel) == req


@given(reports)
def test_a_report_round_trips(rep: DeliveryReport) -> None:
    assert DeliveryReport.decode(rep.encode()) == rep
    ((kind, payload),) = take_frames(bytearray(rep.frame()))
    assert decode_to_scanner(kind, payload) == rep


@given(slots)
def test_the_hand_over_frames_round_trip(slot: bytes) -> None:
    for msg in (Adopted(slot), EndOfList(), Detached()):
        ((kind, payload),) = take_frames(bytearray(msg.frame()))
        assert decode_to_scanner(kind, payload) == msg
    for msg2 in (Attach(), Detach()):
        ((kind, payload),) = take_frames(bytearray(msg2.frame()))
        assert decode_to_worker(kind, payload, Channel.LOCAL) == msg2


@given(st.builds(LocalChildJob, text, text, text, text, text, text, text, text, text))
def test_a_local_child_job_round_trips(job: LocalChildJob) -> None:
    assert LocalChildJob.decode(job.encode()) == job


@given(st.sampled_from(b"DAQraeq"), st.binary(max_size=300), st.sampled_from(Channel))
def test_random_bytes_raise_only_protocol_error(kind: int, payload: bytes, channel: Channel) -> None:
    k = bytes([kind])
    for decoder in (lambda: decode_to_worker(k, payload, channel), lambda: decode_to_scanner(k, payload),
                    lambda: LocalChildJob.decode(payload), lambda: Outcome.decode(payload)):
        try:
            decoder()
        except ProtocolError:
            pass


@given(st.binary(max_size=120))
def test_random_frames_raise_only_protocol_error(data: bytes) -> None:
    try:
        for kind, payload in take_frames(bytearray(data)):
            if kind in b"DAQ":
                decode_to_worker(kind, payload, Channel.REMOTE)
            else:
                decode_to_scanner(kind, payload)
    except ProtocolError:
        pass


def test_the_bytes_are_those_of_before() -> None:
    req = DeliveryRequest(b"4711.12", 4711, "s@x.test", "u@y.test", Channel.REMOTE)
    assert req.frame() == frame(b"D", b"4711.12\0004711\0s@x.test\0u@y.test\0")
    rep = DeliveryReport(b"4711.12", Outcome(Verdict.SUCCESS, "did 0+0+1\n"))
    assert rep.frame() == frame(b"r", b"4711.12\0Kdid 0+0+1\n")
    assert Outcome(Verdict.FAILURE, "no\n").encode() == b"Dno\n"
    assert Outcome(Verdict.DEFERRAL, "").encode() == b"Z"
    assert [m.frame() for m in (Attach(), Adopted(b"1.2"), EndOfList(), Detach(), Detached())] == [
        frame(b"A"), frame(b"a", b"1.2"), frame(b"e"), frame(b"Q"), frame(b"q")]
    job = LocalChildJob("u", "/home/u", "u-ext", "-", "ext", "y.test", "s@x.test", "./Maildir/", "me")
    assert job.encode() == b"u\0/home/u\0u-ext\0-\0ext\0y.test\0s@x.test\0./Maildir/\0me\0"


def test_options_follow_the_four_fields_and_older_requests_decode() -> None:
    req = DeliveryRequest(b"1.0", 1, "", "u@y.test", Channel.LOCAL, (("notify", "FAILURE"),))
    assert req.encode() == b"1.0\0001\0\0u@y.test\0notify=FAILURE\0"
    assert DeliveryRequest.decode(b"1.0\0001\0\0u@y.test\0", Channel.LOCAL).options == ()
    for bad in (b"1.0\0001\0\0u@y.test\0=x\0", b"1.0\0001\0\0u@y.test\0Notify=x\0",
                b"1.0\0001\0\0u@y.test\0a=1\0a=2\0", b"1.0\0001\0\0u@y.test\0novalue\0"):
        with pytest.raises(ProtocolError):
            DeliveryRequest.decode(bad, Channel.LOCAL)
    with pytest.raises(ProtocolError):
        DeliveryRequest(b"1.0", 1, "", "u@y.test", Channel.LOCAL, (("a", "1"), ("a", "2"))).encode()


def test_a_bad_message_id_names_its_slot() -> None:
    for msgid in (b"", b"12x", b"1" * 21, b"-1"):
        with pytest.raises(BadMessageId) as e:
            DeliveryRequest.decode(b"9.3\0" + msgid + b"\0s\0r\0", Channel.LOCAL)
        assert e.value.slot == b"9.3"


def test_malformed_requests_and_reports_are_refused() -> None:
    for bad in (b"", b"1.0\0001\0s\0r", b"1.0\0001\0s\0", b"\0" + b"1\0s\0r\0",
                b"1" * (SLOT_MAX + 1) + b"\0001\0s\0r\0"):
        with pytest.raises(ProtocolError):
            DeliveryRequest.decode(bad, Channel.LOCAL)
    for bad in (b"", b"1.0", b"1.0\0", b"1.0\0Xtext", b"\0Ktext"):
        with pytest.raises(ProtocolError):
            DeliveryReport.decode(bad)
    with pytest.raises(ProtocolError):
        Attach.decode(b"x")
    with pytest.raises(ProtocolError):
        DeliveryRequest(b"1.0", 1, "s\0", "r", Channel.LOCAL).encode()


def test_verdict_letters_are_only_the_encoding() -> None:
    assert [v.letter for v in Verdict] == ["K", "Z", "D"]
    assert [v.value for v in Verdict] == ["success", "deferral", "failure"]
    assert Verdict.from_letter("D") is Verdict.FAILURE
    with pytest.raises(ProtocolError):
        Verdict.from_letter("X")


def test_an_outcome_is_cut_to_what_a_report_carries() -> None:
    assert Outcome(Verdict.FAILURE, "x" + "Dx" * 9999).cut().encode() == b"D" + b"xD" * 4999 + b"x"
    short = Outcome(Verdict.SUCCESS, "1.2.3.4 accepted message.\n")
    assert short.cut() is short
    long = Outcome(Verdict.SUCCESS, "y" * 20000).cut()
    assert len(long.encode()) == REPORT_MAX


def test_the_scanner_slot_reads_back() -> None:
    assert scanner_slot(77, 12) == b"77.12"
    assert parse_scanner_slot(b"77.12") == (77, 12)
    assert parse_scanner_slot(b"77") is None and parse_scanner_slot(b"a.1") is None


def test_the_site_travels_as_a_typed_prefix_and_only_when_said() -> None:
    """A remote delivery that reached no host of the domain says so with a typed value
    before the letter; an outcome that says nothing has the bytes of before."""
    out = Outcome(Verdict.DEFERRAL, "Sorry, no connection. (#4.4.1)\n", Site.UNREACHABLE)
    assert out.encode() == b"+unreachable\0ZSorry, no connection. (#4.4.1)\n"
    rep = DeliveryReport(b"9.0", out)
    assert rep.frame() == frame(b"r", b"9.0\0+unreachable\0ZSorry, no connection. (#4.4.1)\n")
    assert DeliveryReport.decode(rep.encode()).outcome.site is Site.UNREACHABLE
    assert Outcome.decode(b"Zx").site is Site.UNKNOWN
    # the text is qmail's and never consulted: a text that looks like a site is text
    assert Outcome.decode(b"Z+unreachable\0").site is Site.UNKNOWN
    for bad in (b"+unreachable", b"+unreachable\0", b"+unknown\0Zx", b"+dead\0Zx",
                b"+\xff\0Zx", b"+unreachable\0Xx"):
        with pytest.raises(ProtocolError):
            Outcome.decode(bad)
        with pytest.raises(ProtocolError):
            DeliveryReport.decode(b"1.0\0" + bad)


def test_a_cut_outcome_keeps_its_site_and_fits() -> None:
    long = Outcome(Verdict.DEFERRAL, "z" * 20000, Site.UNREACHABLE).cut()
    assert long.site is Site.UNREACHABLE
    assert len(long.encode()) == REPORT_MAX
    assert Outcome.decode(long.encode()) == long
