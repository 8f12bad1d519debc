"""control/listen's ``proxy=`` option: parsed once into TrustedNet values (errors name file
and line), carried by a reload's configuration push, and a changed list replaces the
listener."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

import pytest
from harness import parsed_controls
from hypothesis import given
from hypothesis import strategies as st

from eqmail.control import ListenerSpec, load_controls, parse_listen_line
from eqmail.control.listen import TrustedNet
from eqmail.errors import ControlErrors
from eqmail.ipc.config import ConfigReader, ConfigUpdate
from eqmail.supervisor.diff import ListenerPlan, listener_diff


def load(tmp_path: Path, listen: str) -> list[ListenerSpec] | list[str]:
    (tmp_path / "control").mkdir(exist_ok=True)
    (tmp_path / "users").mkdir(exist_ok=True)
    (tmp_path / "control" / "me").write_text("mx.example\n")
    (tmp_path / "control" / "listen").write_text(listen)
    try:
        return list(load_controls(tmp_path).listen)
    except ControlErrors as e:
        return [str(err) for err in e.errors]


def test_proxy_option_parsed_into_prefixes() -> None:
    spec = parse_listen_line("smtp 127.0.0.1:2525 proxy=127.0.0.1,10.0.0.0/8,::1,2001:db8::/32")
    assert [str(n) for n in spec.proxy] == ["127.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32"]
    assert spec.trusts("127.0.0.1") and spec.trusts("10.255.0.1") and spec.trusts("::1")
    assert spec.trusts("2001:db8:ffff::1") and spec.trusts("::ffff:10.1.2.3")  # dual-stack peer
    assert not spec.trusts("127.0.0.2") and not spec.trusts("11.0.0.1") and not spec.trusts("::2")
    assert not spec.trusts("2001:db9::1") and not spec.trusts("garbage")
    assert parse_listen_line("smtp 127.0.0.1:2525").proxy == ()
    assert parse_listen_line("smtps [::1]:465 proxy=::/0").trusts("2001:db8::9")
    # listed twice: once
    assert len(parse_listen_line("smtp 127.0.0.1:1 proxy=127.0.0.1,127.0.0.1/32").proxy) == 1


@pytest.mark.parametrize(("option", "reason"), [
    ("proxy=", "proxy= needs ADDR[,ADDR...] (addresses or prefixes of load balancers)"),
    ("proxy=127.0.0.1,", "proxy= needs ADDR[,ADDR...] (addresses or prefixes of load balancers)"),
    ("proxy=lb.example", "proxy: 'lb.example' is not an IP address or prefix"),
    ("proxy=10.0.0.1/8", "proxy: '10.0.0.1/8' has host bits set"),
    ("proxy=10.0.0.0/33", "proxy: '10.0.0.0/33' is not an IP address or prefix"),
    ("proxy=fe80::1%eth0", "proxy: 'fe80::1%eth0' has a zone index"),
    ("proxy=[::1]", "proxy: '[::1]' is not an IP address or prefix"),
])
def test_proxy_errors_name_file_and_line(tmp_path: Path, option: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_listen_line(f"smtp 127.0.0.1:25 {option}")
    assert load(tmp_path, f"smtp 127.0.0.1:26\n# lb\nsmtp 127.0.0.1:25 {option}\n") == [
        f"control/listen:3: {reason}"]


@given(st.sampled_from([4, 6]), st.data())
def test_trusted_net_matches_ipaddress(version: int, data: st.DataObject) -> None:
    bits = 32 if version == 4 else 128
    prefix = data.draw(st.integers(0, bits))
    raw = data.draw(st.integers(0, 2**bits - 1)) >> (bits - prefix) << (bits - prefix)
    net = ipaddress.ip_network((raw, prefix)) if version == 4 else ipaddress.IPv6Network((raw, prefix))
    trusted = TrustedNet.parse(str(net))
    peer = ipaddress.ip_address(data.draw(st.integers(0, 2**bits - 1))) if version == 4 else \
        ipaddress.IPv6Address(data.draw(st.integers(0, 2**bits - 1)))
    assert (str(peer) in trusted) == (peer in net)
    assert TrustedNet.parse(str(trusted)) == trusted


def test_the_configuration_push_carries_the_proxy_list() -> None:
    spec = parse_listen_line("smtp 127.0.0.1:25 proxy=192.0.2.0/24,2001:db8::1")
    controls = dataclasses.replace(parsed_controls(), listen=(spec,))
    (update,) = ConfigReader(b"U").feed(ConfigUpdate(7, controls).encode())
    assert isinstance(update, ConfigUpdate) and update.controls.listen == (spec,)


def test_a_changed_proxy_list_replaces_the_listener() -> None:
    base = parsed_controls()
    plain = ListenerSpec("smtp", "127.0.0.1", 25)
    proxied = parse_listen_line("smtp 127.0.0.1:25 proxy=127.0.0.1")
    other = parse_listen_line("smtp 127.0.0.1:25 proxy=127.0.0.2")
    old = dataclasses.replace(base, listen=(plain,))
    assert listener_diff(old, dataclasses.replace(base, listen=(proxied,))) == ListenerPlan(
        replace=(proxied,))
    old = dataclasses.replace(base, listen=(proxied,))
    assert listener_diff(old, dataclasses.replace(base, listen=(other,))) == ListenerPlan(
        replace=(other,))
    assert listener_diff(old, old) == ListenerPlan(keep=(proxied,))
