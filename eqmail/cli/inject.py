"""eqmail-inject: qmail-inject's command line (qmail-core §5.2).

Owns: option parsing (``-nNaAhH -f sender``, djb getopt rules), choosing envelope
recipients (args, header or both), streaming the message from stdin through the header
work in :mod:`eqmail.inject.headers` into a spool file, and handing it to the queue.

Privilege: runs as the invoking user; touches only stdin/stdout/stderr, a temporary
spool file, the instance's control values and (through ``submit``) the queue writer.
Inputs: argv, the environment, stdin; the instance root comes from ``$EQMAIL_ROOT``.
``--help`` and ``--version`` (words qmail's getopt refuses) print to stdout and exit 0.
Outputs: exit 0 (queued, or printed with -n); 100 with ``qmail-inject: fatal: ...`` for
usage or header syntax errors and permanent queue refusals; 111 for temporary trouble
(controls unreadable, read error, queue unavailable: ``qmail-inject: fatal: <qq text>``).

The body is never held in memory: after the header it is copied in chunks to a
SpooledTemporaryFile (on disk past 1 MiB), which is what ``submit`` reads.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from eqmail.errors import ControlErrors, ControlFileError
from eqmail.inject.headers import (
    Completion,
    Defaults,
    HeaderError,
    HeaderWork,
    envelope_arg,
    identity_from_env,
    read_header,
)
from eqmail.textio import decode, encode

CHUNK = 256 * 1024
SPOOL_IN_MEMORY = 1024 * 1024
MFT_MAX = 1024 * 1024  # QMAILMFTFILE is a short list of addresses
USAGE = b"qmail-inject: usage: qmail-inject [ -nNaAhH ] [ -fsender ] [ recip ... ]\n"
HELP = b"""usage: eqmail-inject [ -nNaAhH ] [ -f sender ] [ recip ... ]
       eqmail-inject --help | --version

qmail-inject for eqmail: read a message from standard input, complete its header
(From, Date, Message-ID; Bcc removed) and queue it.  The instance is $EQMAIL_ROOT.

  -a         recipients from the arguments only
  -h         recipients from the header only (To, Cc, Bcc, Apparently-To, Resent-*)
  -A         arguments if there are any, else the header (the default)
  -H         the arguments and the header
  -n         print the message instead of queueing it
  -N         queue the message (the default)
  -f sender  the envelope sender
  --help     show this help and exit
  --version  show the version and exit

Exit 0 queued; 100 permanent error; 111 temporary trouble.  See eqmail-inject(8).
"""


class SubmitAnswer(Protocol):
    """What the queue client answers (eqmail.queue.client.SubmitResult fits)."""

    @property
    def code(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def permanent(self) -> bool: ...


Submitter = Callable[[str, Sequence[str], BinaryIO], SubmitAnswer]


@dataclass
class Context:
    """Everything the inject/sendmail cores touch, so tests can supply their own."""

    root: Path
    stdin: BinaryIO
    stdout: BinaryIO
    stderr: BinaryIO
    env: MutableMapping[str, str]
    submit: Submitter
    controls: Callable[[], Defaults]  # control values, before QMAIL* env overrides
    clock: Callable[[], float] = time.time
    pid: int = field(default_factory=os.getpid)


class UsageError(Exception):
    pass


class LongOption(UsageError):
    """A ``--word`` where djb getopt expects option letters.  qmail's getopt refuses any
    such word, so ``--help`` and ``--version`` can mean what they mean elsewhere."""

    def __init__(self, word: str) -> None:
        super().__init__(word)
        self.word = word


def long_option(ctx: Context, word: str, help_text: bytes, usage: bytes, prog: str) -> int:
    """``--help`` (exit 0, on stdout), ``--version`` (exit 0), anything else: usage, 100."""
    if word == "--help":
        ctx.stdout.write(help_text)
    elif word == "--version":
        from eqmail import __version__

        ctx.stdout.write(f"{prog} (eqmail) {__version__}\n".encode())
    else:
        ctx.stderr.write(usage)
        return 100
    ctx.stdout.flush()
    return 0


class GetOpt:
    """djb's getopt, lazily: iterating yields (letter, argument); afterwards
    :attr:`operands` holds what follows ``--`` or the first non-option.  A letter in
    ``swallow`` ignores the rest of its word.  UsageError is raised at the first unknown
    letter or missing argument, so callers have acted on the options before it (as
    sendmail does with -bp)."""

    def __init__(self, args: Sequence[str], spec: str, swallow: str = "") -> None:
        self.args, self.spec, self.swallow = list(args), spec, swallow
        self.operands: list[str] = []

    def __iter__(self) -> Iterator[tuple[str, str]]:
        args, i = self.args, 0
        while i < len(args) and args[i].startswith("-") and args[i] != "-":
            word = args[i]
            i += 1
            if word == "--":
                break
            if word.startswith("--"):
                raise LongOption(word)
            pos = 1
            while pos < len(word):
                letter = word[pos]
                pos += 1
                at = self.spec.find(letter)
                if at < 0 or letter == ":":
                    raise UsageError(letter)
                if self.spec[at + 1 : at + 2] == ":":
                    if pos < len(word):
                        yield letter, word[pos:]
                    elif i < len(args):
                        yield letter, args[i]
                        i += 1
                    else:
                        raise UsageError(letter)
                    break
                yield letter, ""
                if letter in self.swallow:
                    break
        self.operands = args[i:]


@dataclass
class Options:
    strategy: str = "default"  # default | args | header | both
    queue: bool = True
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)


def parse_options(argv: Sequence[str]) -> Options:
    opts = Options()
    parser = GetOpt(argv, "aAhHnNf:")
    for letter, arg in parser:
        if letter == "f":
            opts.sender = arg
        elif letter in "nN":
            opts.queue = letter == "N"
        else:
            opts.strategy = {"a": "args", "A": "default", "h": "header", "H": "both"}[letter]
    opts.recipients = parser.operands
    if opts.strategy == "default":
        opts.strategy = "args" if opts.recipients else "header"
    return opts


def _env_bytes(env: Mapping[str, str]) -> dict[str, bytes]:
    return {k: encode(v) for k, v in env.items()}


def _defaults(base: Defaults, env: Mapping[str, bytes]) -> Defaults:
    """QMAILDEFAULTDOMAIN, QMAILDEFAULTHOST, QMAILPLUSDOMAIN, QMAILIDHOST beat control/."""
    return Defaults(
        defaultdomain=env.get("QMAILDEFAULTDOMAIN", base.defaultdomain),
        defaulthost=env.get("QMAILDEFAULTHOST", base.defaulthost),
        plusdomain=env.get("QMAILPLUSDOMAIN", base.plusdomain),
        idhost=env.get("QMAILIDHOST", base.idhost),
    )


def _mft_list(env: Mapping[str, str]) -> frozenset[bytes]:
    """QMAILMFTFILE: addresses, one a line; a missing file means no Mail-Followup-To."""
    path = env.get("QMAILMFTFILE")
    if not path:
        return frozenset()
    try:
        with open(path, "rb") as f:
            data = f.read(MFT_MAX)
    except FileNotFoundError:
        return frozenset()
    lines = (ln.rstrip(b" \t\r") for ln in data.split(b"\n"))
    return frozenset(ln for ln in lines if ln and not ln.startswith(b"#"))


def _copy_body(ctx: Context, prefix: bytes, out: BinaryIO) -> None:
    """Copy the body, adding the final newline headerbody() adds to a last line."""
    last = prefix[-1:]
    out.write(prefix)
    while chunk := ctx.stdin.read(CHUNK):
        out.write(chunk)
        last = chunk[-1:]
    if last and last != b"\n":
        out.write(b"\n")


def _fatal(ctx: Context, text: bytes, code: int) -> int:
    ctx.stderr.write(b"qmail-inject: fatal: " + text + (b"" if text.endswith(b"\n") else b"\n"))
    ctx.stderr.flush()
    return code


def inject(argv: Sequence[str], ctx: Context) -> int:
    """qmail-inject's main: returns the exit code."""
    try:
        opts = parse_options(list(argv))
    except LongOption as e:
        return long_option(ctx, e.word, HELP, USAGE, "eqmail-inject")
    except UsageError:
        ctx.stderr.write(USAGE)
        return 100
    env = _env_bytes(ctx.env)
    try:
        complete = Completion(_defaults(ctx.controls(), env))
        ident = identity_from_env(env, _mft_list(ctx.env))
    except HeaderError as e:
        return _fatal(ctx, e.text, 100)
    except (OSError, ControlErrors, ControlFileError) as e:
        return _fatal(ctx, b"unable to read controls: " + str(e).encode(), 111)
    try:
        sender = None if opts.sender is None else envelope_arg(encode(opts.sender), complete, sender=True)
        work = HeaderWork(complete, ident, sender)
        recipients: list[bytes] = []
        if opts.strategy != "header":
            recipients = [envelope_arg(encode(r), complete, sender=False) for r in opts.recipients]
        block = read_header(ctx.stdin)
        for fld in block.fields:
            work.field(fld)
        header = work.finish(ctx.clock(), ctx.pid, show_return_path=not opts.queue)
    except HeaderError as e:
        return _fatal(ctx, e.text, 100)
    except OSError:
        return _fatal(ctx, b"read error", 111)
    if opts.strategy != "args":
        recipients += work.header_recipients()
    if not opts.queue:
        return _print(ctx, header, block.body_prefix)
    return _queue(ctx, decode(work.sender or b""), [decode(r) for r in recipients], header, block.body_prefix)


def _print(ctx: Context, header: bytes, body_prefix: bytes) -> int:
    try:
        ctx.stdout.write(header)
        _copy_body(ctx, body_prefix, ctx.stdout)
        ctx.stdout.flush()
    except OSError:
        return _fatal(ctx, b"write error", 111)
    return 0


def _queue(ctx: Context, sender: str, recipients: list[str], header: bytes, body_prefix: bytes) -> int:
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        try:
            spool.write(header)
            _copy_body(ctx, body_prefix, spool)  # type: ignore[arg-type]
            spool.seek(0)
        except OSError:
            return _fatal(ctx, b"read error", 111)
        result = ctx.submit(sender, recipients, spool)  # type: ignore[arg-type]
    if result.code == 0:
        return 0
    return _fatal(ctx, result.text.encode(), 100 if result.permanent else 111)


def default_context(env: MutableMapping[str, str] | None = None) -> Context:
    """The real wiring: root from $EQMAIL_ROOT, controls from control/, the queue writer."""
    from eqmail.instance import resolve_root

    root = resolve_root(None)

    def submit(sender: str, recipients: Sequence[str], message: BinaryIO) -> SubmitAnswer:
        from eqmail.queue.client import submit as client_submit

        return client_submit(root, sender, recipients, message)

    def controls() -> Defaults:
        from eqmail.control import load_inject_controls

        c = load_inject_controls(root)
        return Defaults(encode(c.defaultdomain), encode(c.defaulthost), encode(c.plusdomain), encode(c.idhost))

    return Context(root, sys.stdin.buffer, sys.stdout.buffer, sys.stderr.buffer,
                   os.environ if env is None else env, submit, controls)


def main(argv: list[str] | None = None) -> int:
    return inject(sys.argv[1:] if argv is None else argv, default_context())


if __name__ == "__main__":
    sys.exit(main())
