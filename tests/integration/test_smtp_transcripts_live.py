"""Every SMTP transcript (tests/cases/smtp/*.txt) replayed over TCP against live listeners
on 127.0.0.1 and ::1 — the same files the pure-session tests run.

A transcript's header becomes real configuration: ``config:`` keys become control files
(databytes, badmailfrom, localiphost, no rcpthosts, servercert.pem for ``tls=1``),
``env:`` lines become the listener's environment options, ``auth=1`` a listener with a
checkpassword program written here that gives the ``# auth:`` outcomes in order (ok,
fail, or crash = killed by a signal) and records what it was given (the ``A:`` lines).
Transcripts needing outcomes that real means cannot produce (``# queue:`` failures,
qmail-spp hooks, client certificates, a different ``max_line``) are skipped with the
reason.

Values the pure driver fixes are matched as what they are live: the client's address for
192.0.2.1, 127.0.0.1 (one of our addresses) for the local 192.0.2.25, any date for the
Received date, any time and qp for ``250 ok <time> qp <n>``, any ``<pid.time@host>``
CRAM-MD5 challenge, the negotiated cipher.  ``H:``/``M:``/``E:`` lines are checked in
the delivered Maildir files of the message (found by its qp): every recipient's copy has
the transcript's Received header and body, Return-Path and Delivered-To give the
envelope.  Both address families run at the same time (threads), so a transcript costs
its slowest side, not their sum (a failed AUTH waits 5 s, as eQmail does).
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import Instance, free_port
from live_smtp import (
    DATE_RE,
    RawClient,
    add_catchall_mailbox,
    install_checkpassword,
    log_size,
    qp_of,
    smtpd_log,
    split_delivery,
    wait_deliveries,
)
from smtp_transcript import DEFAULT_CONFIG, Step, Transcript, all_cases, load

ME = "mx.example.org"
PURE_REMOTE, PURE_LOCAL = "192.0.2.1", "192.0.2.25"
FAMILIES = (("127.0.0.1", "127.0.0.1"), ("::1", "::1"))  # (listen address, client address)
INSTANCE_CONFIG = ("badmailfrom", "localiphost", "rcpthosts", "tls")
LIMIT_CONFIG = ("maxrcpt", "smtperrorsoftlimit", "smtperrorhardlimit", "smtperrorsleep",
                "smtpjunklimit")  # control files of the same names
PURE_DATE = re.compile(rb"\d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}")
PURE_ACCEPTED = re.compile(rb"^250 ok \d+ qp \d+")
PURE_CIPHER = re.compile(rb"ESMTPS \([A-Za-z0-9_-]+ encrypted\)")
CRAM_CHALLENGE = re.compile(rb"^<\d+\.\d+@" + re.escape(ME.encode()) + rb">$")


# ---- turning a transcript header into configuration ---------------------------------

def skip_reason(t: Transcript) -> str | None:
    c = {**DEFAULT_CONFIG, **t.config}
    if t.queue:
        return "needs injected queue-writer failures (# queue:)"
    if c["plugins"] == "1" or t.hooks:
        return "needs qmail-spp plugins, not wired into the listener yet"
    if c["tls_client_relay"] == "1" or t.certs:
        return "needs client certificates and tlsclients (TLS issue)"
    if c["max_line"] != DEFAULT_CONFIG["max_line"]:
        return "max_line is not configurable on a live listener"
    for key in ("greeting", "local_host", "local_ips"):
        if c[key] != DEFAULT_CONFIG[key]:
            return f"config {key} is not expressible live"
    return None


def instance_key(t: Transcript) -> tuple[str, ...]:
    c = {**DEFAULT_CONFIG, **t.config}
    return tuple(c[k] for k in INSTANCE_CONFIG + LIMIT_CONFIG)


def listener_env(t: Transcript, port: int) -> list[tuple[str, str]]:
    """The transcript's env as listener options.  The submission rule compares
    TCPLOCALPORT with SUBMISSIONPORT (and SUBMISSION): the live port cannot be 587, so the
    comparison the transcript means is expressed through those variables."""
    env = dict(t.env)
    # control/databytes is instance-wide; the listener's DATABYTES (which wins over it,
    # as qmail-smtpd's environment does) keeps transcripts with different limits on one
    # instance.  The control file's own path is covered in test_smtp_live.py.
    env.setdefault("DATABYTES", {**DEFAULT_CONFIG, **t.config}["databytes"])
    local_port = env.pop("TCPLOCALPORT", "25")
    for fixed in ("TCPREMOTEIP", "TCPLOCALIP"):
        env.pop(fixed, None)  # the socket's real addresses; matched by substitution
    # SUBMISSION=<port> is eQmail's documented synonym, compared the same way.
    for var, default in (("SUBMISSIONPORT", "587"), ("SUBMISSION", None)):
        if local_port == env.get(var, default):
            env[var] = str(port)
        elif env.get(var) == str(port):
            env[var] = "1"
    return sorted(env.items())


def listener_key(t: Transcript) -> tuple[object, ...]:
    return (tuple(listener_env(t, 0)), {**DEFAULT_CONFIG, **t.config}["auth"])


@dataclass
class LiveSetup:
    inst: Instance
    ports: dict[tuple[object, ...], int]
    cpw_state: Path


def build_instance(key: tuple[str, ...], transcripts: list[Transcript]) -> LiveSetup:
    badmailfrom, localiphost, rcpthosts, tls = key[:len(INSTANCE_CONFIG)]
    controls = {"me": ME, "smtpgreeting": ME,
                # eQmail's 5 s before a 535 (and no lock-out across transcripts): the
                # replies are the same, the run is shorter
                "authlimit": "0 600 0.1",
                "badmailfrom": "\n".join(badmailfrom.split()),
                "locals": ME, "virtualdomains": ":testuser",  # every other domain -> testuser
                # the pure session of the transcripts asks no mailbox lookup (its
                # config has none); the RCPT check is tested in test_backscatter.py
                "rcptchecklocal": "0",

                **dict(zip(LIMIT_CONFIG, key[len(INSTANCE_CONFIG):], strict=True))}
    if localiphost:
        controls["localiphost"] = localiphost
    if rcpthosts != "NONE":
        controls["rcpthosts"] = "\n".join(rcpthosts.split())
    inst = Instance.create(listen=None, extra_controls=controls)
    add_catchall_mailbox(inst)
    if rcpthosts == "NONE":
        (inst.root / "control" / "rcpthosts").unlink(missing_ok=True)
    if tls != "1":
        (inst.root / "control" / "servercert.pem").unlink(missing_ok=True)
    prog, state = install_checkpassword(inst.root, sys.executable)
    ports: dict[tuple[object, ...], int] = {}
    lines = []
    for t in transcripts:
        lkey = listener_key(t)
        if lkey in ports:
            continue
        port = ports[lkey] = free_port()
        opts = [shlex.quote(f"{k}={v}") for k, v in listener_env(t, port)]
        if lkey[1] == "1":
            opts.append(shlex.quote(f"checkpassword={prog} {state}"))
        for address, _ in FAMILIES:
            host = f"[{address}]" if ":" in address else address
            lines.append(" ".join(["smtp", f"{host}:{port}", *opts]))
    inst.write_control("listen", "\n".join(lines))
    inst.start()
    return LiveSetup(inst, ports, state)


# ---- the replay ---------------------------------------------------------------------

@dataclass
class Replay:
    """One transcript over one connection; collects what must be checked afterwards."""

    t: Transcript
    setup: LiveSetup
    host: str
    port: int
    client_ip: str
    log_start: int
    cipher: str | None = None
    challenges: list[bytes] = field(default_factory=list)
    messages: list[dict[str, bytes | str | None]] = field(default_factory=list)
    last_qp: int | None = None

    def where(self, step: Step) -> str:
        return f"{self.t.name}:{step.line} [{self.client_ip}]"

    def subst(self, data: bytes) -> bytes:
        return (data.replace(PURE_REMOTE.encode(), self.client_ip.encode())
                .replace(PURE_LOCAL.encode(), b"127.0.0.1"))

    def expected_re(self, data: bytes) -> re.Pattern[bytes]:
        """An expected line/header as a pattern: fixed values of the pure driver become
        what they are live (date, time and qp of the 250, cipher)."""
        variable = [(PURE_DATE, DATE_RE), (PURE_ACCEPTED, rb"250 ok \d+ qp \d+")]
        if self.cipher is not None:
            variable.append((PURE_CIPHER, re.escape(f"ESMTPS ({self.cipher} encrypted)".encode())))
        text = self.subst(data)
        pattern, pos = b"", 0
        for m in sorted((m for rx, _ in variable for m in rx.finditer(text)), key=lambda m: m.start()):
            live = next(live for rx, live in variable if rx is m.re)
            pattern += re.escape(text[pos:m.start()]) + live
            pos = m.end()
        return re.compile(pattern + re.escape(text[pos:]) + rb"\Z", re.DOTALL)

    def run(self) -> None:
        t = self.t
        c = RawClient(self.host, self.port)
        if t.auth:
            outcomes = self.setup.cpw_state / f"{c.local_port}.outcomes"
            outcomes.write_text("\n".join(t.auth) + "\n")
        try:
            self._steps(c)
            if not c.eof:
                c.shutdown_write()  # end the session the way the server can see
            rest = c.read_to_eof()
            assert not rest, f"{t.name} [{self.client_ip}]: unexpected output {rest!r}"
        finally:
            c.close()
        self._check_logs()
        self._check_auth(c.local_port)
        self._check_messages()

    def _steps(self, c: RawClient) -> None:
        for step in self.t.steps:
            where = self.where(step)
            if step.kind == "send":
                c.send(self.subst(step.data))
            elif step.kind == "eof":
                c.shutdown_write()
            elif step.kind == "expect":
                self._expect(c, step, where)
            elif step.kind == "closed":
                rest = c.read_to_eof()
                assert not rest, f"{where}: output before close {rest!r}"
            elif step.kind in ("message", "header", "envelope"):
                assert self.last_qp is not None, f"{where}: no message was accepted"
                if not self.messages or self.messages[-1]["qp"] != self.last_qp:
                    self.messages.append({"qp": self.last_qp, "message": None,
                                          "header": None, "envelope": None})
                msg = self.messages[-1]
                if step.kind == "envelope":
                    msg["envelope"] = step.data.decode()
                else:
                    msg[step.kind] = (msg[step.kind] or b"") + step.data  # type: ignore[operator]

    def _expect(self, c: RawClient, step: Step, where: str) -> None:
        got = c.line()
        if got.startswith(b"334 ") and self._is_cram(step.data):
            challenge = base64.b64decode(got[4:].strip())
            assert CRAM_CHALLENGE.match(challenge), f"{where}: challenge {challenge!r}"
            self.challenges.append(challenge)
            return
        assert self.expected_re(step.data + b"\r\n").match(got), (
            f"{where}: expected {step.data!r}, got {got!r}")
        if (qp := qp_of(got)) is not None:
            self.last_qp = qp
        if step.data == b"220 ready for tls":
            self.cipher = c.starttls()

    @staticmethod
    def _is_cram(expected: bytes) -> bool:
        if not expected.startswith(b"334 "):
            return False
        try:
            return base64.b64decode(expected[4:]).startswith(b"<")
        except ValueError:
            return False

    def _check_logs(self) -> None:
        wanted = [self.subst(s.data).decode() for s in self.t.steps if s.kind == "log"]
        if not wanted:
            return
        deadline = time.monotonic() + 10
        while True:
            got = smtpd_log(self.setup.inst, self.client_ip, self.log_start)
            it = iter(got)
            # In order; another session from the same address may log in between.
            if all(any(line == w for line in it) for w in wanted):
                return
            assert time.monotonic() < deadline, (
                f"{self.t.name} [{self.client_ip}]: log lines {wanted!r} not in {got!r}")
            time.sleep(0.02)

    def _check_auth(self, port: int) -> None:
        wanted = [s for s in self.t.steps if s.kind == "auth"]
        if not wanted:
            return
        calls_file = self.setup.cpw_state / f"{port}.calls"
        calls = [json.loads(x) for x in calls_file.read_text().splitlines()]
        assert len(calls) == len(wanted), f"{self.t.name}: checkpassword calls {calls!r}"
        cram = iter(self.challenges)
        for step, call in zip(wanted, calls, strict=True):
            method, user, password = step.data.decode().split(" ", 2)
            assert (call["user"], call["password"]) == (user, password), (
                f"{self.where(step)}: checkpassword got {call['user']!r} {call['password']!r}")
            if method == "cram-md5":
                assert call["challenge"].encode() == next(cram), self.where(step)
            assert call["env"]["TCPREMOTEIP"] == self.client_ip

    def _check_messages(self) -> None:
        for msg in self.messages:
            qp = int(msg["qp"])  # type: ignore[arg-type]
            envelope = msg["envelope"]
            want_rcpts = str(envelope).split(" ")[1:] if envelope is not None else []
            files = wait_deliveries(self.setup.inst, qp, max(1, len(want_rcpts)))
            seen = []
            for data in files:
                sender, delivered_to, _qq, header, body = split_delivery(data)
                if msg["header"] is not None:
                    assert self.expected_re(msg["header"]).match(header), (  # type: ignore[arg-type]
                        f"{self.t.name} [{self.client_ip}] qp {qp}: Received {header!r}")
                if msg["message"] is not None:
                    assert body == msg["message"], f"{self.t.name} qp {qp}: body {body!r}"
                if envelope is not None:
                    assert sender.decode() == str(envelope).split(" ")[0], f"qp {qp}: {sender!r}"
                seen.append(delivered_to.decode().removeprefix("testuser-"))
            if envelope is not None:
                assert sorted(seen) == sorted(r.lower() for r in want_rcpts), (
                    f"{self.t.name} qp {qp}: delivered to {seen!r}, envelope {envelope!r}")


# ---- pytest wiring ------------------------------------------------------------------

TRANSCRIPTS = [load(p) for p in all_cases()]
LIVE = [t for t in TRANSCRIPTS if skip_reason(t) is None]


@pytest.fixture(scope="module")
def live_instances() -> Iterator[dict[tuple[str, ...], LiveSetup]]:
    """Every instance the transcripts need, built and started in parallel (most of an
    instance's start-up is waiting for subprocesses), destroyed in parallel."""
    groups: dict[tuple[str, ...], list[Transcript]] = {}
    for t in LIVE:
        groups.setdefault(instance_key(t), []).append(t)
    setups: dict[tuple[str, ...], LiveSetup] = {}
    with ThreadPoolExecutor(len(groups)) as pool:
        futures = {key: pool.submit(build_instance, key, ts) for key, ts in groups.items()}
    try:
        for key, future in futures.items():
            setups[key] = future.result()
        yield setups
    finally:
        with ThreadPoolExecutor(len(futures)) as pool:
            for future in futures.values():
                if future.exception() is None:
                    pool.submit(future.result().inst.destroy)


@pytest.mark.parametrize("t", TRANSCRIPTS, ids=[t.name for t in TRANSCRIPTS])
def test_transcript_live(t: Transcript, live_instances: dict[tuple[str, ...], LiveSetup]) -> None:
    reason = skip_reason(t)
    if reason:
        pytest.skip(reason)
    setup = live_instances[instance_key(t)]
    port = setup.ports[listener_key(t)]
    start = log_size(setup.inst)
    errors: list[BaseException] = []

    def one(host: str, client_ip: str) -> None:
        try:
            Replay(t, setup, host, port, client_ip, start).run()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=fam) for fam in FAMILIES]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    if errors:
        raise errors[0]
