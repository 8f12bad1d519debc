"""What ``eqmailctl check`` shows of a :class:`Controls`: one row per file of the table.

Pure functions of a parsed configuration; no I/O.
"""

from __future__ import annotations

from eqmail.control.files import KNOWN_FILES
from eqmail.control.listen import ListenerSpec
from eqmail.control.values import Controls


def value_of(c: Controls, name: str) -> object:
    """The value of the row ``name`` (a file in KNOWN_FILES): the Controls attribute
    of that name, '.' written '_' — except the SRS secrets, never shown (whoever has
    them can forge bounce addresses that we deliver anywhere)."""
    if name == "srssecrets":
        n = len(c.srssecrets)
        return f"{n} secret{'' if n == 1 else 's'} (not shown)" if n else None
    return getattr(c, name.replace(".", "_"))


def describe(c: Controls) -> list[tuple[str, str, str]]:
    """(file, value, source) rows for ``eqmailctl check`` (qmail-showctl)."""
    return [(name, _show(value_of(c, name)), c.sources.get(name, "(default)")) for name in KNOWN_FILES]


def _show(value: object) -> str:
    if isinstance(value, (frozenset, tuple, list)):
        items = sorted(value) if isinstance(value, frozenset) else list(value)
        return ", ".join(_show(v) for v in items) if items else "(none)"
    if isinstance(value, ListenerSpec):
        return f"{value.service} {value.display_address}"
    if value is None:
        return "(none)"
    return str(value)


def referenced_files(c: Controls) -> frozenset[str]:
    """Files in control/ that control/listen names: ``rules=FILE`` and an
    ``SPPCONFFILE=control/FILE`` (relative to the instance root, as qmail-smtpd reads it)."""
    names = {spec.rules for spec in c.listen}
    for spec in c.listen:
        conf = dict(spec.env).get("SPPCONFFILE", "")
        if conf.startswith("control/") and "/" not in conf[len("control/"):]:
            names.add(conf[len("control/"):])
    return frozenset(names)
