"""qmail-spp plugins cannot break the reply stream or the message (issue 12, item 12).

Real plugin scripts run by the plugin sandbox of a live instance; a byte-exact client
sends each command together with a HELP and reads up to the HELP's ``214``, so a
second reply to the command (or a half reply) shows in the bytes it got.  What a plugin
prints is chosen by the HELO name / the sender, so one instance serves every case.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import ME, Instance  # noqa: E402
from live_smtp import RawClient  # noqa: E402

MARK = b"214 netqmail home page: http://qmail.org/netqmail\r\n"  # HELP's reply
FAILED = "451 qmail-spp failure: plugins/{}: {} (#4.3.0)\r\n"

# The [helo] plugin: what it prints depends on the HELO name.
HELO_PLUGIN = r"""#!/bin/sh
case "$SMTPHELOHOST" in
  complete) echo 'P250 plugin says ok' ;;
  smuggle)  printf 'P250 ok\r\n250 second reply\n' ;;
  twolines) printf 'P250-first\nP250 finished\n' ;;
  coded)    echo 'P553-wrong code' ;;
  cont)     echo 'P250-plugin line' ;;
  reject)   printf 'P553-one\nE553 two\n' ;;
  rejectcr) printf 'E553 no\r\n250 ok\n' ;;
  bye)      printf 'P421 bye\nD\n' ;;
esac
exit 0
"""

# The [mail] plugin: header lines by sender.
MAIL_PLUGIN = r"""#!/bin/sh
case "$SMTPMAILFROM" in
  nocolon@*)   echo 'HNo colon at all' ;;
  emptyname@*) echo 'H: empty name' ;;
  space@*)     echo 'HBad Name: x' ;;
  cr@*)        printf 'HX-Evil: a\rBcc: victim@example.org\n' ;;
  esc@*)       printf 'HX-Evil: a\033[2J\n' ;;
  folded@*)    printf 'HX-Ok: 1\nH\tfolded: 2\n' ;;
  long@*)      printf 'HX-Long: %01000d\n' 0 ;;
  good@*)      printf 'HX-Plugin: fine\nHX-Tab:\tvalue\n' ;;
esac
exit 0
"""

RCPT_PLUGIN = "#!/bin/sh\necho 'P250-recipient checked'\n"


@pytest.fixture(scope="module")
def inst() -> Iterator[Instance]:
    inst = Instance.create(listen="smtp 127.0.0.1:0")
    for name, body in (("helo", HELO_PLUGIN), ("mail", MAIL_PLUGIN), ("rcpt", RCPT_PLUGIN)):
        path = inst.root / "plugins" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(body)
        path.chmod(0o755)
    inst.write_control("smtpplugins", "[helo]\nplugins/helo\n[mail]\nplugins/mail\n"
                       "[rcpt]\nplugins/rcpt\n")
    try:
        inst.start()
        yield inst
    finally:
        inst.destroy()


def port(inst: Instance) -> int:
    status = json.loads(inst.ctl("status", "--json").stdout)
    return int(status["listeners"][0]["port"])


def exchange(client: RawClient, command: bytes) -> bytes:
    """Everything the server sends for ``command`` (a HELP follows it; its 214 is cut
    off).  Two replies to the command, or a half one, would show here."""
    client.send(command + b"\r\nHELP\r\n")
    got = b""
    while not got.endswith(MARK):
        got += client.line()
    return got[:-len(MARK)]


def session(inst: Instance) -> RawClient:
    client = RawClient("127.0.0.1", port(inst))
    assert client.line() == f"220 {ME} ESMTP\r\n".encode()
    return client


@pytest.mark.parametrize("helo, expect", [
    (b"complete", FAILED.format("helo", "malformed output")),
    (b"smuggle", FAILED.format("helo", "malformed output")),
    (b"twolines", FAILED.format("helo", "malformed output")),
    (b"coded", FAILED.format("helo", "malformed output")),
    (b"rejectcr", FAILED.format("helo", "malformed output")),
    (b"cont", f"250-plugin line\r\n250 {ME}\r\n"),
    (b"reject", "553-one\r\n553 two\r\n"),
    (b"plain", f"250 {ME}\r\n"),
])
def test_exactly_one_reply_per_command(inst: Instance, helo: bytes, expect: str) -> None:
    client = session(inst)
    try:
        assert exchange(client, b"HELO " + helo) == expect.encode()
    finally:
        client.close()


def test_a_finished_reply_before_d_is_the_only_reply(inst: Instance) -> None:
    client = session(inst)
    try:
        client.send(b"HELO bye\r\nHELP\r\n")
        assert client.read_to_eof() == b"421 bye\r\n"
    finally:
        client.close()


def test_open_plugin_lines_never_lead_a_reply_of_another_code(inst: Instance) -> None:
    client = session(inst)
    try:
        assert exchange(client, b"HELO plain") == f"250 {ME}\r\n".encode()
        assert exchange(client, b"MAIL FROM:<a@client.example>") == b"250 ok\r\n"
        # relay refused: the plugin's "250-" line is dropped, the 553 stands alone
        assert exchange(client, b"RCPT TO:<x@elsewhere.example>") == (
            b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n")
        assert exchange(client, f"RCPT TO:<testuser@{ME}>".encode()) == (
            b"250-recipient checked\r\n250 ok\r\n")
    finally:
        client.close()


BAD_SENDERS = ["nocolon", "emptyname", "space", "cr", "esc", "folded", "long"]


def test_invalid_header_lines_are_refused_never_stored(inst: Instance) -> None:
    client = session(inst)
    before = set(inst.maildir_files())
    try:
        assert exchange(client, b"HELO plain") == f"250 {ME}\r\n".encode()
        for sender in BAD_SENDERS:
            got = exchange(client, f"MAIL FROM:<{sender}@client.example>".encode())
            assert got == FAILED.format("mail", "malformed header").encode(), sender
        assert exchange(client, b"MAIL FROM:<good@client.example>") == b"250 ok\r\n"
        assert exchange(client, f"RCPT TO:<testuser@{ME}>".encode()).endswith(b"250 ok\r\n")
        client.send(b"DATA\r\n")
        assert client.line() == b"354 go ahead\r\n"
        got = exchange(client, b"Subject: plugin headers\r\n\r\nbody\r\n.")
        assert got.startswith(b"250 ok ") and got.count(b"\r\n") == 1, got
    finally:
        client.close()
    deadline = time.monotonic() + 20
    while not set(inst.maildir_files()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    (new,) = set(inst.maildir_files()) - before
    header = new.read_bytes().split(b"\n\n", 1)[0]
    lines = header.split(b"\n")
    assert b"X-Plugin: fine" in lines and b"X-Tab:\tvalue" in lines
    assert b"Subject: plugin headers" in lines
    for bad in (b"No colon", b"empty name", b"Bad Name", b"X-Evil", b"Bcc", b"folded",
                b"X-Ok", b"X-Long", b"\r"):
        assert bad not in header, bad
    # the admin learns which plugin broke which rule
    assert inst.log().count("warning: qmail-spp: plugins/mail: malformed header") == len(BAD_SENDERS)
