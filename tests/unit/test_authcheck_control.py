"""The inbound-verification control files (issue 16): authcheck, authservid, dmarcreject,
authtimeout — parsed into Controls, file:line errors, and what ``eqmailctl check`` says."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.cli.check import check_report, format_check
from eqmail.control import DmarcAction, load_controls
from eqmail.errors import ControlErrors
from eqmail.instance import Instance


def make(root: Path, **files: str) -> Path:
    (root / "control").mkdir(exist_ok=True)
    (root / "control" / "me").write_text("mx.example.org\n")
    for name, text in files.items():
        (root / "control" / name).write_text(text)
    return root


def errors(root: Path) -> list[str]:
    with pytest.raises(ControlErrors) as info:
        load_controls(root)
    return [str(e) for e in info.value.errors]


def test_defaults_are_off_me_header_and_ten_seconds(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path))
    assert (c.authcheck, c.authservid, c.dmarcreject, c.authtimeout) == (
        0, "mx.example.org", DmarcAction.HEADER, 10)


def test_values_are_read(tmp_path: Path) -> None:
    c = load_controls(make(tmp_path, authcheck="1\n", authservid="mail.example.org\n",
                           dmarcreject=" Reject \n", authtimeout="3\n"))
    assert (c.authcheck, c.authservid, c.dmarcreject, c.authtimeout) == (
        1, "mail.example.org", DmarcAction.REJECT, 3)
    assert load_controls(make(tmp_path, dmarcreject="quarantine\n")).dmarcreject is DmarcAction.QUARANTINE
    assert load_controls(make(tmp_path, dmarcreject="\n")).dmarcreject is DmarcAction.HEADER


def test_bad_values_name_file_and_line(tmp_path: Path) -> None:
    root = make(tmp_path, authcheck="yes\n", authservid="mail example\n", dmarcreject="drop\n",
                authtimeout="0\n")
    assert errors(root) == [
        "control/authcheck:1: not a number: 'yes'",
        "control/authservid:1: not a host-name-like authserv-id: 'mail example'",
        "control/dmarcreject:1: unknown action 'drop' (one of header, reject, quarantine)",
        "control/authtimeout:1: 0 out of range 1..300",
    ]
    assert errors(make(tmp_path, authcheck="2\n", authservid="x;y\n", dmarcreject="header\n",
                       authtimeout="10\n")) == [
        "control/authcheck:1: 2 out of range 0..1",
        "control/authservid:1: not a host-name-like authserv-id: 'x;y'"]


@given(st.text(alphabet="abcXYZ019.-_; \"()\\:=", min_size=1, max_size=40))
def test_an_accepted_authservid_is_a_header_token(value: str) -> None:
    """Whatever the file says, an accepted authserv-id cannot break the header field
    it is written into: no blank, no ';', no quote, no comment, no ':'."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        root = make(Path(d), authservid=value + "\n")
        try:
            c = load_controls(root)
        except ControlErrors as e:
            assert [str(x).split(":")[0] for x in e.errors] == ["control/authservid"]
            return
        assert c.authservid and not set(c.authservid) & set(' ;"()\\:=')


def test_check_suggests_authcheck_while_it_is_off(tmp_path: Path) -> None:
    inst = Instance(make(tmp_path, rcpthosts="example.org\n"))
    report = check_report(inst)
    assert report["warnings"] == []
    assert report["notes"] == [
        "note: control/authcheck is off: inbound mail gets no SPF/DKIM/DMARC checks and no "
        "Authentication-Results header; 'echo 1 > control/authcheck' turns them on"]
    assert report["notes"][0] + "\n" in format_check(report)
    (tmp_path / "control" / "dmarcreject").write_text("reject\n")
    assert check_report(inst)["notes"][1] == (
        "note: control/dmarcreject has no effect while control/authcheck is off")
    (tmp_path / "control" / "authcheck").write_text("1\n")
    report = check_report(inst)
    assert report["notes"] == []
    rows = {r["file"]: r for r in report["controls"]}
    assert rows["authcheck"]["value"] == 1 and rows["dmarcreject"]["text"] == "reject"
    assert rows["authservid"]["text"] == "mx.example.org" and rows["authtimeout"]["value"] == 10


def test_check_reports_a_bad_dmarcreject(tmp_path: Path) -> None:
    report = check_report(Instance(make(tmp_path, dmarcreject="bounce\n")))
    assert not report["ok"]
    assert report["errors"] == [
        "control/dmarcreject:1: unknown action 'bounce' (one of header, reject, quarantine)"]
