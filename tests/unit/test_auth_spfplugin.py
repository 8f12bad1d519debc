"""plugins/spf on eqmail.auth's SPF code: its qmail-spp replies byte for byte (the texts
it gave before it moved onto the shared DNS path), in-process and as a program."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from dnsserver import DnsServer, txt

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "spf"
ZONE = {
    "good.example": {"TXT": [txt("v=spf1 ip4:192.0.2.0/24 -all")]},
    "exp.example": {"TXT": [txt("v=spf1 -all exp=why.exp.example")]},
    "why.exp.example": {"TXT": [txt("%{i} is not allowed (see %{d})")]},
    "soft.example": {"TXT": [txt("v=spf1 ~all")]},
    "broken.example": "SERVFAIL",
    "helo.example": {"TXT": [txt("v=spf1 ip4:192.0.2.10 -all")]},
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as srv:
        yield srv


@pytest.fixture()
def root(tmp_path: Path, dns: DnsServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "dnsservers").write_text(f"127.0.0.1:{dns.port}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load(path: Path = PLUGIN) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("spf_plugin_under_test", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def env(sender: str, ip: str = "192.0.2.10", helo: str = "client.example",
        **extra: str) -> dict[str, str]:
    return {"TCPREMOTEIP": ip, "SMTPMAILFROM": sender, "SMTPHELOHOST": helo,
            "TCPLOCALHOST": "mx.test", **extra}


CASES = [
    (env("a@good.example"),
     "HReceived-SPF: pass (mx.test: sender SPF authorized) client-ip=192.0.2.10; "
     "envelope-from=<a@good.example>; helo=client.example;\n"),
    (env("a@good.example", ip="203.0.113.9"),
     "E550 SPF check failed: SPF fail - not authorized (#5.7.1)\n"),
    (env("a@exp.example"),
     "E550 SPF check failed: 192.0.2.10 is not allowed (see exp.example) (#5.7.1)\n"),
    (env("a@soft.example"),
     "HReceived-SPF: softfail (mx.test: domain owner discourages use of this host) "
     "client-ip=192.0.2.10; envelope-from=<a@soft.example>; helo=client.example;\n"),
    (env("a@broken.example"), "E451 SPF temporary error (#4.4.3)\n"),
    (env("a@nowhere.example"),
     "HReceived-SPF: none (mx.test: ) client-ip=192.0.2.10; "
     "envelope-from=<a@nowhere.example>; helo=client.example;\n"),
    (env("", helo="helo.example"),
     "HReceived-SPF: pass (mx.test: sender SPF authorized) client-ip=192.0.2.10; "
     "envelope-from=<>; helo=helo.example;\n"),
    (env("a@good.example", ip="203.0.113.9", RELAYCLIENT=""), ""),
    (env("a@good.example", ip="203.0.113.9", SMTPAUTHUSER="u"), ""),
]


@pytest.mark.parametrize(("environ", "want"), CASES)
def test_replies_in_process(root: Path, environ: dict[str, str], want: str) -> None:
    assert load().check(environ) == want


def test_softfail_refused_when_configured(root: Path) -> None:
    (root / "control" / "spfsoftfail").write_text("reject\n")
    assert load().check(env("a@soft.example")) == (
        "E550 SPF check failed: domain owner discourages use of this host (#5.7.1)\n")


def test_the_plugin_uses_eqmails_spf_code(root: Path) -> None:
    import eqmail.auth.spfcheck
    assert load().check_host is eqmail.auth.spfcheck.check_host


@pytest.mark.parametrize(("environ", "want"), CASES[:2])
def test_replies_as_a_program(root: Path, environ: dict[str, str], want: str) -> None:
    p = subprocess.run([sys.executable, str(PLUGIN)], cwd=root, capture_output=True,
                       text=True, timeout=60,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **environ})
    assert p.returncode == 0, p.stderr
    assert p.stdout == want
