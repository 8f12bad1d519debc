"""The command-line tools as an admin or a script meets them (issue 14, items 8-11, 17).

Every console script answers ``--help`` (usage on stdout, exit 0) and ``--version``;
``eqmailctl queue stat|list|show --json`` and ``check --json`` are parsed with json.loads
and their documented fields checked against a running instance with queued messages (a
local recipient that defers, one already delivered, a remote one whose relay is down);
every man page renders with ``man -l`` without a warning and documents every option and
JSON field; the bash completion loads and completes queue ids of the live instance; a
``submission`` listener requires AUTH by itself and ``SUBMISSION=<port>`` works like
SUBMISSIONPORT; ``import-qmail --dry-run`` changes nothing and both runs show progress;
a built wheel carries the man pages, completion, init files and plugins.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import ME, Instance, QmailTree, bin_path, free_port

from eqmail import __version__

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
MAN_PAGES = ("eqmailctl.8", "eqmail-inject.8", "eqmail-sendmail.8", "eqmail-checkpassword.8",
             "eqmail-control.5")
PROGRAMS = ("eqmailctl", "eqmail-inject", "eqmail-sendmail", "eqmail-checkpassword")
EQMAILCTL_COMMANDS = ("setup", "start", "stop", "status", "reload", "reopen-logs", "check", "cert",
                      "import-qmail", "queue", "dkim", "tlsrpt")
PASSWORD = "Secret-1"


def run(*argv: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env=env, **kw)  # type: ignore[call-overload]


# ------------------------------------------------------------------ --help / --version


@pytest.mark.parametrize("prog", PROGRAMS)
def test_help_and_version(prog: str) -> None:
    for argv in ([bin_path(prog), "--help"], [bin_path(prog), "--version"]):
        proc = run(*argv)
        assert proc.returncode == 0 and proc.stderr == "", (argv, proc)
    assert run(bin_path(prog), "--help").stdout.startswith(("usage: " + prog, "usage: eqmailctl"))
    assert run(bin_path(prog), "--version").stdout == f"{prog} (eqmail) {__version__}\n"


@pytest.mark.parametrize("command", EQMAILCTL_COMMANDS)
def test_every_eqmailctl_command_has_help(command: str) -> None:
    proc = run(bin_path("eqmailctl"), command, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(f"usage: eqmailctl {command}")


# ------------------------------------------------------------------ a live instance with a queue


@dataclass
class Live:
    inst: Instance
    ports: dict[str, int]
    msgid: int


def _auth_plain() -> bytes:
    return base64.b64encode(f"\0joe\0{PASSWORD}".encode())


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    ports = {name: free_port(("127.0.0.1",)) for name in ("smtp", "submission", "synonym", "dead")}
    inst = Instance.create(listen=None)
    passwords = inst.root / "control" / "passwords"
    subprocess.run([bin_path("eqmail-checkpassword"), "passwd", "add", "joe", "--file", str(passwords)],
                   input=f"{PASSWORD}\n", text=True, check=True, capture_output=True)
    ours = f"{bin_path('eqmail-checkpassword')} --file {passwords} /bin/true"
    inst.write_control("listen", "\n".join([
        f"smtp 127.0.0.1:{ports['smtp']}",
        # no SUBMISSIONPORT: the service alone makes it a submission port
        f"submission 127.0.0.1:{ports['submission']} rules=tcp.submission checkpassword='{ours}'",
        # eQmail 1.09's announcement: SUBMISSION=<port>
        f"smtp 127.0.0.1:{ports['synonym']} SUBMISSION={ports['synonym']} checkpassword='{ours}'",
    ]))
    inst.write_control("tcp.submission", ':allow,RELAYCLIENT=""')
    inst.write_control("smtproutes", f"remote.example:127.0.0.1:{ports['dead']}")
    inst.write_control("greylistdelay", "60")  # a shipped plugin's own file
    dot = inst.home / ".qmail-defer"
    dot.write_text("|exit 111\n")
    os.chown(dot, inst.uid, inst.gid)
    try:
        inst.start()
        msg = b"To: testuser@mx.test.example\nSubject: json test\n\nhello\n"
        proc = inst.sendmail(["-f", f"testuser@{ME}", f"testuser@{ME}", f"testuser+defer@{ME}",
                              "someone@remote.example"], msg)
        assert proc.returncode == 0, proc.stderr
        inst.wait_for_mail(1)
        msgid = _wait_deferred(inst)
        yield Live(inst, ports, msgid)
    finally:
        inst.destroy()


def _wait_deferred(inst: Instance) -> int:
    """The message once its local delivery was done / deferred and its remote one deferred."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log = inst.log()
        listing = inst.ctl("queue", "list").stdout
        if (len(re.findall(r"delivery \d+: deferral", log)) >= 2 and "  done\tlocal\ttestuser@" in listing):
            return int(re.findall(r"#(\d+)", listing)[0])
        time.sleep(0.1)
    raise AssertionError("no deferrals\n" + inst.log())


def test_queue_json(live: Live) -> None:
    inst, msgid = live.inst, live.msgid
    stat = json.loads(inst.ctl("queue", "stat", "--json").stdout)
    assert stat == {"messages": 1, "todo": 0}
    listing = json.loads(inst.ctl("queue", "list", "--json").stdout)
    [m] = listing["messages"]
    mess = inst.root / "queue" / "mess" / str(msgid % 23) / str(msgid)
    assert m["id"] == msgid and m["size"] == mess.stat().st_size
    assert abs(m["time"] - time.time()) < 300
    assert m["date"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m["time"]))
    assert m["sender"] == f"testuser@{ME}"
    assert (m["bouncing"], m["preprocessed"], m["warnings"]) == (False, True, [])
    assert sorted((r["channel"], r["address"], r["done"]) for r in m["recipients"]) == [
        ("local", f"testuser+defer@{ME}", False), ("local", f"testuser@{ME}", True),
        ("remote", "someone@remote.example", False)]
    shown = json.loads(inst.ctl("queue", "show", str(msgid), "--json").stdout)
    assert {k: v for k, v in shown.items() if k not in ("header", "header_truncated", "tls")} == m
    assert [t["domain"] for t in shown["tls"]] == ["remote.example"]  # the pending remote domain
    assert "Subject: json test\n" in shown["header"] and shown["header_truncated"] is False
    missing = inst.ctl("queue", "show", "1", "--json", check=False)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == "eqmailctl queue show: no message #1 in the queue\n"
    documented = man_text("eqmailctl.8")
    for key in [*stat, *listing, *m, *m["recipients"][0], *shown]:
        assert re.search(rf"^\.B {re.escape(key)}$|^\.BR? {re.escape(key)} ", documented, re.M), key


def test_check_json_and_text(live: Live) -> None:
    inst, ports = live.inst, live.ports
    report = json.loads(inst.ctl("check", "--json").stdout)
    assert report["ok"] is True and report["errors"] == [] and report["unknown"] == []
    assert report["root"] == str(inst.root)
    rows = {r["file"]: r for r in report["controls"]}
    assert rows["me"]["value"] == ME and rows["me"]["source"] == str(inst.root / "control" / "me")
    assert rows["queuelifetime"] == {"file": "queuelifetime", "value": 604800, "text": "604800",
                                     "source": "(default)"}
    assert [p["file"] for p in report["plugin_controls"]] == ["greylistdelay"]
    assert report["warnings"] == [
        f"warning: control/listen: smtp 127.0.0.1:{ports['synonym']} requires AUTH before MAIL "
        f"(SUBMISSION={ports['synonym']} matches its port); if that is meant, write it as a "
        "'submission' listener"]
    text = inst.ctl("check").stdout
    assert "I have no idea" not in text  # passwords, passwords.lock, tcp.submission, greylistdelay
    assert report["warnings"][0] + "\n" in text
    documented = man_text("eqmailctl.8")
    for key in [*report, *report["controls"][0], *report["plugin_controls"][0]]:
        assert re.search(rf"^\.BR? {re.escape(key)}( |$)", documented, re.M), key
    databytes = (inst.root / "control" / "databytes").read_text()
    inst.write_control("databytes", "lots")
    try:
        bad = inst.ctl("check", "--json", check=False)
        assert bad.returncode == 1
        assert json.loads(bad.stdout)["errors"] == ["control/databytes:1: not a number: 'lots'"]
    finally:
        inst.write_control("databytes", databytes)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.f = self.sock.makefile("rb")
        assert self.reply().startswith(b"220 ")

    def reply(self) -> bytes:
        lines = [self.f.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(self.f.readline())
        return b"".join(lines)

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.cmd(b"QUIT")
        self.sock.close()


@pytest.mark.parametrize("listener", ["submission", "synonym"])
def test_submission_port_requires_auth(live: Live, listener: str) -> None:
    """A `submission` listener (no SUBMISSIONPORT) and an `smtp` one with eQmail's
    SUBMISSION=<port>: 530 before AUTH, RELAYCLIENT notwithstanding; 250 after it."""
    c = Client(live.ports[listener])
    assert b"AUTH LOGIN PLAIN" in c.cmd(b"EHLO client.example")
    assert c.cmd(b"MAIL FROM:<a@client.example>") == b"530 Authorization required (#5.7.1) \r\n"
    assert c.cmd(b"AUTH PLAIN " + _auth_plain()).startswith(b"235 ok, joe, go ahead")
    assert c.cmd(b"MAIL FROM:<a@client.example>") == b"250 ok\r\n"
    c.close()
    plain = Client(live.ports["smtp"])  # an ordinary port stays ordinary
    plain.cmd(b"EHLO client.example")
    assert plain.cmd(b"MAIL FROM:<a@client.example>") == b"250 ok\r\n"
    plain.close()


# ------------------------------------------------------------------ man pages and completion


def man_text(page: str) -> str:
    return (REPO / "man" / page).read_text()


def render(page: str, width: int = 80) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MANWIDTH=str(width), LC_ALL="C.UTF-8", MANPAGER="cat", PAGER="cat")
    return run("man", "--warnings=w", "-l", str(REPO / "man" / page), env=env)


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_renders_without_warnings(page: str) -> None:
    proc = render(page)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    name = page.rsplit(".", 1)[0]
    assert re.search(rf"^NAME\n\s+{re.escape(name)}\s+- ", proc.stdout, re.M), proc.stdout[:300]
    for section in ("SYNOPSIS" if page.endswith(".8") else "DESCRIPTION", "SEE ALSO"):
        assert f"\n{section}\n" in proc.stdout


def test_man_pages_document_every_option() -> None:
    """eqmailctl(8) names every command and option of the parser; the other pages every
    option their --help lists."""
    import argparse

    from eqmail.cli.eqmailctl import build_parser

    page = render("eqmailctl.8", width=1000).stdout  # no line breaks inside words
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(EQMAILCTL_COMMANDS)
    for name, p in [("", parser), *sub.choices.items()]:
        assert name in page
        for action in p._actions:
            for opt in action.option_strings:
                assert opt in page, (name, opt)
            for choice in action.choices or ():
                if isinstance(choice, str):
                    assert choice in page, (name, choice)
    for prog in ("eqmail-inject", "eqmail-sendmail", "eqmail-checkpassword"):
        page = render(f"{prog}.8", width=1000).stdout
        helptext = run(bin_path(prog), "--help").stdout
        for opt in set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", helptext)):
            assert opt in page, (prog, opt)


def test_bash_completion(live: Live) -> None:
    script = REPO / "completions" / "eqmailctl.bash"
    probe = (f"source {script} && complete -p eqmailctl && "
             "c() { COMP_WORDS=(\"$@\"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _eqmailctl; "
             "echo \"${COMPREPLY[*]}\"; }; "
             "c eqmailctl qu; c eqmailctl queue ''; c eqmailctl check --j; "
             f"c {bin_path('eqmailctl')} --root {live.inst.root} queue show ''; "
             "c eqmailctl import-qmail --dry; c eqmailctl dkim ''; "
             "c eqmailctl dkim keygen example.com --type ''")
    proc = run("bash", "--norc", "--noprofile", "-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "complete -F _eqmailctl eqmailctl", "queue", "stat list show flush delete bounce --help",
        "--json", str(live.msgid), "--dry-run", "keygen show check --help", "rsa ed25519"]


# ------------------------------------------------------------------ import-qmail


def snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Every path under ``top`` with mode, owner, size, mtime and content digest."""
    out: dict[str, tuple[object, ...]] = {}
    if not top.exists():
        return out
    for dirpath, dirs, files in os.walk(top):
        for name in [*dirs, *files, "."]:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            out[str(p.relative_to(top))] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture
def qmail_tree() -> Iterator[QmailTree]:
    tree = QmailTree.create(big_todo=True)
    tree.write("control/me", f"{ME}\n")
    tree.write("control/rcpthosts", f"{ME}\n")
    tree.write("control/tarpitcount", "20\n")  # a plugin's file: known, carried over
    for i in range(60):
        msgid = tree.add_mess(f"Subject: queued {i}\n\nbody {i}\n".encode())
        tree.add_todo(msgid, f"sender{i}@{ME}", [f"testuser@{ME}"])
    try:
        yield tree
    finally:
        tree.destroy()


def progress_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("import-qmail: queue ")]


def test_import_qmail_dry_run_changes_nothing_then_import_shows_progress(
        instance: Instance, qmail_tree: QmailTree) -> None:
    before = (snapshot(instance.root), snapshot(qmail_tree.home))
    dry = instance.ctl("import-qmail", str(qmail_tree.home), "--dry-run")
    assert (snapshot(instance.root), snapshot(qmail_tree.home)) == before
    out = dry.stdout.splitlines()
    assert len([ln for ln in out if re.fullmatch(r"would import queue msg \d+ \(not yet preprocessed, "
                                                 r"big-todo todo\)", ln)]) == 60
    assert "would import control/tarpitcount" in out and "note: dry run: nothing was changed" in out
    steps = progress_lines(dry.stderr)
    assert steps[0] == "import-qmail: queue 0/60 messages (0%)"
    assert steps[-1] == "import-qmail: queue 60/60 messages (100%)" and len(steps) >= 10
    fresh = instance.root.parent / (instance.root.name + "-fresh")
    run_fresh = run(bin_path("eqmailctl"), "--root", str(fresh), "import-qmail", str(qmail_tree.home), "--dry-run")
    assert run_fresh.returncode == 0, run_fresh.stderr
    assert not fresh.exists() and "note: setup: would create" in run_fresh.stdout

    real = instance.ctl("import-qmail", str(qmail_tree.home))
    real_steps = progress_lines(real.stderr)
    assert real_steps[0] == steps[0] and real_steps[-1] == steps[-1] and len(real_steps) >= 10
    assert len(re.findall(r"^imported queue msg \d+ as msg (\d+)", real.stdout, re.M)) == 60
    assert json.loads(instance.ctl("queue", "stat", "--json").stdout) == {"messages": 60, "todo": 60}
    new_id = re.search(r"^imported queue msg \d+ as msg (\d+)", real.stdout, re.M).group(1)  # type: ignore[union-attr]
    shown = json.loads(instance.ctl("queue", "show", new_id, "--json").stdout)
    assert shown["preprocessed"] is False and shown["recipients"] == [
        {"channel": "todo", "address": f"testuser@{ME}", "done": False}]
    assert json.loads(instance.ctl("queue", "list", "--json").stdout) == {"messages": []}  # none in info/ yet
    assert snapshot(qmail_tree.home) == before[1]


# ------------------------------------------------------------------ packaging


def test_wheel_ships_man_pages_completion_init_and_plugins(tmp_path: Path) -> None:
    proc = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO))
    if proc.returncode != 0 and "No matching distribution" in proc.stderr:
        pytest.skip("no setuptools>=77 reachable for the isolated build")
    assert proc.returncode == 0, proc.stderr
    [wheel] = tmp_path.glob("eqmail-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    data = {n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n}
    expected = {f"share/man/man{p[-1]}/{p}" for p in MAN_PAGES}
    expected.add("share/bash-completion/completions/eqmailctl.bash")
    expected |= {f"share/eqmail/init/{p.name}" for p in (REPO / "init").iterdir()}
    expected |= {f"share/eqmail/plugins/{n}" for n in ("dnsbl", "greylist", "rcptcheck", "sendercheck",
                                                         "spf", "tarpit", "sppkit.py", "README.md")}
    assert expected <= data, expected - data
    assert "License-Expression: LicenseRef-Public-Domain" in meta.splitlines()
    assert not [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist: multiprocess")]
    assert "/opt/eqmail/venv/share/eqmail/plugins/" in (REPO / "plugins" / "README.md").read_text()


# ------------------------------------------------------------------ stop timeout (item 11)


def test_stop_timeout_message_names_its_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A supervisor that ignores SIGTERM (a real process holding the pid-file lock):
    ``stop`` gives up after STOP_TIMEOUT and says after how long."""
    from eqmail.cli import eqmailctl

    (tmp_path / "run").mkdir()
    pidfile = tmp_path / "run" / "eqmail.pid"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, signal, sys, time\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         f"fd = os.open({str(pidfile)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        monkeypatch.setattr(eqmailctl, "STOP_TIMEOUT", 1.0)
        assert eqmailctl.main(["--root", str(tmp_path), "stop"]) == 1
        assert capsys.readouterr().err == "eqmail: still stopping after 1s\n"
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
