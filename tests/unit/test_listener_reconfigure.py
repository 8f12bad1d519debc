"""Listener.reconfigure: sessions accepted after it use the new Controls, sessions in
progress keep theirs (issue 13 item 4).

An in-process listener (eqmail.workers.listener.Listener, no supervisor) serves
connections over loopback; the tests speak SMTP to it and look at the replies.  No
message is queued, so no queue writer is needed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from eqmail.authlimit import AuthLimit
from eqmail.control import Controls, ListenerSpec, load_controls
from eqmail.instance import Instance
from eqmail.privsep.ids import SystemIds
from eqmail.workers.base import ListenerSettings, WorkerContext, WorkerKind
from eqmail.workers.listener import Listener

ME = "mx.example"
SPEC = ListenerSpec("smtp", "127.0.0.1", 0)


def write(root: Path, **files: str) -> None:
    for name, text in files.items():
        (root / "control" / name.replace("_", ".")).write_text(text)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for d in ("control", "users", "run", "alias"):
        (tmp_path / d).mkdir()
    write(tmp_path, me=ME + "\n", rcpthosts="one.example\n", databytes="1000\n", rcptchecklocal="0\n")
    return tmp_path


def make_listener(root: Path) -> Listener:
    ctx = WorkerContext(kind=WorkerKind.LISTENER, name="listener test", instance=Instance(root),
                        controls=load_controls(root), ids=SystemIds.current_user(), generation=1,
                        settings=ListenerSettings(socket_fd=-1, spec=SPEC, tls=None, clients=None))
    return Listener(ctx, SPEC)


class Client:
    """One SMTP client connection to ``listener``, served in this event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 served: asyncio.Future[None]) -> None:
        self.reader, self.writer, self.served = reader, writer, served

    @classmethod
    async def connect(cls, listener: Listener) -> Client:
        loop = asyncio.get_running_loop()
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            server.setblocking(False)
            reader, writer = await asyncio.open_connection(*server.getsockname())
            conn, _ = await loop.sock_accept(server)
        conn.setblocking(False)
        return cls(reader, writer, asyncio.ensure_future(listener.serve(conn)))

    async def reply(self) -> list[str]:
        lines: list[str] = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            if not line:
                return lines
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return lines

    async def say(self, command: str) -> list[str]:
        self.writer.write(command.encode() + b"\r\n")
        return await self.reply()

    async def quit(self) -> None:
        assert (await self.say("QUIT"))[0].startswith("221")
        self.writer.close()
        await asyncio.wait_for(self.served, 10)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


async def ehlo_size(client: Client) -> str:
    assert (await client.reply())[0].startswith("220")
    lines = await client.say("EHLO client.example")
    return next(line[4:] for line in lines if line[4:].startswith("SIZE"))


def test_a_session_after_reconfigure_sees_the_new_databytes_and_rcpthosts(root: Path) -> None:
    listener = make_listener(root)

    async def test() -> None:
        before = await Client.connect(listener)
        assert await ehlo_size(before) == "SIZE 1000"
        assert (await before.say("MAIL FROM:<a@client.example>"))[0].startswith("250")
        assert (await before.say("RCPT TO:<x@one.example>"))[0].startswith("250")
        assert (await before.say("RCPT TO:<x@two.example>"))[0].startswith("553")
        await before.quit()

        write(root, databytes="2000\n", rcpthosts="two.example\n")
        listener.reconfigure(load_controls(root))

        after = await Client.connect(listener)
        assert await ehlo_size(after) == "SIZE 2000"
        assert (await after.say("MAIL FROM:<a@client.example>"))[0].startswith("250")
        assert (await after.say("RCPT TO:<x@one.example>"))[0].startswith("553")
        assert (await after.say("RCPT TO:<x@two.example>"))[0].startswith("250")
        await after.quit()

    run(test)


def test_a_session_in_progress_finishes_with_its_configuration(root: Path) -> None:
    listener = make_listener(root)

    async def test() -> None:
        old = await Client.connect(listener)
        assert await ehlo_size(old) == "SIZE 1000"
        write(root, databytes="2000\n", rcpthosts="two.example\n", smtpgreeting="new greeting\n")
        listener.reconfigure(load_controls(root))
        new = await Client.connect(listener)
        assert (await new.reply())[0] == "220 new greeting ESMTP"
        # the old session still has the old rcpthosts and size limit
        assert (await old.say("MAIL FROM:<a@client.example> SIZE=1500"))[0].startswith("552")
        assert (await old.say("MAIL FROM:<a@client.example>"))[0].startswith("250")
        assert (await old.say("RCPT TO:<x@one.example>"))[0].startswith("250")
        assert (await new.say("MAIL FROM:<a@client.example> SIZE=1500"))[0].startswith("250")
        assert (await new.say("RCPT TO:<x@one.example>"))[0].startswith("553")
        await old.quit()
        await new.quit()

    run(test)


def test_reconfigure_applies_a_changed_tcp_smtp(root: Path) -> None:
    listener = make_listener(root)

    async def test() -> None:
        relay = await Client.connect(listener)
        await ehlo_size(relay)
        assert (await relay.say("MAIL FROM:<a@client.example>"))[0].startswith("250")
        assert (await relay.say("RCPT TO:<x@far.example>"))[0].startswith("553")
        await relay.quit()

        write(root, tcp_smtp='127.0.0.1:allow,RELAYCLIENT=""\n')
        listener.reconfigure(load_controls(root))
        relay = await Client.connect(listener)
        await ehlo_size(relay)
        assert (await relay.say("MAIL FROM:<a@client.example>"))[0].startswith("250")
        assert (await relay.say("RCPT TO:<x@far.example>"))[0].startswith("250")
        await relay.quit()

        write(root, tcp_smtp="127.0.0.1:deny\n")
        listener.reconfigure(load_controls(root))
        denied = await Client.connect(listener)
        assert await denied.reply() == []  # closed without a banner
        await asyncio.wait_for(denied.served, 10)

    run(test)


def test_reconfigure_replaces_the_file_values_and_keeps_the_listener_state(
        root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    write(root, rcptchecklocal="1\n")
    listener = make_listener(root)
    pool, warned, tls = listener.lookup_pool, listener.warned, listener.tls
    assert pool is not None and listener.config.mailbox_check is not None
    assert listener.config.authlimit == AuthLimit() and listener.config.rules is None
    write(root, authlimit="4 120 2\n", tcp_smtp="127.0.0.2:deny\n", tlsclients="a@client.example\n")
    controls = load_controls(root)
    listener.reconfigure(controls)
    cfg = listener.config
    assert cfg.controls is controls and cfg.authlimit == AuthLimit(4, 120.0, 2.0)
    assert cfg.rules is not None and not cfg.rules.match("127.0.0.2").allow
    assert cfg.tlsclients == frozenset()  # no TLS context that asks for client certificates
    assert cfg.mailbox_check is not None and cfg.mailbox_check.pool is pool
    assert listener.lookup_pool is pool and listener.warned is warned and listener.tls is tls

    write(root, authlimit="lots\n")
    capfd.readouterr()
    listener.reconfigure(load_controls(root))
    assert listener.config.authlimit == AuthLimit()
    assert ("warning: control/authlimit:1: FAILURES is not a number: 'lots'; using defaults"
            in capfd.readouterr().err)


def test_which_changes_need_a_new_listener(root: Path) -> None:
    """The reload diff keeps a listener whose line and TLS inputs are unchanged
    (everything else goes through reconfigure)."""
    from eqmail.supervisor.diff import listener_diff

    def keeps_listener(old: Controls, new: Controls, spec: ListenerSpec) -> bool:
        return spec in listener_diff(old, new).keep

    write(root, listen="smtp 127.0.0.1:2525\nsmtp 127.0.0.1:2526 concurrency=5\n")
    old = load_controls(root)
    one, two = old.listen
    write(root, databytes="5\n", tcp_smtp="127.0.0.2:deny\n", authlimit="1 1 1\n", rcpthosts="x.example\n")
    assert keeps_listener(old, load_controls(root), one) and keeps_listener(old, load_controls(root), two)
    write(root, listen="smtp 127.0.0.1:2525\nsmtp 127.0.0.1:2526 concurrency=6\n")
    assert keeps_listener(old, load_controls(root), one) and not keeps_listener(old, load_controls(root), two)
    write(root, listen="smtp 127.0.0.1:2525\n")
    assert not keeps_listener(old, load_controls(root), two)
    write(root, tlsserverciphers="ECDHE-RSA-AES128-GCM-SHA256\n")
    assert not keeps_listener(old, load_controls(root), one)
    write(root, tlsserverciphers="")
    assert keeps_listener(old, load_controls(root), one)
    write(root, servercert_pem="a certificate\n")
    assert not keeps_listener(old, load_controls(root), one)
    write(root, servercert_pem="a certificate\n", tlsclients="c@d\n")
    new = load_controls(root)
    assert keeps_listener(new, load_controls(root), one)  # unchanged files: kept
    write(root, tlsclients="e@f\n")  # its lines reach the listener by reconfigure
    assert keeps_listener(new, load_controls(root), one)
    (root / "control" / "tlsclients").unlink()  # whether it exists is the TLS context's
    assert not keeps_listener(new, load_controls(root), one)
