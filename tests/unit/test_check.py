"""eqmailctl check's report (eqmail.cli.check) on control directories written by hand."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from eqmail.cli.check import auth_warnings, check_report, format_check
from eqmail.control import load_controls
from eqmail.instance import Instance


def instance(tmp_path: Path, **files: str) -> Instance:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.example.org\n")
    for name, text in files.items():
        (tmp_path / "control" / name.replace("_", ".")).write_text(text)
    return Instance(tmp_path)


def test_listeners_that_require_auth(tmp_path: Path) -> None:
    inst = instance(tmp_path, listen=(
        "smtp 127.0.0.1:25\n"
        "submission 127.0.0.1:2588 checkpassword='/bin/cp /bin/true'\n"    # fine
        "submission 127.0.0.1:2589\n"                                        # no AUTH to offer
        "smtp 127.0.0.1:587 checkpassword=/bin/cp\n"                         # SUBMISSIONPORT's default
        "smtp 127.0.0.1:2590 SUBMISSION=2590 checkpassword=/bin/cp\n"        # eQmail's synonym
        "smtp 127.0.0.1:2591 SUBMISSIONPORT=smtp\n"))                        # never matches
    warnings = auth_warnings(load_controls(tmp_path))
    assert warnings == [
        "warning: control/listen: submission 127.0.0.1:2589 requires AUTH before MAIL but has no "
        "checkpassword= to offer it: every MAIL gets 530",
        "warning: control/listen: smtp 127.0.0.1:587 requires AUTH before MAIL (SUBMISSIONPORT's "
        "default 587 matches its port); if that is meant, write it as a 'submission' listener",
        "warning: control/listen: smtp 127.0.0.1:2590 requires AUTH before MAIL (SUBMISSION=2590 "
        "matches its port); if that is meant, write it as a 'submission' listener",
        "warning: control/listen: smtp 127.0.0.1:2591: SUBMISSIONPORT='smtp' is not a port number "
        "and matches no port",
    ]
    assert all(w in format_check(check_report(inst)) for w in warnings)


def test_known_unknown_and_plugin_files(tmp_path: Path) -> None:
    inst = instance(tmp_path, listen="submission 127.0.0.1:2588 rules=tcp.sub SPPCONFFILE=control/spp.sub "
                    "checkpassword=/bin/cp\n",
                    tcp_sub=":allow\n", spp_sub="[mail]\n", greylistdelay="60\n", tarpitcount="# c\n9\n",
                    passwords="", passwords_lock="", frobnicate="x\n", rcpthosts="example.org\n")
    report = check_report(inst)
    assert report["ok"] and report["errors"] == [] and report["warnings"] == []
    assert report["unknown"] == ["frobnicate"]
    assert report["plugin_controls"] == [
        {"file": "greylistdelay", "plugin": "greylist", "default": "300", "text": "60",
         "source": str(tmp_path / "control" / "greylistdelay")},
        {"file": "tarpitcount", "plugin": "tarpit", "default": "50", "text": "9",
         "source": str(tmp_path / "control" / "tarpitcount")},
    ]
    rows = {r["file"]: r for r in report["controls"]}
    assert rows["me"] == {"file": "me", "value": "mx.example.org", "text": "mx.example.org",
                          "source": str(tmp_path / "control" / "me")}
    assert rows["databytes"]["value"] == 0 and rows["databytes"]["source"] == "(default)"
    assert rows["rcpthosts"]["value"] == ["example.org"]
    assert rows["listen"]["value"] == [{"service": "submission", "address": "127.0.0.1", "port": 2588,
                                        "options": {"SPPCONFFILE": "control/spp.sub"}}]
    json.dumps(report)  # every value serialises
    text = format_check(report)
    assert "frobnicate: I have no idea what this file does.\n" in text
    assert text.count("no idea") == 1
    assert f"greylistdelay: 60    [{tmp_path}/control/greylistdelay; read by plugin greylist]\n" in text


def test_a_control_directory_that_does_not_load(tmp_path: Path) -> None:
    report = check_report(instance(tmp_path, databytes="lots\n"))
    assert not report["ok"] and report["errors"] == ["control/databytes:1: not a number: 'lots'"]
    assert format_check(report) == "control/databytes:1: not a number: 'lots'\n"


def test_a_bad_authlimit_is_reported_from_the_same_parse(tmp_path: Path) -> None:
    """The load keeps the defaults for a control/authlimit it cannot parse (the listener
    logs that); check shows the same warning."""
    report = check_report(instance(tmp_path, authlimit="10 lots\n", rcpthosts="example.org\n"))
    assert report["ok"] and report["warnings"] == [
        "warning: control/authlimit:1: SECONDS and DELAY must be numbers from 0 to 604800; using defaults"]
    assert report["warnings"][0] + "\n" in format_check(report)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """An instance directory every user can search (pytest's tmp_path is 0700): what
    the remote delivery user can read there is what check reports."""
    path = Path(tempfile.mkdtemp(prefix="eqm-check-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_dkim_keys_that_are_wrong_are_named(open_dir: Path) -> None:
    from eqmail.cli.dkim import expected_key_owner, store_owners
    from eqmail.dkim import keys

    inst = instance(open_dir)
    uid, gid = expected_key_owner()
    owners = store_owners() or keys.Owners(uid, os.getgid(), os.getuid(), os.getgid())
    ed = keys.generate(keys.KeyType.ED25519)
    good = keys.write_key(inst.control, "example.com", "good", ed, owners)
    report = check_report(inst)
    assert report["unknown"] == []
    assert not [w for w in report["warnings"] if "dkim" in w]
    moded = keys.write_key(inst.control, "example.com", "moded", ed, owners)
    os.chmod(moded, 0o644)
    broken = keys.write_key(inst.control, "example.org", "broken", ed, owners)
    os.chmod(broken, 0o600)
    broken.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    os.chmod(broken, 0o400)
    report = check_report(inst)
    assert "dkim" not in report["unknown"]
    dkim = [w for w in report["warnings"] if "dkim" in w]
    assert dkim[0] == "warning: control/dkim/example.com/moded.key: mode 0644, want 0400"
    assert dkim[1].startswith("warning: control/dkim/example.org/broken.key: not a PEM private key")
    assert len(dkim) == 2 and str(good.name) not in " ".join(dkim)
    assert all(w in format_check(report) for w in dkim)
