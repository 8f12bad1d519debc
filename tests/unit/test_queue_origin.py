"""The origin through the queue (issue 16): the queue writer's decision table, the
records in todo/ and info/, and what the scanner hands to remote delivery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.ipc.delivery import Channel
from eqmail.ipc.queue import Origin, QueueRole
from eqmail.queue.envelope import (
    Envelope,
    info_bytes,
    origin_of,
    origin_record,
    parse_records,
    todo_bytes,
)
from eqmail.queue.manager import Delivery
from eqmail.queue.origin import believed_origin, peer_role, session_claim
from eqmail.workers.remote import request_origin
from eqmail.workers.scanner import delivery_options

ROLES: list[QueueRole | None] = [None, *QueueRole]
CLAIMS: list[Origin | None] = [None, *Origin]
ANYONE = {Origin.NETWORK, Origin.FORWARD}


@pytest.mark.parametrize(("role", "claim", "want"), [
    # the listener: what the session was, or less
    (QueueRole.NETWORK, None, Origin.NETWORK),
    (QueueRole.NETWORK, Origin.NETWORK, Origin.NETWORK),
    (QueueRole.NETWORK, Origin.AUTH, Origin.AUTH),
    (QueueRole.NETWORK, Origin.RELAY, Origin.RELAY),
    (QueueRole.NETWORK, Origin.LOCAL, Origin.NETWORK),
    (QueueRole.NETWORK, Origin.BOUNCE, Origin.NETWORK),
    (QueueRole.NETWORK, Origin.FORWARD, Origin.FORWARD),
    # the scanner's bounces
    (QueueRole.BOUNCE, None, Origin.BOUNCE),
    (QueueRole.BOUNCE, Origin.BOUNCE, Origin.BOUNCE),
    (QueueRole.BOUNCE, Origin.AUTH, Origin.BOUNCE),
    (QueueRole.BOUNCE, Origin.FORWARD, Origin.FORWARD),
    # a local user's sendmail, and a .qmail forward (no role)
    (None, None, Origin.LOCAL),
    (None, Origin.AUTH, Origin.LOCAL),
    (None, Origin.RELAY, Origin.LOCAL),
    (None, Origin.BOUNCE, Origin.LOCAL),
    (None, Origin.FORWARD, Origin.FORWARD),
    (None, Origin.NETWORK, Origin.NETWORK),
    (QueueRole.ALIAS, None, Origin.LOCAL),
    (QueueRole.ALIAS, Origin.AUTH, Origin.LOCAL),
])
def test_decision_table(role: QueueRole | None, claim: Origin | None, want: Origin) -> None:
    assert believed_origin(role, claim) is want


@given(st.sampled_from(ROLES), st.sampled_from(CLAIMS))
def test_a_claim_never_upgrades_beyond_the_role(role: QueueRole | None, claim: Origin | None) -> None:
    got = believed_origin(role, claim)
    unclaimed = believed_origin(role, None)
    assert got in (unclaimed, claim)
    if got in (Origin.AUTH, Origin.RELAY):
        assert role is QueueRole.NETWORK and claim is got
    if got is Origin.BOUNCE:
        assert role is QueueRole.BOUNCE
    if got.signed and not unclaimed.signed:  # only the listener's AUTH/RELAY lift NETWORK
        assert role is QueueRole.NETWORK and claim in (Origin.AUTH, Origin.RELAY)
    if claim in ANYONE:
        assert got is claim  # anyone may claim less


@given(st.sampled_from(ROLES), st.integers(0, 70000), st.sampled_from(CLAIMS))
def test_role_is_not_the_clients_word(hello: QueueRole | None, uid: int, claim: Origin | None) -> None:
    """A hello counts from root or the writer's uid only; on a privileged instance the
    listener's and the scanner's uids have their roles without one; any other uid has
    none: it can never get AUTH, RELAY or BOUNCE."""
    own, daemon, send = 1001, 1002, 1003
    uids = {QueueRole.NETWORK: daemon, QueueRole.BOUNCE: send}
    role = peer_role(hello, uid, own, uids)
    if uid in (0, own):
        assert role is hello
    elif uid == daemon:
        assert role is QueueRole.NETWORK
    elif uid == send:
        assert role is QueueRole.BOUNCE
    else:
        assert role is None
        assert believed_origin(role, claim) in (Origin.LOCAL, *ANYONE)
    assert peer_role(hello, 4242, own, None) is None  # private instance, another user


def test_session_claim() -> None:
    assert session_claim(True, True) is Origin.AUTH
    assert session_claim(True, False) is Origin.AUTH
    assert session_claim(False, True) is Origin.RELAY
    assert session_claim(False, False) is Origin.NETWORK


# ---- records --------------------------------------------------------------------------

def test_network_mail_keeps_qmails_bytes() -> None:
    env = Envelope("a@x.org", ("b@y.org", "c@z.org"), Origin.NETWORK)
    assert todo_bytes(7, 42, env) == b"u7\0p42\0Fa@x.org\0Tb@y.org\0Tc@z.org\0"
    assert todo_bytes(7, 42, Envelope("a@x.org", ("b@y.org", "c@z.org"))) == todo_bytes(7, 42, env)
    assert info_bytes("a@x.org", Origin.NETWORK) == info_bytes("a@x.org", None) == b"Fa@x.org\0"


def test_other_origins_follow_the_t_records() -> None:
    env = Envelope("", ("b@y.org",), Origin.AUTH)
    assert todo_bytes(0, 1, env) == b"u0\0p1\0F\0Tb@y.org\0Xorigin=auth\0"
    assert info_bytes("", Origin.BOUNCE) == b"F\0Xorigin=bounce\0"
    assert origin_record(Origin.FORWARD) == b"Xorigin=forward\0"


addresses = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40)


@given(addresses, st.lists(addresses, max_size=5), st.sampled_from(CLAIMS))
def test_todo_and_info_round_trip(sender: str, rcpts: list[str], origin: Origin | None) -> None:
    recs = parse_records(todo_bytes(5, 6, Envelope(sender, tuple(rcpts), origin)))
    want = None if origin is Origin.NETWORK else origin
    assert origin_of(recs) is want
    assert [r.value for r in recs if r.kind == "F"] == [sender]
    assert [r.value for r in recs if r.kind == "T"] == rcpts
    info = parse_records(info_bytes(sender, origin))
    assert info[0].kind == "F" and info[0].value == sender  # what qmail-qread reads
    assert origin_of(info) is want


def test_unknown_origin_values_count_as_none() -> None:
    """A value a newer eqmail may write: read as no origin (never signed)."""
    assert origin_of(parse_records(b"Fa\0Xorigin=telepathy\0")) is None
    assert origin_of(parse_records(b"Fa\0Xother=auth\0")) is None
    assert origin_of(parse_records(b"Fa\0Xorigin=relay")) is None  # no NUL: being written


def test_scanner_gives_the_origin_to_remote_delivery_only() -> None:
    remote = Delivery(1, Channel.REMOTE, 0, "s@x", "r@y", Origin.AUTH)
    assert delivery_options(remote) == (("origin", "auth"),)
    assert delivery_options(Delivery(1, Channel.LOCAL, 0, "s@x", "r@y", Origin.AUTH)) == ()
    assert delivery_options(Delivery(1, Channel.REMOTE, 0, "s@x", "r@y")) == ()


def test_remote_worker_reads_the_option() -> None:
    from eqmail.ipc.delivery import DeliveryRequest

    def req(*options: tuple[str, str]) -> DeliveryRequest:
        return DeliveryRequest(b"1.0", 1, "s", "r@y", Channel.REMOTE, options)

    assert request_origin(req(("origin", "relay"))) is Origin.RELAY
    assert request_origin(req()) is None
    assert request_origin(req(("origin", "root"))) is None


# ---- the writer and the scanner, on real queue files -----------------------------------

def test_writer_records_and_preprocess_copies(tmp_path: Path) -> None:
    """QueueStore writes the X record after the T records of intd/todo; the scanner's
    preprocessing copies it after info/'s F record and remembers it for the first pass."""
    from eqmail.queue.layout import QueuePaths, create_queue
    from eqmail.queue.preprocess import Preprocessor
    from eqmail.queue.recycle import InodePool
    from eqmail.queue.schedule import Channel as Ch
    from eqmail.queue.writer import QueueStore

    create_queue(tmp_path / "queue")
    store = QueueStore(tmp_path / "queue")
    msg = store.start(9, 0, b"Received: x\n")
    store.write(msg, b"From: a@x.org\n\nhi\n")
    msg.envelope = Envelope("a@x.org", ("r@remote.example",), Origin.RELAY)
    store.commit([msg])
    paths = QueuePaths(tmp_path / "queue")
    assert paths.todo(msg.msgid).read_bytes().endswith(b"Tr@remote.example\0Xorigin=relay\0")
    scheduled: list[int] = []
    root_fd = os.open(tmp_path / "queue", os.O_RDONLY)
    try:
        pre = Preprocessor(paths, lambda reqs: [store.clean(r) for r in reqs],
                           InodePool(paths.dir("spare-send")), root_fd,
                           lambda r: (Ch.REMOTE, r), lambda m, chans, now: scheduled.append(m))
        assert pre.preprocess(msg.msgid)
    finally:
        os.close(root_fd)
    assert paths.info(msg.msgid).read_bytes() == b"Fa@x.org\0Xorigin=relay\0"
    assert paths.remote(msg.msgid).read_bytes() == b"Tr@remote.example\0"
    fresh = pre.take_fresh(Ch.REMOTE, msg.msgid)
    assert fresh is not None and fresh[3] is Origin.RELAY


def test_a_pass_read_from_info_carries_the_origin(tmp_path: Path) -> None:
    """After a restart (no first-pass memory) the manager reads the origin from info/,
    and each remote delivery of the message carries it; a qmail info/ has none."""
    from eqmail.control import load_controls
    from eqmail.ipc.queue import CleanAnswer
    from eqmail.queue.layout import QueuePaths, create_queue
    from eqmail.queue.manager import QueueManager

    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.example.org\n")
    create_queue(tmp_path / "queue")
    paths = QueuePaths(tmp_path / "queue")
    for msgid, info in ((101, b"Fa@x.org\0Xorigin=local\0"), (102, b"Fb@x.org\0")):
        paths.mess(msgid).write_bytes(b"Subject: s\n\nbody\n")
        paths.info(msgid).write_bytes(info)
        paths.remote(msgid).write_bytes(b"Tr@remote.example\0Ts@remote.example\0")
    mgr = QueueManager(load_controls(tmp_path), paths, lambda reqs: [CleanAnswer.DONE] * len(reqs),
                       lambda *a: (True, "1"))
    mgr.recover()
    got = {(d.msgid, d.recipient, d.origin) for d in mgr.next_requests(Channel.REMOTE)}
    assert got == {(101, "r@remote.example", Origin.LOCAL), (101, "s@remote.example", Origin.LOCAL),
                   (102, "r@remote.example", None), (102, "s@remote.example", None)}
