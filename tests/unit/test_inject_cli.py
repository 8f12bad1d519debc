"""eqmail-inject and eqmail-sendmail driven in-process with a recording submit."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest

from eqmail.cli.inject import Context, inject
from eqmail.cli.sendmail import sendmail
from eqmail.inject.headers import Defaults

DEFAULTS = Defaults(b"example.com", b"host", b"plus.example", b"id.example")


@dataclass
class Answer:
    code: int = 0
    text: str = ""
    permanent: bool = False


@dataclass
class Recorder:
    answer: Answer = field(default_factory=Answer)
    calls: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    def __call__(self, sender: str, recipients, message: BinaryIO) -> Answer:  # type: ignore[no-untyped-def]
        self.calls.append((sender, list(recipients), message.read()))
        return self.answer


def make(stdin: bytes, env: dict[str, str] | None = None, root: Path = Path("/nonexistent"),
         answer: Answer | None = None) -> tuple[Context, Recorder]:
    rec = Recorder(answer or Answer())
    ctx = Context(root, io.BytesIO(stdin), io.BytesIO(), io.BytesIO(),
                  {"USER": "joe"} if env is None else env, rec, lambda: DEFAULTS,
                  clock=lambda: 1700000000.0, pid=4242)
    return ctx, rec


def out(ctx: Context) -> bytes:
    return ctx.stdout.getvalue()  # type: ignore[attr-defined]


def err(ctx: Context) -> bytes:
    return ctx.stderr.getvalue()  # type: ignore[attr-defined]


MSG = b"To: a, b@x.org\nBcc: hidden\nSubject: s\n\nbody"


def test_header_recipients_by_default_and_bcc_removed() -> None:
    ctx, rec = make(MSG)
    assert inject([], ctx) == 0
    [(sender, rcpts, data)] = rec.calls
    assert sender == "joe@host.example.com"
    assert rcpts == ["b@x.org", "a@host.example.com", "hidden@host.example.com"]
    assert b"hidden" not in data and b"Bcc" not in data
    assert data.endswith(b"To: a@host.example.com, b@x.org\nSubject: s\n\nbody\n")  # newline added
    assert b"Message-ID: <20231114221320.4242.qmail@id.example>\n" in data
    assert b"From: joe@host.example.com\n" in data


@pytest.mark.parametrize(("opts", "expected"), [
    (["r1"], ["r1@host.example.com"]),  # -A: args when there are args
    (["-a", "r1"], ["r1@host.example.com"]),
    (["-h", "r1"], ["b@x.org", "a@host.example.com", "hidden@host.example.com"]),
    (["-H", "r1"], ["r1@host.example.com", "b@x.org", "a@host.example.com", "hidden@host.example.com"]),
    (["-a"], []),
])
def test_recipient_strategies(opts: list[str], expected: list[str]) -> None:
    ctx, rec = make(MSG)
    assert inject(opts, ctx) == 0
    assert rec.calls[0][1] == expected


def test_sender_option_beats_return_path() -> None:
    for opts in (["-fme@y.org"], ["-f", "me@y.org"]):
        ctx, rec = make(b"Return-Path: <rp@x.org>\n\nb\n")
        assert inject([*opts, "r"], ctx) == 0
        assert rec.calls[0][0] == "me@y.org"
    ctx, rec = make(b"Return-Path: <rp@x.org>\n\nb\n")
    assert inject(["r"], ctx) == 0
    assert rec.calls[0][0] == "rp@x.org"
    assert b"Return-Path" not in rec.calls[0][2]


def test_n_prints_instead_of_queueing() -> None:
    ctx, rec = make(b"Subject: s\n\nbody\n", env={"USER": "joe", "TZ": "UTC"})
    assert inject(["-n", "r"], ctx) == 0
    assert rec.calls == []
    assert out(ctx).startswith(b"Return-Path: <joe@host.example.com>\nDate: ")
    assert out(ctx).endswith(b"Cc: recipient list not shown: ;\nSubject: s\n\nbody\n")


def test_env_overrides_controls() -> None:
    ctx, rec = make(b"", env={"USER": "joe", "QMAILDEFAULTHOST": "h2.org", "QMAILIDHOST": "i2"})
    assert inject(["r"], ctx) == 0
    sender, rcpts, data = rec.calls[0]
    assert (sender, rcpts) == ("joe@h2.org", ["r@h2.org"])
    assert b".qmail@i2>" in data


def test_usage_and_header_syntax_exit_100() -> None:
    ctx, rec = make(b"")
    assert inject(["-x"], ctx) == 100
    assert err(ctx).startswith(b"qmail-inject: usage:")
    ctx, rec = make(b"To: (unclosed\n\nb\n")
    assert inject([], ctx) == 100
    assert err(ctx) == b"qmail-inject: fatal: unable to parse this line:\nTo: (unclosed\n"
    ctx, rec = make(b"")
    assert inject(["x@(y"], ctx) == 100
    assert err(ctx) == b"qmail-inject: fatal: unable to parse address: x@(y\n"
    assert rec.calls == []


def test_queue_failures_map_to_exit_codes() -> None:
    ctx, _ = make(b"", answer=Answer(120, "unable to exec qq (#4.3.0)", False))
    assert inject(["r"], ctx) == 111
    assert err(ctx) == b"qmail-inject: fatal: unable to exec qq (#4.3.0)\n"
    ctx, _ = make(b"", answer=Answer(31, "mail server permanently rejected message (#5.3.0)", True))
    assert inject(["r"], ctx) == 100
    assert err(ctx) == b"qmail-inject: fatal: mail server permanently rejected message (#5.3.0)\n"


def test_large_body_is_streamed_through() -> None:
    body = (b"x" * 999 + b"\n") * 3000  # 3 MB: past the in-memory spool size
    ctx, rec = make(b"Subject: big\n\n" + body)
    assert inject(["r"], ctx) == 0
    assert rec.calls[0][2].endswith(b"Subject: big\n\n" + body)


# ---------------------------------------------------------------- sendmail


def test_sendmail_t_and_args() -> None:
    ctx, rec = make(MSG)
    assert sendmail("sendmail", ["-t", "-oi", "-odb", "-oem", "-i", "-v", "-x", "-m", "-eq",
                                 "-B8BITMIME", "-p", "x", "-E", "-Jfoo"], ctx) == 0
    assert rec.calls[0][1] == ["b@x.org", "a@host.example.com", "hidden@host.example.com"]
    ctx, rec = make(MSG)
    assert sendmail("/usr/sbin/sendmail", ["-oi", "--", "r1", "-r2"], ctx) == 0
    assert rec.calls[0][1] == ["r1@host.example.com", "-r2@host.example.com"]


def test_sendmail_f_sets_identity_and_loses_F() -> None:
    ctx, rec = make(b"Subject: s\n\n", env={"USER": "joe", "NAME": "N"})
    assert sendmail("sendmail", ["-F", "Full Name", "-f", "box@dom.org", "r"], ctx) == 0
    sender, _, data = rec.calls[0]
    assert sender == "box@dom.org"
    assert b"From: box@dom.org\n" in data
    ctx, rec = make(b"", env={"USER": "joe"})
    assert sendmail("sendmail", ["-FFull Name", "r"], ctx) == 0
    assert b'From: "Full Name" <joe@host.example.com>\n' in rec.calls[0][2]


def test_sendmail_usage_and_modes() -> None:
    for args in (["-Z"], ["-bx"], ["-f"]):
        ctx, rec = make(b"")
        assert sendmail("sendmail", args, ctx) == 100, args
        assert err(ctx).startswith(b"sendmail: usage:")
    ctx, rec = make(b"")
    assert sendmail("sendmail", ["-bm", "r"], ctx) == 0 and rec.calls
    ctx, rec = make(b"")
    assert sendmail("newaliases", [], ctx) == 100
    assert err(ctx) == b"sendmail: fatal: please use fastforward/newaliases instead\n"


def test_bs_without_and_with_stdio_module() -> None:
    ctx, _ = make(b"")
    assert sendmail("sendmail", ["-bs"], ctx, find_stdio=lambda: None) == 100
    assert err(ctx) == b"sendmail: fatal: -bs is not supported yet\n"
    seen: list[Path] = []
    ctx, _ = make(b"")
    assert sendmail("sendmail", ["-bs"], ctx, find_stdio=lambda: lambda root: seen.append(root) or 7) == 7
    assert seen == [ctx.root] and ctx.env["PROTO"] == "TCP" and ctx.env["TCPREMOTEINFO"] == "sendmail-bs"
    ctx, _ = make(b"", env={"PROTO": "SMTP"})
    sendmail("sendmail", ["-bs"], ctx, find_stdio=lambda: lambda root: 0)
    assert "RELAYCLIENT" not in ctx.env


def test_mailq_by_name_and_bp(tmp_path: Path) -> None:
    from eqmail.queue.layout import create_queue

    q = create_queue(tmp_path / "queue")
    mess = q.mess(0)
    mess.write_bytes(b"Subject: x\n\n")
    msgid = os.stat(mess).st_ino
    os.rename(mess, q.mess(msgid))
    q.info(msgid).write_bytes(b"Fs@x.org\0")
    os.utime(q.info(msgid), (0, 0))
    expected = f"1 Jan 1970 00:00:00 GMT  #{msgid}  12  <s@x.org> \n".encode()
    for prog, args in (("/usr/bin/mailq", []), ("sendmail", ["-bp", "-Z"])):
        ctx, _ = make(b"", root=tmp_path)
        assert sendmail(prog, args, ctx) == 0
        assert out(ctx) == expected


# ------------------------------------------------------------------ --help / --version


def _run_inject(args: list[str], ctx: Context) -> int:
    return inject(args, ctx)


def _run_sendmail(args: list[str], ctx: Context) -> int:
    return sendmail("sendmail", args, ctx)


@pytest.mark.parametrize(("run", "prog", "opt"), [(_run_inject, "eqmail-inject", "-a"),
                                                  (_run_sendmail, "eqmail-sendmail", "-t")])
def test_help_and_version_exit_0_on_stdout(run, prog: str, opt: str) -> None:  # type: ignore[no-untyped-def]
    from eqmail import __version__

    ctx, rec = make(MSG)
    assert run(["--help"], ctx) == 0
    assert out(ctx).startswith(f"usage: {prog} ".encode()) and b"--version" in out(ctx)
    assert err(ctx) == b"" and rec.calls == []
    ctx, rec = make(MSG)
    assert run([opt, "--version"], ctx) == 0  # after other options too
    assert out(ctx) == f"{prog} (eqmail) {__version__}\n".encode() and rec.calls == []
    ctx, rec = make(MSG)
    assert run(["--frobnicate"], ctx) == 100  # any other long word stays a usage error
    assert out(ctx) == b"" and b"usage:" in err(ctx) and rec.calls == []


def test_long_words_in_data_positions_are_data() -> None:
    """Only a word where option letters are expected is --help: an option's argument or
    a recipient after -- is still mail data."""
    ctx, rec = make(MSG)
    assert inject(["-a", "-f", "--help", "r1"], ctx) == 0
    assert rec.calls[0][0].startswith("--help") and rec.calls[0][1] == ["r1@host.example.com"]
    ctx, rec = make(MSG)
    assert inject(["-a", "--", "--version"], ctx) == 0
    assert rec.calls[0][1] == ["--version@host.example.com"] and out(ctx) == b""
