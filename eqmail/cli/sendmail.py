"""eqmail-sendmail: qmail's sendmail wrapper (qmail-core §5.3).

Owns: the sendmail option set (getopt ``vimte:f:p:o:B:F:EJxb:``) and its mapping onto
qmail-inject: ``-t`` -> ``-H`` else ``-a``; ``-f s`` -> ``-f s`` plus QMAILUSER/QMAILHOST
from ``s`` after unsetting QMAILNAME/MAILNAME/NAME/QMAILHOST/MAILHOST (so ``-F`` is lost
with ``-f``, as in qmail); ``-F name`` -> MAILNAME; ``-bp`` and the name ``mailq`` list the
queue; ``-bs`` runs an SMTP session on stdin/stdout when eqmail.cli.smtpstdio exists;
``newaliases`` is refused.  Ignored: ``-i -v -x -m -e* -o* -B* -p* -E -J``.

Privilege: the invoking user's.  Runs qmail-inject's core in-process (an interpreter
start costs ~80 ms here); edits its own environment as qmail's sendmail does before exec.
Inputs: argv (argv[0]'s basename picks mailq/newaliases), environment, stdin.
``--help`` / ``--version`` print to stdout and exit 0.
Outputs/failure modes: qmail-inject's exit codes; 100 with a usage line for an unknown
option or ``-b`` mode; 111 when the queue cannot be read for ``-bp``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path

from eqmail.cli.inject import (
    Context,
    GetOpt,
    LongOption,
    UsageError,
    default_context,
    inject,
    long_option,
)

USAGE = b"sendmail: usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]\n"
OPTSPEC = "vimte:f:p:o:B:F:EJxb:"
HELP = b"""usage: eqmail-sendmail [ -t ] [ -f sender ] [ -F name ] [ -bp | -bs | -bm ] [ recip ... ]
       eqmail-sendmail --help | --version

qmail's sendmail wrapper for eqmail: queue the message on standard input through
eqmail-inject.  The instance is $EQMAIL_ROOT.  Called as mailq it lists the queue.

  -t         recipients from the header (To, Cc, Bcc), as well as the arguments
  -f sender  the envelope sender (and the From: address; -F is then dropped)
  -F name    the sender's full name in From:
  -bp        list the queue (mailq, qmail-qread's format)
  -bs        an SMTP session on standard input and output
  -bm        read a message and queue it (the default)
  -i -oi -v -x -m -e* -o* -B* -p* -E -J   accepted and ignored
  --help     show this help and exit
  --version  show the version and exit

Exit codes are eqmail-inject's: 0 queued, 100 permanent, 111 temporary.
See eqmail-sendmail(8).
"""

StdioRunner = Callable[[Path], int]

# What qmail's sendmail puts in the environment for -bs unless PROTO is already set:
# the session looks like a trusted local TCP client allowed to relay.
BS_ENVIRONMENT = {
    "RELAYCLIENT": "",
    "DATABYTES": "0",
    "PROTO": "TCP",
    "TCPLOCALIP": "127.0.0.1",
    "TCPLOCALHOST": "localhost",
    "TCPREMOTEIP": "127.0.0.1",
    "TCPREMOTEHOST": "localhost",
    "TCPREMOTEINFO": "sendmail-bs",
}


def find_stdio_runner() -> StdioRunner | None:
    """eqmail.cli.smtpstdio.run_stdio, once the SMTP side provides it."""
    try:
        module = importlib.import_module("eqmail.cli.smtpstdio")
    except ModuleNotFoundError as e:
        if e.name != "eqmail.cli.smtpstdio":
            raise  # the module exists but is broken: say so loudly
        return None
    runner: StdioRunner | None = getattr(module, "run_stdio", None)
    return runner


def sender_environment(env: MutableMapping[str, str], sender: str) -> None:
    """qmail's do_sender: the From: identity follows -f; any name given is dropped."""
    for name in ("QMAILNAME", "MAILNAME", "NAME", "QMAILHOST", "MAILHOST"):
        env.pop(name, None)
    box, at, host = sender.rpartition("@")
    if not at:
        env["QMAILUSER"] = sender
        return
    env["QMAILHOST"] = host
    env["QMAILUSER"] = box


def _fatal(ctx: Context, text: str, code: int) -> int:
    ctx.stderr.write(f"sendmail: fatal: {text}\n".encode())
    ctx.stderr.flush()
    return code


def _mailq(ctx: Context) -> int:
    from eqmail.queue.inspect import qread

    try:
        listing = qread(ctx.root)
    except OSError as e:
        return _fatal(ctx, f"unable to read the queue: {e}", 111)
    ctx.stdout.write(listing.encode("ascii", "replace"))
    ctx.stdout.flush()
    return 0


def _smtp_stdio(ctx: Context, find: Callable[[], StdioRunner | None]) -> int:
    runner = find()
    if runner is None:
        return _fatal(ctx, "-bs is not supported yet", 100)
    if "PROTO" not in ctx.env:
        ctx.env.update(BS_ENVIRONMENT)
    return runner(ctx.root)


def sendmail(prog: str, args: Sequence[str], ctx: Context,
             find_stdio: Callable[[], StdioRunner | None] = find_stdio_runner) -> int:
    """sendmail's main: ``prog`` is argv[0], ``args`` the rest.  Returns the exit code."""
    header_recipients = False
    sender: str | None = None
    parser = GetOpt(args, OPTSPEC, swallow="EJ")
    try:
        for letter, arg in parser:
            if letter == "t":
                header_recipients = True
            elif letter == "f":
                sender = arg
            elif letter == "F":
                ctx.env["MAILNAME"] = arg
            elif letter == "b":
                mode = arg[:1]
                if mode == "p":
                    return _mailq(ctx)
                if mode == "s":
                    return _smtp_stdio(ctx, find_stdio)
                if mode != "m":
                    raise UsageError("b")
            # v i m x e o p B E J: accepted and ignored, as qmail does
    except LongOption as e:
        return long_option(ctx, e.word, HELP, USAGE, "eqmail-sendmail")
    except UsageError:
        ctx.stderr.write(USAGE)
        return 100
    name = os.path.basename(prog)
    if name == "mailq":
        return _mailq(ctx)
    if name == "newaliases":
        return _fatal(ctx, "please use fastforward/newaliases instead", 100)
    inject_argv = ["-H" if header_recipients else "-a"]
    if sender is not None:
        inject_argv += ["-f", sender]
        sender_environment(ctx.env, sender)
    return inject([*inject_argv, "--", *parser.operands], ctx)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    # The real environment, edited in place as qmail's sendmail does before its exec:
    # -F/-f only affect this process, and a -bs session sees the variables it sets.
    return sendmail(argv[0] if argv else "sendmail", argv[1:], default_context())

if __name__ == "__main__":
    sys.exit(main())
