"""control/smtpplugins parsing (eqmail-features.md §2) and control/spptimeout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eqmail.smtp.actions import HookStage
from eqmail.spp.config import (
    Plugin,
    PluginTableCache,
    SppConfigError,
    load_smtpplugins,
    parse_smtpplugins,
    read_spptimeout,
)

SAMPLE = """\
plugins/ignored-before-any-section
[connection]
plugins/rbl   \t
# a comment
:plugins/greet --loud

[helo]
plugins/helo
[mail]
[rcpt]
plugins/rcpt
[Data]
plugins/dummy-because-capital-D
[data]
plugins/data
[xyz]
plugins/dummy
[auth]
plugins/auth
[
plugins/dummy-after-bare-bracket
"""


def test_sections_by_second_character() -> None:
    t = parse_smtpplugins(SAMPLE)
    assert t.for_stage(HookStage.CONNECTION) == (Plugin("plugins/rbl"),
                                                 Plugin(":plugins/greet --loud"))
    assert t.for_stage(HookStage.HELO) == (Plugin("plugins/helo"),)
    assert t.for_stage(HookStage.MAIL) == ()
    assert t.for_stage(HookStage.RCPT) == (Plugin("plugins/rcpt"),)
    assert t.for_stage(HookStage.DATA) == (Plugin("plugins/data"),)
    assert t.for_stage(HookStage.AUTH) == (Plugin("plugins/auth"),)


def test_section_names_only_first_letter_matters() -> None:
    t = parse_smtpplugins("[c]\na\n[mailfrom-whatever\nb\n[rcptto]\nc\n")
    assert [p.line for p in t.for_stage(HookStage.CONNECTION)] == ["a"]
    assert [p.line for p in t.for_stage(HookStage.MAIL)] == ["b"]
    assert [p.line for p in t.for_stage(HookStage.RCPT)] == ["c"]


def test_repeated_section_appends_in_file_order() -> None:
    t = parse_smtpplugins("[mail]\na\n[rcpt]\nx\n[mail]\nb\n")
    assert [p.line for p in t.for_stage(HookStage.MAIL)] == ["a", "b"]


def test_argv_plain_and_shell() -> None:
    assert Plugin("plugins/x").argv == ("plugins/x",)
    assert Plugin(":exec foo 'a b'").argv == ("/bin/sh", "-c", "exec foo 'a b'")
    assert Plugin("plugins/with space").argv == ("plugins/with space",)  # no args, ever


def test_trailing_whitespace_only_stripped() -> None:
    t = parse_smtpplugins("[mail]\n  leading kept \t \n")
    assert t.for_stage(HookStage.MAIL) == (Plugin("  leading kept"),)


def test_missing_file_means_no_plugins(tmp_path: Path) -> None:
    assert load_smtpplugins(tmp_path / "control" / "smtpplugins").empty


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_raises(tmp_path: Path) -> None:
    p = tmp_path / "smtpplugins"
    p.write_text("[mail]\nx\n")
    p.chmod(0)
    with pytest.raises(SppConfigError):
        load_smtpplugins(p)


def test_directory_in_place_of_file_raises(tmp_path: Path) -> None:
    (tmp_path / "control" / "smtpplugins").mkdir(parents=True)
    with pytest.raises(SppConfigError):
        PluginTableCache(tmp_path).for_session({})


def test_cache_nospp_sppconffile_and_reload(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "smtpplugins").write_text("[mail]\na\n")
    (tmp_path / "other").write_text("[mail]\nb\n")
    cache = PluginTableCache(tmp_path)
    assert cache.for_session({"NOSPP": ""}) is None
    t = cache.for_session({})
    assert t is not None and t.for_stage(HookStage.MAIL)[0].line == "a"
    t = cache.for_session({"SPPCONFFILE": "other"})
    assert t is not None and t.for_stage(HookStage.MAIL)[0].line == "b"
    (tmp_path / "control" / "smtpplugins").write_text("[mail]\nchanged\n")
    t = cache.for_session({})
    assert t is not None and t.for_stage(HookStage.MAIL)[0].line == "changed"


def test_spptimeout(tmp_path: Path) -> None:
    assert read_spptimeout(tmp_path) == 30
    (tmp_path / "spptimeout").write_text("7\n")
    assert read_spptimeout(tmp_path) == 7
    (tmp_path / "spptimeout").write_text("soon\n")
    assert read_spptimeout(tmp_path) == 30
