"""qmail-qstat / qmail-qread / show on a queue tree built by hand (qmail-core §1.1, §5.4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.queue import inspect
from eqmail.queue.inspect import NoSuchMessage, format_qstat, message, qread, qstat, show
from eqmail.queue.layout import QueuePaths, create_queue

T0 = 1700000000  # 14 Nov 2023 22:13:20 GMT


def put(path: Path, data: bytes, mtime: int = T0) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


@pytest.fixture
def q(tmp_path: Path) -> QueuePaths:
    return create_queue(tmp_path / "queue")


def test_qstat_counts_mess_and_todo(tmp_path: Path, q: QueuePaths) -> None:
    assert qstat(tmp_path) == (0, 0)
    for i in (5, 28, 51, 7):
        put(q.mess(i), b"x")
    put(q.todo(51), b"u0\0p1\0Fs\0")
    assert qstat(tmp_path) == (4, 1)
    assert format_qstat(4, 1) == "messages in queue: 4\nmessages in queue but not yet preprocessed: 1\n"


def test_qread_exact_format(tmp_path: Path, q: QueuePaths) -> None:
    put(q.mess(24), b"Received: x\n\nhello\n")  # 19 bytes; 24 % 23 = 1
    put(q.info(24), b"Fjoe@x.org\0")
    put(q.local(24), b"Tlocal1@x.org\0Dlocal2@x.org\0")
    put(q.remote(24), b"Dr1@y.org\0Tr\x01\xff@y.org\0Tpartial")
    put(q.mess(3), b"abc")
    put(q.info(3), b"F\0", mtime=T0 + 61)
    put(q.bounce(3), b"failure text")
    put(q.remote(3), b"Tx@z.org\0")
    assert qread(tmp_path) == (
        "14 Nov 2023 22:13:20 GMT  #24  19  <joe@x.org> \n"
        "\tlocal\tlocal1@x.org\n"
        "  done\tlocal\tlocal2@x.org\n"
        "  done\tremote\tr1@y.org\n"
        "\tremote\tr__@y.org\n"
        "14 Nov 2023 22:14:21 GMT  #3  3  <>  bouncing\n"
        "\tremote\tx@z.org\n"
    )


def test_qread_warns_about_a_message_without_mess(tmp_path: Path, q: QueuePaths) -> None:
    put(q.info(9), b"Fs\0")
    assert qread(tmp_path) == "warning: trouble with #9: No such file or directory\n"


def test_qread_ignores_todo_only_messages(tmp_path: Path, q: QueuePaths) -> None:
    put(q.mess(9), b"x")
    put(q.todo(9), b"u0\0p1\0Fs\0Tr\0")
    assert qread(tmp_path) == ""


def test_show_preprocessed(tmp_path: Path, q: QueuePaths) -> None:
    put(q.mess(24), b"Received: (qmail 1 invoked by uid 0)\nSubject: \tx\x07\n\nbody\n")
    put(q.info(24), b"Fjoe@x.org\0")
    put(q.remote(24), b"Tr@y.org\0")
    assert show(tmp_path, 24) == (
        "14 Nov 2023 22:13:20 GMT  #24  56  <joe@x.org> \n"
        "\tremote\tr@y.org\n"
        "origin: network\n"
        "\n"
        "Received: (qmail 1 invoked by uid 0)\n"
        "Subject: \tx_\n"
    )


def test_show_from_todo(tmp_path: Path, q: QueuePaths) -> None:
    put(q.mess(30), b"Subject: s\n")
    put(q.todo(30), b"u1000\0p77\0Fs@x.org\0Ta@b.org\0Tc@d.org\0")
    put(q.info(30), b"Fold\0")  # a half-done preprocessing: todo still rules
    assert show(tmp_path, 30) == (
        "14 Nov 2023 22:13:20 GMT  #30  11  <s@x.org>  not yet preprocessed\n"
        "\ttodo\ta@b.org\n"
        "\ttodo\tc@d.org\n"
        "origin: network\n"
        "\n"
        "Subject: s\n"
    )


def test_show_unknown_or_incomplete(tmp_path: Path, q: QueuePaths) -> None:
    with pytest.raises(NoSuchMessage):
        show(tmp_path, 1)
    put(q.mess(1), b"x\n")
    with pytest.raises(NoSuchMessage):
        show(tmp_path, 1)


def test_json_records_match_the_listing(tmp_path: Path, q: QueuePaths) -> None:
    """queue list/show --json: the fields documented in eqmailctl(8), from the same
    records as the text; bytes that are not UTF-8 as \\xNN, UTF-8 kept."""
    from eqmail.queue.inspect import messages, show_json

    put(q.mess(24), b"Subject: hi\n\nbody\n")
    put(q.info(24), "Fjö@x.org\0".encode())
    put(q.local(24), b"Tl@x.org\0Dd@x.org\0")
    put(q.remote(24), b"Tr\xff@y.org\0")
    put(q.bounce(24), b"x")
    put(q.info(9), b"Fs\0")  # no mess: an error entry
    listing = [m.as_json() for m in messages(tmp_path)]
    assert listing == [
        {"id": 24, "time": T0, "date": "2023-11-14T22:13:20Z", "size": 18, "sender": "jö@x.org",
         "bouncing": True, "preprocessed": True,
         "recipients": [{"channel": "local", "address": "l@x.org", "done": False},
                        {"channel": "local", "address": "d@x.org", "done": True},
                        {"channel": "remote", "address": "r\\xff@y.org", "done": False}],
         "warnings": [], "origin": "network", "requiretls": False},
        {"id": 9, "error": "No such file or directory"},
    ]
    assert show_json(tmp_path, 24) == {**listing[0], "header": "Subject: hi\n", "header_truncated": False}
    put(q.mess(30), b"Subject: s\n")
    put(q.todo(30), b"u1000\0p77\0Fs@x.org\0Ta@b.org\0")
    shown = show_json(tmp_path, 30)
    assert shown["preprocessed"] is False and shown["bouncing"] is False
    assert shown["recipients"] == [{"channel": "todo", "address": "a@b.org", "done": False}]


def test_show_gives_the_origin_of_todo_and_info(tmp_path: Path, q: QueuePaths) -> None:
    """queue show: the Xorigin= record after the T records of todo/ and after the F
    record of info/ (docs/queue-format.md); the qmail-qread listing stays qmail's."""
    from eqmail.queue.inspect import messages, show_json

    put(q.mess(30), b"Subject: s\n")
    put(q.todo(30), b"u1000\0p77\0Fs@x.org\0Ta@b.org\0Xorigin=auth\0")
    assert show(tmp_path, 30).split("\n")[2] == "origin: auth"
    assert show_json(tmp_path, 30)["origin"] == "auth"
    assert [r.address for r in message(tmp_path, 30).recipients] == [b"a@b.org"]
    put(q.mess(24), b"Subject: hi\n")
    put(q.info(24), b"Fjoe@x.org\0Xorigin=bounce\0")
    put(q.remote(24), b"Tr@y.org\0")
    assert show(tmp_path, 24).split("\n")[:3] == [
        "14 Nov 2023 22:13:20 GMT  #24  12  <joe@x.org> ", "\tremote\tr@y.org", "origin: bounce"]
    assert qread(tmp_path) == "14 Nov 2023 22:13:20 GMT  #24  12  <joe@x.org> \n\tremote\tr@y.org\n"
    assert [m.origin for m in messages(tmp_path)] == ["bounce"]


@given(st.binary(max_size=300))
def test_printable_is_qmail_qreads_out(data: bytes) -> None:
    """The translate-table version (fast enough for 100,000 messages) is qmail-qread's
    byte-by-byte rule."""
    assert inspect.printable(data) == "".join(chr(b) if 32 <= b <= 126 else "_" for b in data)
