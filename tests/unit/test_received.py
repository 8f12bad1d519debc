"""The Received line and eQmail's local-time date."""

from __future__ import annotations

import os
import time

import pytest

from eqmail.smtp.received import date822, received_line, safe

T = 1700000000  # 2023-11-14 22:13:20 UTC


@pytest.mark.parametrize(("offset", "text"), [
    (0, "14 Nov 2023 22:13:20 +0000"),
    (3600, "14 Nov 2023 23:13:20 +0100"),
    (-5 * 3600 - 1800, "14 Nov 2023 16:43:20 -0530"),
    (2 * 3600, "15 Nov 2023 00:13:20 +0200"),
])
def test_date822(offset: int, text: str) -> None:
    assert date822(T, offset) == text


def test_day_not_padded() -> None:
    assert date822(1699000000, 0) == "3 Nov 2023 08:26:40 +0000"


def test_date822_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert date822(T) == "14 Nov 2023 23:13:20 +0100"
        assert date822(1690000000) == "22 Jul 2023 06:26:40 +0200"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert "TZ" not in os.environ


def test_safe() -> None:
    assert safe("a-Z.0@%+/=:x") == "a-Z.0@%+/=:x"
    assert safe("a b\r\n(c)\u00e9") == "a?b???c???"  # one ? per byte: é is two in UTF-8
    assert safe("h\u00e9\u20acx") == "h?????x"
    assert safe("good\0.evil\nX-Injected: 1") == "good"  # a NUL ends a C string
    assert safe("b\udcffc") == "b?c"  # a raw 8-bit byte that was not UTF-8: one ?


def base(**kw: object) -> str:
    args = dict(protocol="SMTP", local="mx.example", remoteip="192.0.2.1",
                remotehost="unknown", remoteinfo=None, helo=None, when=T, utcoffset=0)
    args.update(kw)
    return received_line(**args)  # type: ignore[arg-type]


def test_no_helo() -> None:
    assert base() == ("Received: from unknown (192.0.2.1)\n"
                      "  by mx.example with SMTP; 14 Nov 2023 22:13:20 +0000\n")


def test_helo_shown_only_when_different() -> None:
    assert "(HELO x.example)" in base(helo="x.example")
    assert "HELO" not in base(remotehost="X.Example", helo="x.EXAMPLE")
    assert "(HELO )" in base(helo="")


def test_remoteinfo_and_protocols() -> None:
    line = base(remoteinfo="joe", protocol="ESMTPA")
    assert line.startswith("Received: from unknown (joe@192.0.2.1)\n  by mx.example with ESMTPA;")
    line = base(protocol="ESMTPS (TLS_AES_128_GCM_SHA256 encrypted)\n  (cert a@b)")
    assert "with ESMTPS (TLS_AES_128_GCM_SHA256 encrypted)\n  (cert a@b); 14 Nov" in line


def test_injection_is_neutralised() -> None:
    line = base(helo="x\nX-Evil: 1", remoteinfo="a b", remotehost="h\r\n")
    assert line.count("\n") == 2


def test_helo_comparison_is_ascii_only() -> None:
    # str.lower() folds the Kelvin sign to "k"; qmail's case_diffs() does not
    assert "(HELO ???.example)" in base(remotehost="k.example", helo="\u212a.example")
    assert "HELO" not in base(remotehost="mx.example", helo="MX.example\0trailer")
