"""qmail-local as a library: deliver one message to one local recipient.

What it owns (qmail-core.md §3.4): the home directory checks, the Delivered-To loop
check, the environment given to programs, choosing the .qmail file (via
:mod:`eqmail.delivery.dotqmail`), running its lines in order -- Maildir and mbox at once,
``|program`` through ``/bin/sh -c`` in the home directory (in its own process group,
killed as a whole after control/timeoutprogram seconds: a deferral), forwards collected and queued
once at the end through the caller's ``forwarder`` -- and the report qmail-lspawn would
send back: a Verdict (qmail's K/Z/D) and text (program output, then ``did F+W+P`` and
``qp N``, or the failure text), cut to 3000 bytes as qmail-lspawn does.

Privilege: runs in a process that ALREADY has the recipient's uid and gid; it never
changes them.  It does not chdir or change the umask of its process: paths from .qmail
are joined to the home directory, and programs get ``cwd=home`` and umask 077.

Inputs: a :class:`LocalJob` (qmail-local's argv), the message as a seekable binary file
(a copy is spooled to a temporary file if it has no seekable descriptor), a
:data:`Forwarder`.  The message's file position is unspecified afterwards.

Outputs / failures: always a :class:`Report`, never an exception for a delivery problem:
temporary (``Z``) for anything that may succeed later, permanent (``D``) only where qmail
bounces -- loop detected, no such mailbox, program exit 100/64/65/70/76/77/78/112, a
permanent queue failure while forwarding.  A bug (any other exception) propagates to the
calling worker, whose boundary turns it into a deferral.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from eqmail import textio
from eqmail.delivery import dotqmail, maildir, mbox
from eqmail.delivery.dotqmail import Forward, ForwardOnly, Instruction, Maildir, Mbox, Program
from eqmail.errors import ControlFileError
from eqmail.ipc.delivery import Verdict


@dataclass(frozen=True)
class Report:
    kind: Verdict
    text: str  # exactly what qmail-local prints: every line ends with "\n"


@dataclass(frozen=True)
class LocalJob:
    user: str
    home: str
    local: str
    dash: str
    ext: str
    domain: str
    sender: str
    default_delivery: str  # .qmail text used when there is none, e.g. "./Maildir/"


#: (newsender, recipients, Delivered-To line, message at offset 0) -> (kind, text, qp)
Forwarder = Callable[[str, Sequence[str], bytes, BinaryIO], tuple[Verdict, str, int | None]]

REPORT_LIMIT = 3000
TOO_LONG = b"\nError report too long, sorry.\n"
#: Program exit codes that bounce (sysexits usage/data/software/protocol/perm/config).
PERMANENT_EXIT_CODES = frozenset({100, 64, 65, 70, 76, 77, 78, 112})
EXIT_STOP = 99  # success, and skip the rest of the .qmail file
CHUNK = 65536
DEFAULT_PROGRAM_LIMIT = 1000.0  # control/timeoutprogram's default (Postfix's command_time_limit)
KILL_GRACE = 2.0  # SIGTERM to SIGKILL, once a program is over its time limit
OUTPUT_GRACE = 1.0  # output still read after the program exited (a background child's)
_LINE_LIMIT = 8192

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Characters qmail's quote() leaves unquoted in a local part (RFC 822 atom + dot).
_ATOM = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~."
)


class _Failure(Exception):
    """Ends the delivery (qmail-local's exit 111 or 100)."""

    def __init__(self, kind: Verdict, text: str = "") -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


def _temporary(text: str) -> _Failure:
    return _Failure(Verdict.DEFERRAL, text)


class _Output:
    """Everything qmail-local and its programs print, kept to what the report can hold."""

    def __init__(self) -> None:
        self._data = bytearray()

    def write(self, data: bytes) -> None:
        room = REPORT_LIMIT + 1 - len(self._data)  # one byte over marks "too long"
        if room > 0:
            self._data += data[:room]

    def render(self) -> str:
        data = bytes(self._data).split(b"\0", 1)[0]  # qmail-lspawn stops at a NUL
        if len(data) > REPORT_LIMIT:
            data = data[: REPORT_LIMIT - len(TOO_LONG)] + TOO_LONG
        return textio.decode(data)


class _Message:
    """The message as a descriptor that every instruction re-reads from offset 0."""

    def __init__(self, message: BinaryIO) -> None:
        self._spool: BinaryIO | None = None
        try:
            fd = message.fileno()
            os.lseek(fd, 0, os.SEEK_SET)
        except (OSError, ValueError, AttributeError):
            # No seekable descriptor (a pipe, BytesIO): children need one, so copy it.
            try:
                self._spool = _spool(message)
            except OSError as exc:
                raise _temporary(f"Unable to read message: {exc.strerror}. (#4.3.0)") from exc
            fd = self._spool.fileno()
        self.fd = fd

    def rewound_fd(self) -> int:
        os.lseek(self.fd, 0, os.SEEK_SET)
        return self.fd

    @contextmanager
    def reader(self) -> Iterator[BinaryIO]:
        """A fresh file object at offset 0 (a stale buffer could hide a child's reads)."""
        dup = os.dup(self.rewound_fd())
        with os.fdopen(dup, "rb") as handle:
            yield handle

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()


def _spool(message: BinaryIO) -> BinaryIO:
    try:
        message.seek(0)
    except OSError:
        pass  # a pipe: what is left to read is the message
    spool = tempfile.TemporaryFile()
    while chunk := message.read(CHUNK):
        spool.write(chunk)
    spool.flush()
    return spool


def quote_address(address: str) -> str:
    """RFC 822 form of an envelope address, quoting the local part only when needed."""
    if not address:
        return address
    at = address.rfind("@")
    local, rest = (address, "") if at < 0 else (address[:at], address[at:])
    plain = (
        local
        and all(ch in _ATOM for ch in local)
        and not local.startswith(".")
        and not local.endswith(".")
        and ".." not in local
    )
    if plain:
        return address
    escaped = "".join("\\" + ch if ch in '\r\n"\\' else ch for ch in local)
    return f'"{escaped}"{rest}'


def ctime_gmt(when: float) -> str:
    """``Www Mmm DD HH:MM:SS YYYY`` in GMT, day zero-padded as qmail's myctime."""
    tm = time.gmtime(when)
    return (f"{_DAYS[tm.tm_wday]} {_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:02d} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {tm.tm_year}")


@dataclass(frozen=True)
class EnvelopeLines:
    dtline: str  # "Delivered-To: local@domain\n"
    rpline: str  # "Return-Path: <sender>\n"
    ufline: str  # "From sender ctime\n"


_FROM_BLANKS = {ord(" "): "-", ord("\t"): "-", ord("\n"): "-"}  # qmail-local's From_ line


def envelope_lines(local: str, domain: str, sender: str, when: float) -> EnvelopeLines:
    """The three lines qmail-local prepends; newlines inside become ``_``."""
    dtline = f"Delivered-To: {local}@{domain}".replace("\n", "_") + "\n"
    rpline = f"Return-Path: <{quote_address(sender)}".replace("\n", "_") + ">\n"
    if sender:
        from_ = sender.translate(_FROM_BLANKS)
    else:
        from_ = "MAILER-DAEMON"
    ufline = f"From {from_} {ctime_gmt(when)}\n"
    return EnvelopeLines(dtline, rpline, ufline)


def _after_dashes(ext: str) -> list[str]:
    """EXT2..EXT4: ext after the 1st, 2nd, 3rd ``-`` (empty when there are fewer)."""
    values = []
    rest = ext
    for _ in range(3):
        dash = rest.find("-")
        rest = "" if dash < 0 else rest[dash + 1:]
        values.append(rest)
    return values


def _before_dots(domain: str) -> list[str]:
    """HOST2..HOST4: domain before the last, 2nd-last, 3rd-last ``.`` (unchanged if none)."""
    values = []
    rest = domain
    for _ in range(3):
        dot = rest.rfind(".")
        rest = rest if dot < 0 else rest[:dot]
        values.append(rest)
    return values


def build_environment(
    job: LocalJob,
    lines: EnvelopeLines,
    default: str | None,
    newsender: str,
    base: Mapping[str, str],
) -> dict[str, str]:
    """The environment of ``|program`` lines: ``base`` plus qmail-local's variables."""
    env = dict(base)
    env.pop("DEFAULT", None)  # set only when a -default file was used
    ext2, ext3, ext4 = _after_dashes(job.ext)
    host2, host3, host4 = _before_dots(job.domain)
    ours = {
        "HOST": job.domain, "HOME": job.home, "USER": job.user, "LOCAL": job.local,
        "RECIPIENT": f"{job.local}@{job.domain}", "DTLINE": lines.dtline,
        "SENDER": job.sender, "RPLINE": lines.rpline, "UFLINE": lines.ufline,
        "EXT": job.ext, "EXT2": ext2, "EXT3": ext3, "EXT4": ext4,
        "HOST2": host2, "HOST3": host3, "HOST4": host4, "NEWSENDER": newsender,
    }
    if default is not None:
        ours["DEFAULT"] = default
    for name, value in ours.items():
        env[name] = value.split("\0", 1)[0]  # C strings end at a NUL, as in qmail
    return env


def _check_home(home: str) -> None:
    if not home.startswith("/"):
        raise _temporary(f"Unable to switch to {home}: not an absolute path. (#4.3.0)")
    try:
        st = os.stat(home)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if not os.access(home, os.X_OK):  # qmail-local would fail to chdir there
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise _temporary(f"Unable to switch to {home}: {exc.strerror}. (#4.3.0)") from exc
    if st.st_mode & dotqmail.PATRN:
        raise _temporary("Uh-oh: home directory is writable. (#4.7.0)")
    if st.st_mode & 0o1000:
        raise _temporary("Home directory is sticky: user is editing his .qmail file. (#4.2.1)")


def _check_loop(message: _Message, dtline: bytes) -> None:
    """Bounce if a header line is byte-identical to our Delivered-To line."""
    try:
        with message.reader() as handle:
            at_line_start = True
            while piece := handle.readline(_LINE_LIMIT):
                complete = piece.endswith(b"\n")
                if at_line_start:
                    if piece == b"\n":
                        return  # end of header
                    if complete and piece == dtline:
                        raise _Failure(
                            Verdict.FAILURE,
                            "This message is looping: it already has my Delivered-To line. "
                            "(#5.4.6)",
                        )
                at_line_start = complete  # the rest of an over-long line is not a line
    except OSError as exc:
        raise _temporary(f"Unable to read message: {exc.strerror}. (#4.3.0)") from exc


@dataclass
class _Plan:
    instructions: list[Instruction]
    forward_only: bool
    default: str | None
    newsender: str


def _plan(job: LocalJob) -> _Plan:
    """Choose the .qmail file (or the default delivery) and compute NEWSENDER."""
    try:
        found = dotqmail.find(job.home, job.dash, job.ext)
        newsender = dotqmail.new_sender(
            job.home, job.local, job.domain, job.dash, job.ext, job.sender
        )
    except dotqmail.NoMailbox as exc:
        # The same rule decides the SMTP listener's RCPT check (eqmail.delivery.mailbox).
        raise _Failure(Verdict.FAILURE, exc.text) from exc
    except dotqmail.DotQmailError as exc:
        raise _temporary(exc.text) from exc
    default = found.default if found is not None else None
    if found is None or not found.data:
        # No file for the user's own address, or an empty one: the default delivery,
        # which is never forward-only.
        text: bytes | str = job.default_delivery
        name, forward_only = "defaultdelivery", False
    else:
        text, name, forward_only = found.data, found.name, found.forward_only
    try:
        instructions = dotqmail.parse(text, name)
    except ControlFileError as exc:
        raise _temporary("Uh-oh: first line of .qmail file is blank. (#4.2.1)") from exc
    return _Plan(instructions, forward_only, default, newsender)


def _run_program(
    command: str, message: _Message, env: dict[str, str], home: str, out: _Output,
    limit: float,
) -> bool:
    """Run one ``|command``; True if it asked to stop (exit 99).

    The program gets its own process group (a new session), so that when it runs
    longer than ``limit`` seconds (control/timeoutprogram, Postfix's command_time_limit)
    the whole group goes -- grandchildren included, also those that ignore SIGTERM or
    let go of the output pipe -- and the delivery is deferred.  Its exit status decides
    the result as in qmail-local; output is collected until the pipe closes, but no
    longer than OUTPUT_GRACE after the program exited, so a background child that keeps
    the pipe open cannot hold the delivery.
    """
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],  # the user's own command line, run by their shell
            stdin=message.rewound_fd(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=home,
            env=env,
            umask=0o077,
            close_fds=True,
            restore_signals=True,  # SIGPIPE back to default, as qmail-local's child
            start_new_session=True,  # its own process group: the time limit kills all of it
        )
    except OSError as exc:
        raise _temporary(f"Unable to run /bin/sh: {exc.strerror}. (#4.3.0)") from exc
    assert proc.stdout is not None
    with proc.stdout:
        status = _collect(proc, out, time.monotonic() + limit)
    if status is None:
        _kill_group(proc)
        raise _temporary(f"Timeout: program ran longer than {limit:g} seconds. (#4.3.0)")
    if status < 0:
        raise _temporary("Aack, child crashed. (#4.3.0)")
    if status in PERMANENT_EXIT_CODES:
        raise _Failure(Verdict.FAILURE)
    if status == EXIT_STOP:
        return True
    if status != 0:
        raise _Failure(Verdict.DEFERRAL)
    return False


def _collect(proc: subprocess.Popen[bytes], out: _Output, deadline: float) -> int | None:
    """Read the program's output until it exited and the pipe closed (or OUTPUT_GRACE
    after its exit); its exit status, or None when ``deadline`` passed first.  Reading
    all the time means the program never blocks on a full pipe; _Output keeps the start."""
    assert proc.stdout is not None
    pipe = proc.stdout.fileno()
    pidfd = os.pidfd_open(proc.pid)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(pipe, selectors.EVENT_READ, "pipe")
            sel.register(pidfd, selectors.EVENT_READ, "exit")
            status: int | None = None
            while True:
                now = time.monotonic()
                if status is None and now >= deadline:
                    return None
                if status is not None and (now >= deadline or not sel.get_map()):
                    return status
                for key, _ in sel.select(deadline - now):
                    if key.data == "exit":
                        sel.unregister(pidfd)
                        status = proc.wait()
                        deadline = min(deadline, time.monotonic() + OUTPUT_GRACE)
                    elif chunk := os.read(pipe, CHUNK):
                        out.write(chunk)
                    else:
                        sel.unregister(pipe)
    finally:
        os.close(pidfd)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the program's process group, SIGKILL to what is left after KILL_GRACE.
    The shell is reaped only after both: while it is unreaped its pid, which is the
    group's id, cannot be given to another process, so the signals reach only the
    program's own group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    end = time.monotonic() + KILL_GRACE
    while time.monotonic() < end and _group_running(proc.pid):
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies aside), from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _deliver_file(path: str, is_maildir: bool, job: LocalJob, message: _Message,
                  lines: EnvelopeLines, hostname: str | None) -> None:
    target = os.path.join(job.home, path)  # relative lines are relative to home
    try:
        with message.reader() as handle:
            if is_maildir:
                prefix = textio.encode(lines.rpline + lines.dtline)
                maildir.deliver(target, prefix, handle, hostname=hostname)
            else:
                header = textio.encode(lines.ufline + lines.rpline + lines.dtline)
                mbox.deliver(target, path, header, handle)
    except (maildir.MaildirError, mbox.MboxError) as exc:
        raise _temporary(exc.text) from exc
    except OSError as exc:  # rewinding the message
        raise _temporary("Unable to rewind message. (#4.3.0)") from exc


@dataclass
class _Counts:
    files: int = 0
    forwards: int = 0
    programs: int = 0


def _execute(job: LocalJob, plan: _Plan, message: _Message, lines: EnvelopeLines,
             env: dict[str, str], out: _Output, hostname: str | None,
             program_limit: float) -> tuple[_Counts, list[str]]:
    """Run the lines top to bottom; return the counts and the collected forwards."""
    counts = _Counts()
    recipients: list[str] = []
    forward_only = plan.forward_only
    for ins in plan.instructions:
        if isinstance(ins, ForwardOnly):
            forward_only = True
        elif isinstance(ins, Forward):
            counts.forwards += 1
            recipients.append(ins.address)
        elif isinstance(ins, Maildir | Mbox):
            counts.files += 1
            if forward_only:
                raise _temporary("Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)")
            _deliver_file(ins.path, isinstance(ins, Maildir), job, message, lines, hostname)
        elif isinstance(ins, Program):
            counts.programs += 1
            if forward_only:
                raise _temporary("Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)")
            if _run_program(ins.command, message, env, job.home, out, program_limit):
                break  # exit 99: later lines are skipped, collected forwards still go
    return counts, recipients


def _forward(forwarder: Forwarder, newsender: str, recipients: list[str],
             dtline: str, message: _Message) -> int | None:
    """Queue one copy for all forward lines; return qmail-queue's "qp"."""
    try:
        with message.reader() as handle:
            kind, text, qp = forwarder(newsender, tuple(recipients), textio.encode(dtline), handle)
    except OSError as exc:
        raise _temporary(f"Unable to forward message: {exc.strerror or exc}.") from exc
    if kind is Verdict.SUCCESS:
        return qp
    failed = Verdict.FAILURE if kind is Verdict.FAILURE else Verdict.DEFERRAL
    raise _Failure(failed, f"Unable to forward message: {text}.")


def deliver(
    job: LocalJob,
    message: BinaryIO,
    forwarder: Forwarder,
    *,
    hostname: str | None = None,
    base_env: Mapping[str, str] | None = None,
    now: float | None = None,
    program_limit: float = DEFAULT_PROGRAM_LIMIT,
) -> Report:
    """Deliver ``message`` to ``job``'s recipient as qmail-local would; see module doc.

    ``base_env`` is the environment programs inherit (default: this process's, as
    qmail-local inherits qmail-start's); ``now`` fixes the UFLINE time (tests);
    ``program_limit`` is control/timeoutprogram: seconds one ``|program`` may run.
    """
    out = _Output()
    msg: _Message | None = None
    try:
        _check_home(job.home)
        lines = envelope_lines(job.local, job.domain, job.sender,
                               time.time() if now is None else now)
        msg = _Message(message)
        _check_loop(msg, textio.encode(lines.dtline))
        plan = _plan(job)
        env = build_environment(job, lines, plan.default, plan.newsender,
                                os.environ if base_env is None else base_env)
        counts, recipients = _execute(job, plan, msg, lines, env, out, hostname,
                                      program_limit)
        qp = None
        if recipients:
            qp = _forward(forwarder, plan.newsender, recipients, lines.dtline, msg)
    except _Failure as failure:
        if failure.text:
            out.write(textio.encode(failure.text + "\n"))
        return Report(failure.kind, out.render())
    finally:
        if msg is not None:
            msg.close()
    out.write(f"did {counts.files}+{counts.forwards}+{counts.programs}\n".encode())
    if qp:
        out.write(f"qp {qp}\n".encode())
    return Report(Verdict.SUCCESS, out.render())
