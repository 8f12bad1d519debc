"""Every control file, parsed in one place into one frozen value.

Owns: reading ``<root>/control`` (qmail-core §6, eQmail's additions, eqmail's own files)
and ``users/assign``.  Workers receive a :class:`Controls`; none of them opens control/
itself — the tcprules files, users/assign, authlimit and tlsclients included.  Runs in
the supervisor (and in ``eqmailctl`` for validation) — no privileges needed beyond read
access.

The modules: ``files`` is the table (name, kind, default, bounds, doc: every default
written once), ``reader`` reads files with qmail's rules, ``listen`` parses
control/listen, ``parsers`` the other files with a syntax of their own, ``values`` holds
:class:`Controls`, ``load`` builds it with one constructor call, ``show`` gives
``eqmailctl check`` its rows.  Importers use this package's names.

qmail's reading rules: single-line files use the first line with trailing spaces and
tabs removed; list files drop empty lines and lines starting with ``#``.  Defaults that
say "me" fall back to control/me.  Where qmail silently keeps a default for a value it
cannot parse (a non-numeric ``databytes``), eqmail refuses the whole configuration and
names the file and line (``control/databytes:1: not a number``) — see
docs/compatibility.md.

Failure modes: :class:`ControlErrors` listing every bad file:line, or an OSError other
than "file absent" reported as ``control/<name>:0: unreadable: ...``.
"""

from eqmail.control.ciphers import TLS_INTERMEDIATE_CIPHERS
from eqmail.control.files import (
    FILES,
    KNOWN_FILES,
    OTHER_KNOWN_FILES,
    PLUGIN_FILES,
    SPAWN_LIMIT,
    known_file,
)
from eqmail.control.listen import (
    LISTEN_SERVICES,
    ListenerSpec,
    default_listeners,
    parse_listen_line,
)
from eqmail.control.load import InjectControls, load_controls, load_inject_controls
from eqmail.control.parsers import parse_route_value
from eqmail.control.reader import MAX_CONTROL_BYTES
from eqmail.control.show import describe, referenced_files, value_of
from eqmail.control.values import Controls, DmarcAction, FileStamp, Route

__all__ = [
    "FILES", "KNOWN_FILES", "LISTEN_SERVICES", "MAX_CONTROL_BYTES", "OTHER_KNOWN_FILES",
    "PLUGIN_FILES", "SPAWN_LIMIT", "TLS_INTERMEDIATE_CIPHERS", "Controls", "DmarcAction", "FileStamp",
    "InjectControls", "ListenerSpec", "Route", "default_listeners", "describe", "known_file",
    "load_controls", "load_inject_controls", "parse_listen_line", "parse_route_value",
    "referenced_files", "value_of",
]
