"""Operating a running eqmail as an admin does: drop-in edits of control/, reload (good,
bad, and a SIGHUP storm), listeners added and removed, ``eqmailctl status --json`` and
its LSB exit codes, the SysV init script run for real, the systemd unit verified,
``eqmailctl check`` (qmail-showctl) and the queue tools on a deferred message.

Everything is observed from outside: SMTP replies on real sockets, files in Maildirs,
log lines, exit codes and the output of eqmailctl.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import IS_ROOT, ME, Instance, bin_path, free_port, poll, status

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
TESTUSER = f"testuser@{ME}"
RELOADED = "status: reload complete, generation"


# ------------------------------------------------------------------ helpers


def reloads(inst: Instance) -> int:
    return inst.log().count(RELOADED)


def connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


def smtp_send(port: int, subject: str, rcpt: str = TESTUSER) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.sendmail(TESTUSER, [rcpt], f"Subject: {subject}\r\n\r\nbody\r\n")


def sendmail(inst: Instance, subject: str, rcpt: str = TESTUSER) -> None:
    res = inst.sendmail(["-f", TESTUSER, rcpt], f"Subject: {subject}\n\nbody\n".encode())
    assert res.returncode == 0, res


def subjects(inst: Instance) -> list[str]:
    out = []
    for f in inst.maildir_files():
        m = re.search(rb"^Subject: (.*)$", f.read_bytes(), re.M)
        out.append(m.group(1).decode() if m else "")
    return sorted(out)


@pytest.fixture
def port() -> int:
    return free_port(("127.0.0.1",))


@pytest.fixture
def inst(port: int) -> Iterator[Instance]:
    """Running, with one SMTP listener on 127.0.0.1:port."""
    i = Instance.create(listen=f"smtp 127.0.0.1:{port}\n",
                        extra_controls={"tcp.smtp": '127.:allow,RELAYCLIENT=""\n'})
    try:
        i.start()
        yield i
    finally:
        i.destroy()


# ------------------------------------------------------------------ reload


def test_dropin_greeting_edit_reaches_new_sessions_only(inst: Instance, port: int) -> None:
    old = smtplib.SMTP()
    code, banner = old.connect("127.0.0.1", port)
    assert code == 220 and banner == f"{ME} ESMTP".encode()
    try:
        before = reloads(inst)
        inst.write_control("smtpgreeting", "edited.example greeting")  # no eqmailctl, no signal
        poll(lambda: reloads(inst) > before, 10, "the watcher's reload", inst)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as new:
            code, text = new.helo("client.example")
            assert (code, text) == (250, b"edited.example greeting")
        new_banner = smtplib.SMTP()
        try:
            assert new_banner.connect("127.0.0.1", port) == (220, b"edited.example greeting ESMTP")
        finally:
            new_banner.close()
        # the session opened before the edit finishes under the old generation
        assert old.helo("client.example") == (250, ME.encode())
        old.sendmail(TESTUSER, [TESTUSER], "Subject: old session\r\n\r\nstill served\r\n")
    finally:
        old.quit()
    inst.wait_for_mail(1)
    assert subjects(inst) == ["old session"]


def test_listen_port_added_then_removed(inst: Instance, port: int) -> None:
    extra = free_port(("127.0.0.1",))
    assert not connects(extra)
    inst.write_control("listen", f"smtp 127.0.0.1:{port}\nsmtp 127.0.0.1:{extra}\n")
    # eqmailctl reload returns when the reload is complete: the new port serves already
    assert re.fullmatch(r"eqmail: reload complete, generation \d+\n", inst.ctl("reload").stdout)
    with smtplib.SMTP("127.0.0.1", extra, timeout=10) as s:
        assert s.noop()[0] == 250
    assert {(x["address"], x["port"]) for x in status(inst)["listeners"]} == {("127.0.0.1", port),
                                                                               ("127.0.0.1", extra)}
    smtp_send(extra, "via the added port")
    inst.write_control("listen", f"smtp 127.0.0.1:{port}\n")
    inst.ctl("reload")
    poll(lambda: not connects(extra), 10, f"port {extra} closed", inst)
    assert [x["port"] for x in status(inst)["listeners"]] == [port]
    smtp_send(port, "via the kept port")
    inst.wait_for_mail(2)
    assert subjects(inst) == ["via the added port", "via the kept port"]


def test_removed_port_refuses_even_while_an_old_session_is_open(inst: Instance, port: int) -> None:
    extra = free_port(("127.0.0.1",))
    inst.write_control("listen", f"smtp 127.0.0.1:{port}\nsmtp 127.0.0.1:{extra}\n")
    inst.ctl("reload")
    poll(lambda: connects(extra), 10, f"port {extra} listening", inst)
    old = smtplib.SMTP()
    assert old.connect("127.0.0.1", extra)[0] == 220
    try:
        inst.write_control("listen", f"smtp 127.0.0.1:{port}\n")
        inst.ctl("reload")
        # otherwise the kernel completes handshakes that nobody will ever accept
        poll(lambda: not connects(extra), 5, f"port {extra} refusing", inst)
        assert old.helo("client.example")[0] == 250
    finally:
        old.close()


def test_invalid_control_file_refused_old_config_serves(inst: Instance, port: int) -> None:
    generation = status(inst)["generation"]
    inst.write_control("databytes", "lots")
    inst.write_control("listen", f"smtp 127.0.0.1:{port}\nsmtp nowhere\n")
    res = inst.ctl("reload", check=False)
    assert res.returncode == 1
    assert "control/databytes:1: not a number: 'lots'" in res.stderr
    assert re.search(r"^control/listen:2: ", res.stderr, re.M), res.stderr
    assert "reload refused" in res.stderr
    # the watcher saw the edit too: the supervisor refused it the same way
    st = poll(lambda: (s := status(inst))["last_reload"].get("time") and not s["last_reload"]["ok"] and s,
              10, "the refused reload in status", inst)
    assert any(e.startswith("control/databytes:1: not a number") for e in st["last_reload"]["errors"])
    assert st["generation"] == generation and st["running"] is True
    assert "REFUSED" in inst.ctl("status").stdout
    # the old configuration keeps serving: sessions, queueing, delivery.  (Not
    # eqmail-inject: it parses control/ itself and exits 111 while a file is broken,
    # docs/compatibility.md.)
    smtp_send(port, "while refused")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        assert s.helo("client.example") == (250, ME.encode())
    inst.wait_for_mail(1)
    # fixing the file is an ordinary reload again
    os.unlink(inst.root / "control" / "databytes")
    inst.write_control("listen", f"smtp 127.0.0.1:{port}\n")
    inst.ctl("reload")
    poll(lambda: status(inst)["last_reload"]["ok"] and status(inst)["generation"] > generation, 10,
         "an accepted reload", inst)


def test_sighup_storm_loses_nothing(inst: Instance, port: int) -> None:
    pid = inst.supervisor_pid()
    assert pid
    errors: list[BaseException] = []
    drops: list[str] = []

    def smtp_retrying(subject: str) -> None:
        # A client whose connection drops retries, as an MTA would; a drop after the
        # message was acknowledged would show up below as a duplicate.
        for _ in range(3):
            try:
                return smtp_send(port, subject)
            except (smtplib.SMTPServerDisconnected, ConnectionError) as e:
                drops.append(f"{subject}: {e!r}")
        raise AssertionError(f"{subject}: dropped three times")

    def traffic() -> None:
        try:
            for n in range(10):
                smtp_retrying(f"smtp {n}")
                sendmail(inst, f"inject {n}")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    t = threading.Thread(target=traffic)
    t.start()
    start = time.monotonic()
    for k in range(50):  # evenly over 0.9 s, whatever the machine's load
        os.kill(pid, signal.SIGHUP)
        time.sleep(max(0.0, start + (k + 1) * 0.018 - time.monotonic()))
    elapsed = time.monotonic() - start
    t.join(60)
    assert not t.is_alive() and not errors, errors
    assert elapsed < 1.0
    inst.wait_for_mail(20, timeout=30)
    time.sleep(0.3)
    assert subjects(inst) == sorted([f"smtp {n}" for n in range(10)] + [f"inject {n}" for n in range(10)])
    st = poll(lambda: (s := status(inst))["last_reload"]["ok"] and s, 10, "a settled status", inst)
    assert st["running"] and st["pid"] == pid
    smtp_send(port, "after the storm")
    inst.wait_for_mail(21)
    # a listener being replaced accepts only what it will serve: nothing is dropped
    assert not drops, f"{len(drops)} connection(s) dropped by a listener being replaced: {drops}"


def test_sighup_during_stop_still_stops(port: int) -> None:
    i = Instance.create(listen=f"smtp 127.0.0.1:{port}\n")
    try:
        i.start()
        pid = i.supervisor_pid()
        assert pid
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.02)
        os.kill(pid, signal.SIGHUP)  # e.g. logrotate's HUP racing a shutdown
        poll(lambda: not Path(f"/proc/{pid}").exists(), 15, "the supervisor to exit", i)
    finally:
        i.started = False  # never wait 120 s for eqmailctl stop on a hung instance
        i.kill_all()
        i.destroy()


# ------------------------------------------------------------------ status, init


def test_status_json_fields_and_lsb_codes(inst: Instance, port: int) -> None:
    st = status(inst)
    assert st["running"] is True and st["pid"] == inst.supervisor_pid()
    assert isinstance(st["generation"], int) and st["generation"] >= 1
    kinds = {w["kind"] for w in st["workers"]}
    assert {"logger", "queuewriter", "scanner", "local", "watcher", "listener"} <= kinds
    for w in st["workers"]:
        assert set(w) >= {"kind", "pid", "uid", "state", "title"}
        assert w["pid"] > 0 and w["state"] == "running" and w["title"].startswith("eqmail")
    if IS_ROOT:
        import pwd

        uid = {w["kind"]: w["uid"] for w in st["workers"]}
        assert uid["queuewriter"] == pwd.getpwnam("eqmailq").pw_uid
        assert uid["scanner"] == pwd.getpwnam("eqmails").pw_uid
        assert uid["listener"] == pwd.getpwnam("eqmaild").pw_uid
    assert st["listeners"] == [{**st["listeners"][0], "service": "smtp", "address": "127.0.0.1", "port": port}]
    assert st["queue"]["messages"] == 0 and st["queue"]["todo"] == 0
    human = inst.ctl("status")
    assert human.returncode == 0 and f"pid {st['pid']}" in human.stdout
    inst.stop()
    res = inst.ctl("status", "--json", check=False)
    assert res.returncode == 3
    assert json.loads(res.stdout)["running"] is False
    assert inst.ctl("status", check=False).returncode == 3


def test_sysv_init_script_start_status_reload_stop(port: int) -> None:
    i = Instance.create(listen=f"smtp 127.0.0.1:{port}\n")
    defaults = i.root / "default-eqmail"
    defaults.write_text(f"EQMAIL_ROOT={i.root}\nEQMAILCTL={bin_path('eqmailctl')}\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "EQMAIL_DEFAULTS": str(defaults)}

    def script(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/bin/sh", str(REPO / "init" / "eqmail"), action], env=env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    try:
        assert script("status").returncode == 3
        res = script("start")
        assert res.returncode == 0, res
        i.started = True
        assert connects(port)
        assert script("start").returncode == 0  # LSB: starting a running service succeeds
        res = script("status")
        assert res.returncode == 0 and "running" in res.stdout
        before = reloads(i)
        assert script("reload").returncode == 0
        poll(lambda: reloads(i) > before, 10, "the reload", i)
        assert script("stop").returncode == 0
        i.started = False
        assert script("status").returncode == 3
        assert not connects(port)
        assert script("stop").returncode == 0  # LSB: stopping a stopped service succeeds
        assert script("frobnicate").returncode == 2
    finally:
        i.destroy()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies() -> None:
    if not Path("/opt/eqmail/venv/bin/eqmailctl").exists():
        pytest.skip("the unit's /opt/eqmail/venv/bin/eqmailctl is not installed")
    res = subprocess.run(["systemd-analyze", "verify", str(REPO / "init" / "eqmail.service")],
                         capture_output=True, text=True, timeout=60)
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if "eqmail.service" in ln]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


# ------------------------------------------------------------------ check, queue tools


def test_check_lists_values_sources_and_unknown_files(inst: Instance) -> None:
    inst.write_control("frobnicate", "1")
    out = inst.ctl("check").stdout
    assert f"me: {ME}    [{inst.root / 'control' / 'me'}]" in out
    assert re.search(r"^concurrencyremote: 20    \[\(default\)\]$", out, re.M), out
    assert "frobnicate: I have no idea what this file does." in out
    assert "me: I have no idea" not in out


def test_queue_tools_on_a_deferred_message(inst: Instance) -> None:
    dq = inst.home / ".qmail-defer"
    dq.write_text("|exit 111\n")
    os.chmod(dq, 0o644)
    os.chown(dq, inst.uid, inst.gid)
    sendmail(inst, "deferred one", f"testuser+defer@{ME}")
    poll(lambda: "deferral" in inst.log(), 15, "the deferral", inst)
    assert inst.ctl("queue", "stat").stdout == (
        "messages in queue: 1\nmessages in queue but not yet preprocessed: 0\n")
    listing = inst.ctl("queue", "list").stdout
    m = re.fullmatch(r"\d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d GMT  #(\d+)  (\d+)  <testuser@mx\.test\.example> \n"
                     r"\tlocal\ttestuser\+defer@mx\.test\.example\n", listing)
    assert m, listing
    msgid = m.group(1)
    shown = inst.ctl("queue", "show", msgid).stdout
    assert shown.startswith(listing.splitlines()[0] + "\n\tlocal\ttestuser+defer@mx.test.example\n"
                            "origin: local\n\n")  # sendmail: local injection
    assert "Subject: deferred one\n" in shown and "body" not in shown
    deferrals = inst.log().count("deferral")
    assert "queue flush requested" in inst.ctl("queue", "flush").stdout
    poll(lambda: inst.log().count("deferral") > deferrals, 15, "a retry after the flush", inst)
    assert status(inst)["queue"]["messages"] == 1
