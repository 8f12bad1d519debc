"""control/smtpplugins and control/spptimeout: which plugins run at which hook.

Owns: qmail-spp's configuration format (eqmail-features.md §2), read the way
qmail-spp's ``spp_init`` reads it with qmail's control_readfile: trailing spaces and
tabs stripped, empty lines and ``#`` lines dropped; a line starting with ``[`` opens a
section chosen by its *second character only* (``c h m r d a``, case-sensitive; any
other letter opens an ignored dummy section); lines before the first section are
ignored; every other line is a plugin, in file order.  A plain line is a program path
relative to the instance root run with no arguments; a ``:`` line is run as
``/bin/sh -c <rest>``.  The failure text names the plugin by its line as written.

Privilege: read access to the file (the listener, user eqmaild, reads it).
Inputs: the instance root and the session's environment (``SPPCONFFILE``, ``NOSPP``).
Outputs: a frozen :class:`PluginTable`.
Failures: a missing file means no plugins (eQmail 1.09; upstream qmail-spp died); any
other read error raises :class:`SppConfigError`, which the listener answers with
``421 unable to read controls (#4.3.0)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from eqmail.smtp.actions import HookStage

DEFAULT_CONFFILE = "control/smtpplugins"
DEFAULT_TIMEOUT = 30
MAX_CONF_BYTES = 1 << 20

_SECTIONS = {
    "c": HookStage.CONNECTION, "h": HookStage.HELO, "m": HookStage.MAIL,
    "r": HookStage.RCPT, "d": HookStage.DATA, "a": HookStage.AUTH,
}


class SppConfigError(Exception):
    """control/smtpplugins exists but cannot be read (-> 421 unable to read controls)."""


@dataclass(frozen=True)
class Plugin:
    """One plugin line.  ``line`` is exactly as written (with the ``:``), for 451 texts."""

    line: str

    @property
    def shell(self) -> bool:
        return self.line.startswith(":")

    @property
    def argv(self) -> tuple[str, ...]:
        if self.shell:
            return ("/bin/sh", "-c", self.line[1:])
        return (self.line,)


@dataclass(frozen=True)
class PluginTable:
    sections: Mapping[HookStage, tuple[Plugin, ...]] = field(default_factory=dict)

    def for_stage(self, stage: HookStage) -> tuple[Plugin, ...]:
        return self.sections.get(stage, ())

    @property
    def empty(self) -> bool:
        return not any(self.sections.values())


def parse_smtpplugins(text: str) -> PluginTable:
    """The plugin table of a control/smtpplugins text (see the module docstring)."""
    sections: dict[HookStage, list[Plugin]] = {}
    current: list[Plugin] | None = None  # None: before any section, or a dummy one
    for raw in text.split("\n"):
        line = raw.rstrip(" \t")
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            stage = _SECTIONS.get(line[1:2])
            current = None if stage is None else sections.setdefault(stage, [])
        elif current is not None:
            current.append(Plugin(line))
    return PluginTable({stage: tuple(plugins) for stage, plugins in sections.items()})


def conffile_path(root: Path, env: Mapping[str, str]) -> Path:
    """$SPPCONFFILE (relative to the instance root, like everything qmail-smtpd reads
    after its chdir) or control/smtpplugins."""
    name = env.get("SPPCONFFILE") or DEFAULT_CONFFILE
    return root / name


def load_smtpplugins(path: Path) -> PluginTable:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONF_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return PluginTable()
    except OSError as e:
        raise SppConfigError(f"{path}: {e.strerror}") from e
    if len(data) > MAX_CONF_BYTES:
        raise SppConfigError(f"{path}: file too large")
    return parse_smtpplugins(data.decode("utf-8", "surrogateescape"))


class PluginTableCache:
    """Per-process cache of parsed plugin files, revalidated by one stat per session,
    so an edit of control/smtpplugins applies to the next connection (as a new
    qmail-smtpd process would read it) without parsing the file every time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[Path, tuple[tuple[int, int, int], PluginTable]] = {}

    def for_session(self, env: Mapping[str, str]) -> PluginTable | None:
        """The session's plugins; None when NOSPP is set (qmail-spp off)."""
        if "NOSPP" in env:
            return None
        path = conffile_path(self.root, env)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return PluginTable()
        except OSError as e:
            raise SppConfigError(f"{path}: {e.strerror}") from e
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._cache.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        table = load_smtpplugins(path)
        self._cache[path] = (key, table)
        return table


def read_spptimeout(control: Path) -> int:
    """control/spptimeout: seconds for one plugin (default 30; bad values -> default;
    eqmail.control.Controls.spptimeout validates the same file with file:line errors)."""
    try:
        with open(control / "spptimeout", encoding="ascii", errors="replace") as f:
            first = f.readline(64).strip()
    except OSError:
        return DEFAULT_TIMEOUT
    return int(first) if first.isdigit() and 0 < int(first) <= 3600 else DEFAULT_TIMEOUT
