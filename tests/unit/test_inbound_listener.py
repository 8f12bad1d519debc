"""The listener's side of inbound verification (eqmail.workers.inbound): the forged-field
filter on the way to the queue whatever the chunking, the bounded copy kept for the
checks, the DMARC action of control/dmarcreject, and the bound on the checks' time."""

from __future__ import annotations

import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import parsed_controls  # noqa: E402

from eqmail.auth import AuthReport, DmarcDisposition  # noqa: E402
from eqmail.auth.dmarc import Dmarc  # noqa: E402
from eqmail.auth.spfcheck import Spf  # noqa: E402
from eqmail.control import DmarcAction  # noqa: E402
from eqmail.workers import inbound as inbound_mod  # noqa: E402
from eqmail.workers.inbound import MEMORY_MAX, InboundChecker, InboundMessage  # noqa: E402

POOL = ThreadPoolExecutor(2)
MESSAGE = (b"Authentication-Results: mx.example.org; spf=pass\n"
           b"Authentication-Results: other.example; dkim=pass\n"
           b"authentication-results : (c) MX.example.org;\n\tdkim=pass header.d=x\n"
           b"From: a@example.com\nSubject: hi\n\n"
           b"Authentication-Results: mx.example.org; in the body: kept\n")
FILTERED = (b"Authentication-Results: other.example; dkim=pass\n"
            b"From: a@example.com\nSubject: hi\n\n"
            b"Authentication-Results: mx.example.org; in the body: kept\n")


def checker(**changes: object) -> InboundChecker:
    c = parsed_controls({"authcheck": "1\n", "authservid": "mx.example.org\n",
                         "dnsservers": "127.0.0.1:9\n"}, **changes)
    return InboundChecker(c, POOL, asyncio.Semaphore(1))


FIELD = b"Authentication-Results: mx.example.org; none\n"


def run_through(msg: InboundMessage, chunks: list[bytes]) -> bytes:
    """What reaches the queue writer, the field prepended where it says."""
    streamed = b"".join(msg.feed(c) for c in chunks) + msg.end()
    now, prepend = msg.commit(inbound_mod.Verdict(FIELD, None, ""))
    if prepend is None:
        assert streamed == b""  # held back whole
        assert now.startswith(FIELD)
        return now[len(FIELD):]
    assert now == b"" and prepend == FIELD
    return streamed


@settings(max_examples=60)
@given(st.lists(st.integers(min_value=1, max_value=len(MESSAGE) - 1), max_size=8))
def test_forged_fields_are_removed_whatever_the_chunks(cuts: list[int]) -> None:
    edges = [0, *sorted(set(cuts)), len(MESSAGE)]
    chunks = [MESSAGE[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]
    msg = checker().begin("192.0.2.1", "client.example", "a@example.com", 0)
    assert run_through(msg, chunks) == FILTERED
    msg.kept.seek(0)
    assert msg.kept.read() == MESSAGE  # the checks see the message as it came
    msg.close()


def test_a_message_that_ends_in_its_header() -> None:
    msg = checker().begin("192.0.2.1", "h", "", 0)
    assert run_through(msg, [b"Subject: x\nAuthentication-Results: mx.example.org; none\n"]) == (
        b"Subject: x\n")


def test_an_overlong_header_line_ends_the_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbound_mod, "HEADER_LINE_MAX", 100)
    msg = checker().begin("192.0.2.1", "h", "", 0)
    data = b"X-Long: " + b"y" * 200 + b"\nAuthentication-Results: mx.example.org; none\n\nb\n"
    assert run_through(msg, [data[:150], data[150:]]) == data


def test_a_message_that_fits_in_memory_is_held_back_and_written_behind_its_field() -> None:
    msg = checker().begin("192.0.2.1", "h", "a@example.com", 0, b"Received: from client\n")
    assert [msg.feed(c) for c in (MESSAGE[:30], MESSAGE[30:])] == [b"", b""]
    assert msg.end() == b""
    assert msg.commit(inbound_mod.Verdict(FIELD, None, "")) == (
        FIELD + b"Received: from client\n" + FILTERED, None)


def test_a_larger_message_is_streamed_and_its_field_prepended() -> None:
    msg = checker().begin("192.0.2.1", "h", "a@example.com", 0, b"Received: from client\n")
    big = b"z" * MEMORY_MAX
    assert msg.feed(MESSAGE) == b""
    assert msg.feed(big) == b"Received: from client\n" + FILTERED + big  # from here: streamed
    assert msg.feed(b"tail\n") == b"tail\n"
    assert msg.end() == b""
    assert msg.commit(inbound_mod.Verdict(FIELD, None, "")) == (b"", FIELD)


def test_the_copy_is_bounded_by_databytes_and_spills_to_disk() -> None:
    msg = checker().begin("192.0.2.1", "h", "", MEMORY_MAX * 3)
    part = b"Subject: x\n\n" + b"z" * (MEMORY_MAX - 12)
    msg.feed(part)
    assert not msg.kept._rolled  # type: ignore[attr-defined]
    msg.feed(b"z" * MEMORY_MAX)
    assert msg.kept._rolled and not msg.too_big  # type: ignore[attr-defined]
    msg.feed(b"z" * (MEMORY_MAX + 1))
    assert msg.too_big and msg.kept.closed
    verdict = asyncio.run(msg.finish())
    assert verdict.refuse is None
    assert verdict.fields == (f"Authentication-Results: mx.example.org; none (message over "
                              f"{MEMORY_MAX * 3} bytes: not checked)\n").encode()


def report(disposition: DmarcDisposition, dmarc: Dmarc = Dmarc.FAIL) -> AuthReport:
    return AuthReport(header=b"Authentication-Results: mx.example.org;\n\tdmarc=fail\n",
                      spf=Spf.FAIL, dkim=(), dmarc=dmarc, arc=None, disposition=disposition,
                      from_domain="example.com\r\nX: y")


@pytest.mark.parametrize(("action", "disposition", "refused", "marked"), [
    (DmarcAction.HEADER, DmarcDisposition.REJECT, False, None),
    (DmarcAction.HEADER, DmarcDisposition.QUARANTINE, False, None),
    (DmarcAction.REJECT, DmarcDisposition.REJECT, True, None),
    (DmarcAction.REJECT, DmarcDisposition.QUARANTINE, False, "quarantine"),
    (DmarcAction.QUARANTINE, DmarcDisposition.REJECT, False, "reject"),
    (DmarcAction.QUARANTINE, DmarcDisposition.QUARANTINE, False, "quarantine"),
    (DmarcAction.REJECT, DmarcDisposition.NONE, False, None),
    (DmarcAction.QUARANTINE, DmarcDisposition.NONE, False, None),
])
def test_dmarc_actions(action: DmarcAction, disposition: DmarcDisposition, refused: bool,
                       marked: str | None) -> None:
    verdict = checker(dmarcreject=action).decide(report(disposition))
    header = b"Authentication-Results: mx.example.org;\n\tdmarc=fail\n"
    if refused:
        # the domain comes from the message: made safe for the reply line
        assert verdict.refuse == "5.7.1 rejected by DMARC policy for example.com??X??y"
        assert verdict.fields == b""
    elif marked:
        assert verdict.refuse is None
        assert verdict.fields == header + (
            f"X-Eqmail-DMARC: quarantine (policy={marked}; header.from=example.com??X??y)\n"
        ).encode()
    else:
        assert verdict == inbound_mod.Verdict(header, None, verdict.summary)


def test_checks_that_do_not_come_back_give_temperror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbound_mod, "GRACE", 0.2)
    stuck = threading.Event()
    c = checker(authtimeout=1)

    def hang(_inbound: object, _began: float) -> AuthReport:
        stuck.wait(10)
        raise RuntimeError("late")

    monkeypatch.setattr(c, "check", hang)
    msg = c.begin("192.0.2.1", "h", "a@example.com", 0)
    msg.feed(b"Subject: x\n\nbody\n")
    msg.end()
    verdict = asyncio.run(msg.finish())
    stuck.set()
    assert verdict.refuse is None
    assert verdict.fields == (b"Authentication-Results: mx.example.org;\n\tspf=temperror "
                              b"(checks timed out);\n\tdkim=temperror;\n\tdmarc=temperror\n")


def test_checks_that_raise_give_temperror(monkeypatch: pytest.MonkeyPatch) -> None:
    c = checker()

    def broken(_inbound: object, _began: float) -> AuthReport:
        raise ValueError("bug")

    monkeypatch.setattr(c, "check", broken)
    msg = c.begin("192.0.2.1", "h", "", 0)
    msg.feed(b"Subject: x\n\nbody\n")
    verdict = asyncio.run(msg.finish())
    assert b"spf=temperror (checks failed)" in verdict.fields and verdict.refuse is None


def test_answers_are_cached_per_configuration() -> None:
    """A site's caching resolver, in process: one LRU cache per configuration's lookups
    (TTLs honoured by dnspython); a new configuration starts with its own."""
    import dns.resolver

    a, b = checker(), checker()
    cache = a.lookups.res.cache  # type: ignore[attr-defined]
    assert isinstance(cache, dns.resolver.LRUCache)
    assert b.lookups.res.cache is not cache  # type: ignore[attr-defined]


def test_auth_line_goes_out_with_the_outcome_line_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener's auth: line and the session's "message accepted" line are one write
    to the logger's pipe (eqmail.workers.smtpconn._with_line); without a log line first
    the auth line is still written, on its own."""
    from eqmail import log as logmod
    from eqmail.smtp import actions as A
    from eqmail.workers.smtpconn import _with_line
    writes: list[bytes] = []
    monkeypatch.setattr(logmod, "_write", writes.append)
    rest = _with_line("qmail-smtpd: auth: spf=pass", [A.Log("qmail-smtpd: message accepted"),
                                                      A.Send(b"250 ok\r\n")])
    assert rest == [A.Send(b"250 ok\r\n")]
    assert writes == [b"qmail-smtpd: auth: spf=pass\nqmail-smtpd: message accepted\n"]
    writes.clear()
    assert _with_line("qmail-smtpd: auth: x", [A.Send(b"550 no\r\n")]) == [A.Send(b"550 no\r\n")]
    assert writes == [b"qmail-smtpd: auth: x\n"]
