"""A reload is a diff (issue 13): a listener whose socket and options are unchanged
keeps running -- same pids, sessions and counts undisturbed -- and serves its next
sessions with the new configuration, pushed to it by the supervisor; a listener whose
options or TLS files changed is replaced, as every listener was before.

Observed from outside: listener pids (process titles), SMTP replies, status and the log.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any

import pytest
from harness import IS_ROOT, ME, Instance, free_port, poll, status, worker_pids
from live_smtp import RawClient

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not IS_ROOT, reason="needs root (privilege split)")]

LISTENER = "eqmail: listener"
FAILED = b"535 authentication failed (#5.7.1)\r\n"
LOCKED = b"454 too many authentication failures, try later (#4.7.0)\r\n"
NOT_IN_RCPTHOSTS = 553


@pytest.fixture
def port() -> int:
    return free_port(("127.0.0.1",))


@pytest.fixture
def inst(port: int) -> Iterator[Instance]:
    """Two processes on one line, whose checkpassword always says no; the fourth AUTH
    failure of an address locks it out (no delay, to keep the test quick)."""
    i = Instance.create(listen=f"smtp 127.0.0.1:{port} processes=2 checkpassword=/bin/false\n",
                        extra_controls={"authlimit": "4 600 0", "databytes": "100000"})
    try:
        i.start()
        poll(lambda: len(worker_pids(i, LISTENER)) == 2, what="two listener processes", inst=i)
        yield i
    finally:
        i.destroy()


def session(port: int, source: str = "127.0.0.1") -> RawClient:
    client = RawClient("127.0.0.1", port, source=source)
    assert client.line() == f"220 {ME} ESMTP\r\n".encode()
    assert client.command("EHLO client.example")[0] == 250
    return client


def failed_auth(port: int, source: str) -> bytes:
    client = session(port, source)
    try:
        client.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0guess") + b"\r\n")
        return client.line()
    finally:
        client.close()


def rcpt(client: RawClient, address: str) -> int:
    assert client.command("MAIL FROM:<a@client.example>")[0] == 250
    code = client.command(f"RCPT TO:<{address}>")[0]
    assert client.command("RSET")[0] == 250
    return code


def data_of(client: RawClient, size: int) -> int:
    assert client.command("MAIL FROM:<a@client.example>")[0] == 250
    assert client.command(f"RCPT TO:<testuser@{ME}>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: size\r\n\r\n" + b"x" * size + b"\r\n.\r\n")
    return client.reply()[0]


def reload(inst: Instance) -> int:
    out = inst.ctl("reload").stdout
    m = re.fullmatch(r"eqmail: reload complete, generation (\d+)\n", out)
    assert m, out
    return int(m.group(1))


def listeners(inst: Instance) -> list[dict[str, Any]]:
    return [w for w in status(inst)["workers"] if w["kind"] == "listener" and w["pid"]]


def test_unchanged_listener_keeps_running_with_the_new_configuration(inst: Instance, port: int) -> None:
    source = "127.0.0.71"
    pids = set(worker_pids(inst, LISTENER))
    assert failed_auth(port, source) == FAILED
    assert failed_auth(port, source) == FAILED
    old = session(port)  # open across the reload: keeps its configuration
    try:
        assert rcpt(old, "someone@other.example") == NOT_IN_RCPTHOSTS
        inst.write_control("rcpthosts", f"{ME}\nother.example\n")
        inst.write_control("databytes", "1000")
        generation = reload(inst)
        # the same processes serve on, now at the new generation
        assert set(worker_pids(inst, LISTENER)) == pids
        assert {w["pid"] for w in listeners(inst)} == pids
        assert all(w["generation"] == generation and w["state"] == "running" for w in listeners(inst))
        assert status(inst)["generation"] == generation
        # the next sessions see the new controls, on whichever process they land
        for _ in range(4):
            new = session(port)
            try:
                assert rcpt(new, "someone@other.example") == 250
                assert data_of(new, 2000) == 552  # over the new databytes
            finally:
                new.close()
        # the session opened before the reload still runs with the old ones
        assert rcpt(old, "someone@other.example") == NOT_IN_RCPTHOSTS
        assert data_of(old, 2000) == 250
    finally:
        old.close()
    # the failure count survived: two before, two after, and the address is locked out
    assert failed_auth(port, source) == FAILED
    assert failed_auth(port, source) == FAILED
    poll(lambda: f"auth failed: plain alice from {source} (locked out)" in inst.log(),
         what="the lock-out logged", inst=inst)
    assert failed_auth(port, source) == LOCKED
    assert set(worker_pids(inst, LISTENER)) == pids
    assert "exited" not in "".join(ln for ln in inst.log().splitlines() if "listener" in ln)


def test_changed_listener_or_tls_files_are_replaced(inst: Instance, port: int) -> None:
    pids = set(worker_pids(inst, LISTENER))
    old = session(port)
    try:
        inst.write_control("listen", f"smtp 127.0.0.1:{port} processes=2 concurrency=99 "
                                     "checkpassword=/bin/false\n")
        generation = reload(inst)
        serving = [w for w in listeners(inst) if w["state"] == "running"]
        new_pids = {w["pid"] for w in serving}
        assert len(new_pids) == 2 and not new_pids & pids
        assert all(w["generation"] == generation for w in serving)
        assert rcpt(old, f"testuser@{ME}") == 250  # the retired process finishes its session
    finally:
        old.close()
    poll(lambda: not set(worker_pids(inst, LISTENER)) & pids, what="the old listeners gone", inst=inst)
    cert = inst.root / "control" / "servercert.pem"
    assert cert.exists()
    cert.write_bytes(cert.read_bytes())  # a renewed certificate: the same path, a new file
    reload(inst)
    renewed = set(worker_pids(inst, LISTENER))
    assert len(renewed) == 2 and not renewed & new_pids
    client = session(port)
    try:
        assert client.command("STARTTLS")[0] == 220
        client.starttls()
        assert client.command("EHLO client.example")[0] == 250
    finally:
        client.close()
    # and an unchanged reload after all that keeps them
    reload(inst)
    assert set(worker_pids(inst, LISTENER)) == renewed


def test_watcher_after_an_explicit_reload_starts_no_new_generation(inst: Instance) -> None:
    """The watcher notices an edit a second after it; an `eqmailctl reload` within that
    second has taken the edit already, so the notice starts no second generation; an
    edit after that one is taken by the watcher alone."""
    import time

    inst.write_control("databytes", "2000")
    generation = reload(inst)
    time.sleep(2.5)  # the watcher's debounce (1 s) and its notice have passed
    assert status(inst)["generation"] == generation
    assert inst.log().count("status: control files changed") == 0
    inst.write_control("databytes", "3000")
    poll(lambda: status(inst)["generation"] == generation + 1,
         what="the watcher's reload of the next edit", inst=inst)
    assert inst.log().count("status: control files changed") == 1
