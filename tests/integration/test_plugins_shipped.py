"""eqmail's shipped plugins end to end: a live DNS server on loopback, the real sandbox
(running them in-process), SMTP sessions as the listener drives them; and each plugin
as a standalone qmail-spp program (the way eQmail runs it)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsServer  # noqa: E402
from spp_harness import Sandbox, converse, make_root  # noqa: E402

from eqmail.spp.config import Plugin  # noqa: E402
from eqmail.spp.runner import SHIPPED_DIR, Limits, Runner  # noqa: E402

# the plugins as installed (the checkout's plugins/, or the copy a non-editable install put
# under <venv>/share/eqmail/plugins): what the sandbox recognises as shipped
PLUGINS = SHIPPED_DIR
ZONE = {
    "10.2.0.192.bl.test": {"A": ["127.0.0.2"], "TXT": ['"listed for testing"']},
    "good.example": {"MX": [(10, "mx.good.example")],
                     "TXT": ['"v=spf1 ip4:192.0.2.0/24 -all"']},
    "mx.good.example": {"A": ["192.0.2.1"]},
    "bad.example": {"A": ["198.51.100.1"], "TXT": ['"v=spf1 ip4:198.51.100.0/24 -all"']},
    "aonly.example": {"A": ["198.51.100.2"]},
    "broken.example": "SERVFAIL",
}


def cfg(section: str, *names: str) -> str:
    return f"[{section}]\n" + "".join(f"{PLUGINS / n}\n" for n in names)


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(ZONE)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sandbox(dns: DnsServer) -> Iterator[Sandbox]:
    root = make_root("", {
        "dnsservers": f"127.0.0.1:{dns.port}\n", "dnsbl": "bl.test\n",
        "locals": "mx.test.example\n", "greylistdelay": "1\n", "spptimeout": "5\n",
        "tarpitcount": "2\n", "tarpitdelay": "1\n",
        "spp-dnsbl": cfg("mail", "dnsbl"), "spp-spf": cfg("mail", "spf"),
        "spp-sender": cfg("mail", "sendercheck"), "spp-grey": cfg("rcpt", "greylist"),
        "spp-tarpit": cfg("rcpt", "tarpit"), "spp-rcpt": cfg("rcpt", "rcptcheck"),
        "users/assign": f"=testuser:nobody:65534:65534:{PLUGINS}:::\n.\n",
        "alias/.qmail-postmaster": "./Maildir/\n",
    })
    sb = Sandbox(root).start()
    yield sb
    log = sb.stop()
    sb.destroy()
    assert "Traceback" not in log, log


def talk(sb: Sandbox, config: str, cmds: list[bytes], ip: str = "192.0.2.10",
         **env: str):  # type: ignore[no-untyped-def]
    return asyncio.run(converse(sb, cmds, env={"SPPCONFFILE": f"control/spp-{config}",
                                               "TCPREMOTEIP": ip, **env}))


def mail(sender: str) -> list[bytes]:
    return [b"HELO client.example\r\n", f"MAIL FROM:<{sender}>\r\n".encode()]


def test_dnsbl_listed_client_refused(sandbox: Sandbox) -> None:
    t = talk(sandbox, "dnsbl", mail("a@good.example"))
    assert t.text.endswith("553 sorry, your IP address (192.0.2.10) is listed in bl.test: "
                           "listed for testing (#5.7.1)\r\n")
    assert talk(sandbox, "dnsbl", mail("a@good.example"), ip="192.0.2.11").text.endswith("250 ok\r\n")
    t = talk(sandbox, "dnsbl", mail("a@good.example"), RELAYCLIENT="")
    assert t.text.endswith("250 ok\r\n")


def test_spf_fail_refused_pass_gets_header(sandbox: Sandbox) -> None:
    t = talk(sandbox, "spf", mail("a@bad.example"))
    assert t.text.splitlines()[-1].startswith("550 SPF check failed: ")
    t = talk(sandbox, "spf", [*mail("a@good.example"), b"RCPT TO:<u@mx.test.example>\r\n",
                              b"DATA\r\n", b"hi\r\n.\r\n"])
    assert t.text.endswith("354 go ahead\r\n250 ok " + t.text.rsplit("250 ok ", 1)[1])
    assert b"\nReceived-SPF: pass (mx.test.example: " in t.headers[0]
    assert b"client-ip=192.0.2.10; envelope-from=<a@good.example>; helo=client.example;" in t.headers[0]


def test_sendercheck(sandbox: Sandbox) -> None:
    assert talk(sandbox, "sender", mail("a@good.example")).text.endswith("250 ok\r\n")
    assert talk(sandbox, "sender", mail("a@aonly.example")).text.endswith("250 ok\r\n")
    assert talk(sandbox, "sender", mail("")).text.endswith("250 ok\r\n")
    assert talk(sandbox, "sender", mail("a@nowhere.example")).text.endswith(
        "553 sorry, your envelope sender domain must exist (#5.1.8)\r\n")
    assert talk(sandbox, "sender", mail("a@broken.example")).text.endswith(
        "451 DNS temporary failure (#4.4.3)\r\n")


def test_greylisting_first_try_451_later_accepted(sandbox: Sandbox) -> None:
    cmds = [*mail("grey@good.example"), b"RCPT TO:<u@mx.test.example>\r\n"]
    grey = "451 greylisted, try again later (#4.7.1)\r\n"
    assert talk(sandbox, "grey", cmds).text.endswith(grey)
    assert talk(sandbox, "grey", cmds, ip="192.0.2.99").text.endswith(grey)  # same /24, early
    time.sleep(1.2)
    assert talk(sandbox, "grey", cmds, ip="192.0.2.99").text.endswith("250 ok\r\n250 ok\r\n")
    assert talk(sandbox, "grey", cmds, ip="198.51.100.7").text.endswith(grey)  # other network
    assert list((sandbox.root / "spp" / "greylist").rglob("*"))


def test_tarpit_delays_only_its_session(sandbox: Sandbox) -> None:
    rcpts = [f"RCPT TO:<u{i}@mx.test.example>\r\n".encode() for i in range(3)]

    async def both() -> tuple[float, float]:
        t0 = time.monotonic()
        slow = asyncio.ensure_future(converse(sandbox, [*mail("a@b"), *rcpts],
                                              env={"SPPCONFFILE": "control/spp-tarpit"}))
        await asyncio.sleep(0.1)
        await converse(sandbox, [*mail("a@b"), *rcpts[:1]] * 5,
                       env={"SPPCONFFILE": "control/spp-tarpit"})
        fast = time.monotonic() - t0
        t = await slow
        assert t.text.count("250 ok") == 4
        return time.monotonic() - t0, fast

    slow, fast = asyncio.run(both())
    assert slow >= 2.0  # recipients 2 and 3 waited 1 s each
    assert fast < 1.0


def test_rcptcheck_rejects_unknown_local_recipients(sandbox: Sandbox) -> None:
    def rcpt(addr: str) -> str:
        return talk(sandbox, "rcpt", [*mail("a@good.example"),
                                      f"RCPT TO:<{addr}>\r\n".encode()], RELAYCLIENT="").text
    assert rcpt("testuser@mx.test.example").endswith("250 ok\r\n250 ok\r\n")
    assert rcpt("postmaster@mx.test.example").endswith("250 ok\r\n250 ok\r\n")
    assert rcpt("root@mx.test.example").endswith(
        "550 sorry, no mailbox here by that name (#5.1.1)\r\n")  # uid 0 never gets mail
    assert rcpt("nobody-here@mx.test.example").endswith(
        "550 sorry, no mailbox here by that name (#5.1.1)\r\n")
    assert rcpt("anyone@remote.example").endswith("250 ok\r\n250 ok\r\n")


def test_shipped_plugins_run_in_process(tmp_path: Path) -> None:
    runner = Runner(tmp_path, 5, Limits())
    for name in ("greylist", "dnsbl", "spf", "tarpit", "rcptcheck", "sendercheck"):
        module = runner.shipped(Plugin(str(PLUGINS / name)))
        assert module is not None, name
    assert runner.shipped(Plugin(f":{PLUGINS / 'greylist'}")) is None  # shell line: a program


def test_plugins_work_as_standalone_programs(tmp_path: Path, dns: DnsServer) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "dnsservers").write_text(f"127.0.0.1:{dns.port}\n")
    (tmp_path / "control" / "greylistdir").write_text("grey\n")
    (tmp_path / "control" / "dnsbl").write_text("bl.test\n")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.10",
           "SMTPMAILFROM": "a@nowhere.example", "SMTPRCPTTO": "b@c"}

    def run(name: str) -> str:
        p = subprocess.run([sys.executable, str(PLUGINS / name)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout
    assert run("greylist") == "E451 greylisted, try again later (#4.7.1)\n"
    assert run("sendercheck") == "E553 sorry, your envelope sender domain must exist (#5.1.8)\n"
    assert run("dnsbl").startswith("E553 sorry, your IP address (192.0.2.10) is listed")
    assert run("tarpit") == ""
    assert os.access(PLUGINS / "greylist", os.X_OK)


def test_greylist_expires_idle_triplets(tmp_path: Path) -> None:
    """Idle triplets are deleted by a bounded sweep: one bucket per check, once an hour."""
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "greylistdir").write_text("grey\n")
    (tmp_path / "control" / "greylistexpire").write_text("86400\n")
    env = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.10",
           "SMTPMAILFROM": "a@example.org", "SMTPRCPTTO": "b@c"}

    def run() -> str:
        p = subprocess.run([sys.executable, str(PLUGINS / "greylist")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout
    assert run().startswith("E451")
    [mine] = [p for p in (tmp_path / "grey").rglob("*") if p.is_file()]
    bucket = mine.parent
    old = time.time() - 2 * 86400

    def stale(name: str) -> Path:
        path = bucket / name
        path.write_text("1.0")
        os.utime(path, (old, old))
        return path
    gone, kept = stale("a" * 64), bucket / ("b" * 64)
    kept.write_text("1.0")  # idle for less than greylistexpire
    assert run().startswith("E451")  # still within greylistdelay
    assert not gone.exists() and kept.exists() and mine.exists()
    later = stale("c" * 64)
    run()
    assert later.exists()  # swept less than an hour ago: this call does no work
    os.utime(bucket / ".swept", (old, old))
    run()
    assert not later.exists() and kept.exists() and mine.exists()
