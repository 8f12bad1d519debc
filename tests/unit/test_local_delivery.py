"""qmail-local behaviour: Maildir, mbox, programs, forwards, checks and report texts."""

from __future__ import annotations

import errno
import io
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqmail.delivery import maildir, mbox
from eqmail.delivery.local import (
    LocalJob,
    Report,
    ctime_gmt,
    deliver,
    envelope_lines,
    quote_address,
)
from eqmail.ipc.delivery import Verdict

NOW = 1_700_000_000.0  # Tue Nov 14 22:13:20 2023 GMT
MESSAGE = b"Subject: hi\n\nFrom here on\n>From there\nbody\n"
DT = b"Delivered-To: joe-foo@example.org\n"
RP = b"Return-Path: <a@b.example>\n"
UF = b"From a@b.example Tue Nov 14 22:13:20 2023\n"


class Recorder:
    """A forwarder that remembers its calls and returns a fixed result."""

    def __init__(self, result: tuple[Verdict, str, int | None] = (Verdict.SUCCESS, "", 4242)):
        self.calls: list[tuple[str, tuple[str, ...], bytes, bytes]] = []
        self.result = result

    def __call__(self, sender: str, recips: Sequence[str], prefix: bytes, message: BinaryIO):
        self.calls.append((sender, tuple(recips), prefix, message.read()))
        return self.result


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return home


def make_maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, mode=0o700)
    return path


def write(home: Path, name: str, text: str, mode: int = 0o600) -> None:
    (home / name).write_text(text)
    os.chmod(home / name, mode)


def message_file(tmp_path: Path, data: bytes = MESSAGE) -> BinaryIO:
    path = tmp_path / "mess"
    path.write_bytes(data)
    return open(path, "rb")


def job(home: Path, *, local: str = "joe-foo", dash: str = "-", ext: str = "foo",
        sender: str = "a@b.example", default: str = "./Maildir/") -> LocalJob:
    return LocalJob("joe", str(home), local, dash, ext, "example.org", sender, default)


def run(home: Path, tmp_path: Path, data: bytes = MESSAGE, forwarder: Recorder | None = None,
        **kwargs) -> Report:
    with message_file(tmp_path, data) as msg:
        return deliver(job(home, **kwargs), msg, forwarder or Recorder(), hostname="mx.test",
                       now=NOW)


def new_files(maildir_path: Path) -> list[Path]:
    return sorted((maildir_path / "new").iterdir())


# --- envelope lines ------------------------------------------------------------------


def test_envelope_lines() -> None:
    lines = envelope_lines("joe-foo", "example.org", "a@b.example", NOW)
    assert (lines.dtline, lines.rpline, lines.ufline) == (DT.decode(), RP.decode(), UF.decode())
    bounce = envelope_lines("x", "y", "", 0.0)
    assert bounce.rpline == "Return-Path: <>\n"
    assert bounce.ufline == "From MAILER-DAEMON Thu Jan 01 00:00:00 1970\n"
    odd = envelope_lines("a\nb", "y", 'we ird"\t@x\ny', 0.0)
    assert odd.dtline == "Delivered-To: a_b@y\n"
    assert odd.rpline == 'Return-Path: <"we ird\\"\t"@x_y>\n'
    assert odd.ufline.startswith("From we-ird\"-@x-y Thu")


@pytest.mark.parametrize(
    ("address", "quoted"),
    [("a@b", "a@b"), ("", ""), ("a.b@c", "a.b@c"), (".a@c", '".a"@c'), ("a..b@c", '"a..b"@c'),
     ("a b@c", '"a b"@c'), ("@c", '""@c'), ("noat", "noat"), ("x@y@z", '"x@y"@z')],
)
def test_quote_address(address: str, quoted: str) -> None:
    assert quote_address(address) == quoted


def test_ctime_day_is_zero_padded() -> None:
    assert ctime_gmt(86400 * 3 + 3661) == "Sun Jan 04 01:01:01 1970"


# --- Maildir and default delivery ----------------------------------------------------


def test_default_delivery_to_maildir_exact_bytes(home: Path, tmp_path: Path) -> None:
    box = make_maildir(home / "Maildir")
    report = run(home, tmp_path, local="joe", dash="", ext="")
    assert report == Report(Verdict.SUCCESS, "did 1+0+0\n")
    [path] = new_files(box)
    assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+\.mx\.test", path.name)
    assert path.read_bytes() == RP + b"Delivered-To: joe@example.org\n" + MESSAGE
    assert list((box / "tmp").iterdir()) == []
    assert path.stat().st_mode & 0o777 == 0o600


def test_two_maildir_lines_to_same_maildir_get_distinct_names(home: Path, tmp_path: Path) -> None:
    box = make_maildir(home / "Maildir")
    write(home, ".qmail-foo", "./Maildir/\n" + str(box) + "/\n")
    assert run(home, tmp_path).text == "did 2+0+0\n"
    assert len(new_files(box)) == 2


def test_maildir_missing_is_temporary(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "./nobox/\n")
    assert run(home, tmp_path) == Report(
        Verdict.DEFERRAL, "Unable to chdir to maildir. (#4.2.1)\n"
    )


def test_maildir_without_tmp_is_temporary(home: Path, tmp_path: Path) -> None:
    (home / "box" / "new").mkdir(parents=True)
    with pytest.raises(maildir.MaildirError) as info:
        maildir.deliver(str(home / "box"), b"", io.BytesIO(b"x"), hostname="h")
    assert info.value.text == "Temporary error on maildir delivery. (#4.3.0)"


def test_maildir_hostname_is_made_safe() -> None:
    assert maildir.unique_name("a/b:c").endswith(".a\\057b\\072c")


def test_empty_dotqmail_uses_default_delivery(home: Path, tmp_path: Path) -> None:
    box = make_maildir(home / "Maildir")
    write(home, ".qmail-foo", "")
    assert run(home, tmp_path).text == "did 1+0+0\n"
    assert new_files(box)[0].read_bytes() == RP + DT + MESSAGE


def test_no_dotqmail_with_dash_bounces(home: Path, tmp_path: Path) -> None:
    make_maildir(home / "Maildir")
    assert run(home, tmp_path) == Report(
        Verdict.FAILURE, "Sorry, no mailbox here by that name. (#5.1.1)\n"
    )


def test_message_without_fileno_is_spooled(home: Path) -> None:
    box = make_maildir(home / "Maildir")
    report = deliver(job(home, local="joe", dash="", ext=""), io.BytesIO(MESSAGE), Recorder(),
                     hostname="h", now=NOW)
    assert report.kind is Verdict.SUCCESS
    assert new_files(box)[0].read_bytes().endswith(MESSAGE)


# --- mbox --------------------------------------------------------------------------


def test_mbox_exact_bytes_and_append(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "./mbox\n")
    data = b"Subject: x\n\nFrom me\n>From you\n>>From them\nFrom: not quoted? yes\nFromage\nend"
    assert run(home, tmp_path, data).text == "did 1+0+0\n"
    assert run(home, tmp_path, b"second\n").text == "did 1+0+0\n"
    expected_first = (
        UF + RP + DT
        + b"Subject: x\n\n>From me\n>>From you\n>>>From them\nFrom: not quoted? yes\nFromage\nend\n"
        + b"\n"
    )
    expected_second = UF + RP + DT + b"second\n\n"
    assert (home / "mbox").read_bytes() == expected_first + expected_second
    assert (home / "mbox").stat().st_mode & 0o777 == 0o600


def test_mbox_open_error_is_temporary(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "./no/such/dir/mbox\n")
    report = run(home, tmp_path)
    assert report.kind is Verdict.DEFERRAL
    assert report.text.startswith("Unable to open ./no/such/dir/mbox: ")
    assert report.text.endswith(". (#4.2.1)\n")


def test_mbox_lock_timeout(home: Path) -> None:
    path = home / "locked"
    path.write_bytes(b"old\n")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl,os,sys,time\n"
         "fd=os.open(sys.argv[1],os.O_RDWR)\n"
         "fcntl.lockf(fd,fcntl.LOCK_EX)\n"
         "print('locked',flush=True)\n"
         "time.sleep(10)\n", str(path)],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"  # readiness by pipe, not sleep
        with pytest.raises(mbox.MboxError) as info:
            mbox.deliver(str(path), "locked", b"H\n", io.BytesIO(b"m\n"), lock_timeout=0.3)
        assert info.value.text == "File has been locked for 30 seconds straight. (#4.3.0)"
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert path.read_bytes() == b"old\n"


class FailingReader(io.RawIOBase):
    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls == 1:
            return b"partial line\n"
        raise OSError(5, "Input/output error")


def test_mbox_truncated_back_on_read_error(home: Path) -> None:
    path = home / "mbox"
    path.write_bytes(b"old\n")
    with pytest.raises(mbox.MboxError) as info:
        mbox.deliver(str(path), "mbox", b"H\n" * 40000, FailingReader())
    assert info.value.text == "Unable to read message: Input/output error. (#4.3.0)"
    assert path.read_bytes() == b"old\n"


def reference_quote(data: bytes) -> bytes:
    out = []
    for line in data.splitlines(keepends=True):
        out.append(b">" + line if re.match(rb">*From ", line) else line)
    result = b"".join(out)
    if result and not result.endswith(b"\n"):
        result += b"\n"
    return result + b"\n"


class Chunked(io.RawIOBase):
    """Hands the message out in tiny reads, so quoting decisions span read boundaries."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size, self.pos = data, size, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        piece = self.data[self.pos:self.pos + self.size]
        self.pos += len(piece)
        return piece


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([b">", b"From ", b"F", b"rom", b"\n", b"x", b" ", b"Fro"]),
             max_size=30).map(b"".join),
    st.integers(min_value=1, max_value=7),
)
def test_from_quoting_matches_line_by_line_reference(data: bytes, size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mbox")
        mbox.deliver(path, "mbox", b"H\n", Chunked(data, size))  # type: ignore[arg-type]
        with open(path, "rb") as written:
            assert written.read() == b"H\n" + reference_quote(data)


# --- programs ----------------------------------------------------------------------


def test_program_environment_and_stdin(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-list-default",
          "|cat > got; cat /proc/self/environ > env; echo ran; pwd >&2\n")
    # The owner probe uses the whole (safe) extension, not the -default file's name.
    write(home, ".qmail-list-foo-bar-baz-owner", "&owner@x\n")
    report = run(home, tmp_path, local="joe-list-Foo-bar-baz", ext="list-Foo-bar-baz",
                 sender="a@b.example")
    assert report == Report(Verdict.SUCCESS, f"ran\n{home}\ndid 0+0+1\n")
    assert (home / "got").read_bytes() == MESSAGE  # no Return-Path / Delivered-To added
    env = dict(item.split("=", 1) for item in (home / "env").read_text().split("\0") if item)
    expected = {
        "HOST": "example.org", "HOME": str(home), "USER": "joe",
        "LOCAL": "joe-list-Foo-bar-baz", "RECIPIENT": "joe-list-Foo-bar-baz@example.org",
        "DTLINE": "Delivered-To: joe-list-Foo-bar-baz@example.org\n",
        "SENDER": "a@b.example", "RPLINE": RP.decode(), "UFLINE": UF.decode(),
        "EXT": "list-Foo-bar-baz", "EXT2": "Foo-bar-baz", "EXT3": "bar-baz", "EXT4": "baz",
        "HOST2": "example", "HOST3": "example", "HOST4": "example",
        "DEFAULT": "Foo-bar-baz", "NEWSENDER": "joe-list-Foo-bar-baz-owner@example.org",
    }
    assert {key: env.get(key) for key in expected} == expected


def test_program_env_without_default_and_deep_host(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "|cat /proc/self/environ > env\n")
    with message_file(tmp_path) as msg:
        report = deliver(
            LocalJob("joe", str(home), "joe-foo", "-", "foo", "a.b.c.d.e", "", "./Maildir/"),
            msg, Recorder(), base_env={"PATH": os.environ.get("PATH", "/bin"), "DEFAULT": "x"},
        )
    assert report.kind is Verdict.SUCCESS
    env = dict(item.split("=", 1) for item in (home / "env").read_text().split("\0") if item)
    assert "DEFAULT" not in env
    assert (env["HOST2"], env["HOST3"], env["HOST4"]) == ("a.b.c.d", "a.b.c", "a.b")
    assert (env["EXT2"], env["EXT3"], env["EXT4"]) == ("", "", "")
    assert (env["SENDER"], env["NEWSENDER"]) == ("", "")
    assert env["RPLINE"] == "Return-Path: <>\n"


@pytest.mark.parametrize(
    ("code", "kind"),
    [(100, Verdict.FAILURE), (64, Verdict.FAILURE), (112, Verdict.FAILURE),
     (111, Verdict.DEFERRAL), (1, Verdict.DEFERRAL), (75, Verdict.DEFERRAL)],
)
def test_program_exit_codes(home: Path, tmp_path: Path, code: int, kind: Verdict) -> None:
    box = make_maildir(home / "Maildir")
    recorder = Recorder()
    write(home, ".qmail-foo", f"&fwd@x\n|echo said {code}; exit {code}\n./Maildir/\n")
    assert run(home, tmp_path, forwarder=recorder) == Report(kind, f"said {code}\n")
    assert recorder.calls == []  # a failure ends delivery before forwarding
    assert new_files(box) == []


def test_program_killed_by_signal(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "|echo dying; kill -9 $$\n")
    assert run(home, tmp_path) == Report(
        Verdict.DEFERRAL, "dying\nAack, child crashed. (#4.3.0)\n"
    )


def test_exit_99_stops_but_forwards_still_go(home: Path, tmp_path: Path) -> None:
    box = make_maildir(home / "Maildir")
    recorder = Recorder()
    write(home, ".qmail-foo", "&one@x\n|cat > /dev/null; exit 99\n./Maildir/\n&two@x\n")
    assert run(home, tmp_path, forwarder=recorder) == Report(
        Verdict.SUCCESS, "did 0+1+1\nqp 4242\n"
    )
    assert new_files(box) == []
    assert recorder.calls == [("a@b.example", ("one@x",), DT, MESSAGE)]


def test_program_output_report_is_cut_to_3000_bytes(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "|head -c 100000 /dev/zero | tr '\\0' x; exit 100\n")
    report = run(home, tmp_path)
    assert report.kind is Verdict.FAILURE
    assert len(report.text) == 3000
    assert report.text.endswith("x\nError report too long, sorry.\n")


def test_program_sees_message_after_file_deliveries(home: Path, tmp_path: Path) -> None:
    make_maildir(home / "Maildir")
    big = b"Subject: big\n\n" + b"y" * 300_000 + b"\n"
    write(home, ".qmail-foo", "./Maildir/\n|cat > one\n./mbox\n|cat > two\n")
    assert run(home, tmp_path, big).text == "did 2+0+2\n"
    assert (home / "one").read_bytes() == big
    assert (home / "two").read_bytes() == big


# --- forwards ------------------------------------------------------------------------


def test_forwards_collected_and_sent_once_with_dtline(home: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    write(home, ".qmail-foo", "# list\n&a@x\nb@y\n")
    report = run(home, tmp_path, forwarder=recorder)
    assert report == Report(Verdict.SUCCESS, "did 0+2+0\nqp 4242\n")
    assert recorder.calls == [("a@b.example", ("a@x", "b@y"), DT, MESSAGE)]


def test_forward_sender_is_newsender_verp(home: Path, tmp_path: Path) -> None:
    recorder = Recorder((Verdict.SUCCESS, "", None))
    write(home, ".qmail-foo", "&a@x\n")
    write(home, ".qmail-foo-owner", "&owner@x\n")
    write(home, ".qmail-foo-owner-default", "&owner@x\n")
    assert run(home, tmp_path, forwarder=recorder).text == "did 0+1+0\n"
    assert recorder.calls[0][0] == "joe-foo-owner-@example.org-@[]"


@pytest.mark.parametrize(
    ("kind", "expected"), [(Verdict.DEFERRAL, Verdict.DEFERRAL),
                           (Verdict.FAILURE, Verdict.FAILURE)],
)
def test_forward_failure(home: Path, tmp_path: Path, kind: Verdict,
                         expected: Verdict) -> None:
    write(home, ".qmail-foo", "&a@x\n")
    recorder = Recorder((kind, "qq write error or disk full (#4.3.0)", None))
    assert run(home, tmp_path, forwarder=recorder) == Report(
        expected, "Unable to forward message: qq write error or disk full (#4.3.0).\n"
    )


# --- forward-only ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "text"),
    [("./Maildir/", "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n"),
     ("./mbox", "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n"),
     ("|true", "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)\n")],
)
def test_x_bit_forward_only(home: Path, tmp_path: Path, line: str, text: str) -> None:
    make_maildir(home / "Maildir")
    recorder = Recorder()
    write(home, ".qmail-foo", f"&a@x\n{line}\n", 0o700)
    assert run(home, tmp_path, forwarder=recorder) == Report(Verdict.DEFERRAL, text)
    assert recorder.calls == []


def test_x_bit_with_only_forwards_is_fine(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "&a@x\n# c\n", 0o700)
    assert run(home, tmp_path).text == "did 0+1+0\nqp 4242\n"


def test_plus_list_switches_to_forward_only(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "|echo before\n+list\n|echo after\n")
    assert run(home, tmp_path) == Report(
        Verdict.DEFERRAL,
        "before\nUh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)\n",
    )


# --- checks --------------------------------------------------------------------------


def test_loop_detection_is_permanent(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "|echo must not run\n")
    looped = b"Received: x\n" + DT + b"Subject: y\n\nbody\n"
    assert run(home, tmp_path, looped) == Report(
        Verdict.FAILURE,
        "This message is looping: it already has my Delivered-To line. (#5.4.6)\n",
    )


@pytest.mark.parametrize(
    "data",
    [b"Subject: y\n\n" + DT,  # in the body
     b"X: " + b"z" * 10000 + DT + b"\n",  # the tail of an over-long line
     b"Delivered-To: JOE-foo@example.org\n\n",  # not byte-identical
     DT[:-1]],  # no newline: not a complete line
)
def test_no_false_loops(home: Path, tmp_path: Path, data: bytes) -> None:
    write(home, ".qmail-foo", "|cat > /dev/null\n")
    assert run(home, tmp_path, data).kind is Verdict.SUCCESS


def test_writable_home(home: Path, tmp_path: Path) -> None:
    os.chmod(home, 0o703)
    assert run(home, tmp_path) == Report(
        Verdict.DEFERRAL, "Uh-oh: home directory is writable. (#4.7.0)\n"
    )


def test_sticky_home(home: Path, tmp_path: Path) -> None:
    os.chmod(home, 0o1700)
    assert run(home, tmp_path) == Report(
        Verdict.DEFERRAL,
        "Home directory is sticky: user is editing his .qmail file. (#4.2.1)\n",
    )


def test_missing_home(tmp_path: Path) -> None:
    report = run(tmp_path / "gone", tmp_path)
    assert report.kind is Verdict.DEFERRAL
    assert report.text.startswith(f"Unable to switch to {tmp_path / 'gone'}: ")


def test_writable_dotqmail(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "&a@x\n", 0o606)
    assert run(home, tmp_path) == Report(
        Verdict.DEFERRAL, "Uh-oh: .qmail file is writable. (#4.7.0)\n"
    )


def test_first_line_blank(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo", "\n&a@x\n")
    assert run(home, tmp_path) == Report(
        Verdict.DEFERRAL, "Uh-oh: first line of .qmail file is blank. (#4.2.1)\n"
    )


def test_default_chain_selects_most_specific(home: Path, tmp_path: Path) -> None:
    write(home, ".qmail-foo-default", "|echo foo-default $DEFAULT\n")
    write(home, ".qmail-default", "|echo default $DEFAULT\n")
    assert run(home, tmp_path, local="joe-foo-Bar", ext="foo-Bar").text == (
        "foo-default Bar\ndid 0+0+1\n"
    )
    assert run(home, tmp_path, local="joe-zap", ext="Zap").text == "default Zap\ndid 0+0+1\n"


def test_maildir_without_o_tmpfile_uses_a_tmp_name(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # NFS and old kernels have no O_TMPFILE: qmail's tmp/<name> -> new/<name> path, and
    # tmp/ is empty afterwards; with O_TMPFILE the file never has a tmp/ name at all
    box = make_maildir(home / "box")
    real_open = os.open

    def no_tmpfile(path, flags, *args, **kw):  # type: ignore[no-untyped-def]
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(maildir.os, "open", no_tmpfile)
    name = maildir.deliver(str(box), b"P: 1\n", io.BytesIO(b"body\n"), hostname="h")
    assert (box / "new" / name).read_bytes() == b"P: 1\nbody\n"
    assert list((box / "tmp").iterdir()) == []
    monkeypatch.undo()
    name2 = maildir.deliver(str(box), b"", io.BytesIO(b"two\n"), hostname="h")
    assert name2 != name and (box / "new" / name2).read_bytes() == b"two\n"
    assert list((box / "tmp").iterdir()) == []
