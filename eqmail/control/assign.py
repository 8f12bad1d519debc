"""users/assign (qmail-users(5)) compiled in memory: what qmail-newu puts into users/cdb.

Parsed here, with the other control files, so a configuration that reaches a worker
already holds it (the listener's RCPT check and the local worker's user lookup both use
it); the lookup rules that also consult the password database are in
:mod:`eqmail.delivery.users`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from eqmail.errors import ControlFileError

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lowercase A-Z only, like qmail's case_lowerb: other bytes are left as they are."""
    return text.translate(_ASCII_LOWER)


@dataclass(frozen=True)
class UserEntry:
    """The six values qmail-lspawn passes to qmail-local for one recipient."""

    user: str
    uid: int
    gid: int
    home: str
    dash: str
    ext: str


class Assign:
    """``users/assign`` compiled in memory (what qmail-newu puts into ``users/cdb``)."""

    def __init__(self, exact: dict[str, UserEntry], wild: dict[str, UserEntry]) -> None:
        self._exact = exact
        self._wild = wild
        # Longest first: qmail-lspawn tries wildcard prefixes from the longest down.
        self._wild_lengths = sorted({len(prefix) for prefix in wild}, reverse=True)

    def __eq__(self, other: object) -> bool:  # a reload compares configurations
        if not isinstance(other, Assign):
            return NotImplemented
        return (self._exact, self._wild) == (other._exact, other._wild)

    def __hash__(self) -> int:
        return hash((frozenset(self._exact.items()), frozenset(self._wild.items())))

    def __reduce__(self) -> tuple[type[Assign], tuple[dict[str, UserEntry], dict[str, UserEntry]]]:
        # Pickled only for a reload's push to running listeners (eqmail.ipc.config),
        # whose unpickler admits this class by name: the two tables, nothing derived.
        return Assign, (self._exact, self._wild)

    @classmethod
    def parse(cls, text: str, filename: str = "users/assign") -> Assign:
        """Compile assign text; raise ControlFileError naming the first bad line.

        The file must end with a line ``.`` (qmail-users(5)); anything after it is
        ignored.  A file without it is refused, because a truncated file would silently
        drop the assignments that were cut off.
        """
        exact: dict[str, UserEntry] = {}
        wild: dict[str, UserEntry] = {}
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            if line == ".":
                return cls(exact, wild)
            if number == len(lines):
                # Text after the last newline (or an empty file): no terminating dot.
                break
            kind, key, entry = _parse_assign_line(line, filename, number)
            table = exact if kind == "=" else wild
            # First assignment wins for duplicates, as with qmail-newu's cdb.
            table.setdefault(ascii_lower(key), entry)
        raise ControlFileError(filename, len(lines), "missing final line '.'")

    def lookup(self, local: str) -> UserEntry | None:
        """Exact (case-insensitive) match first, then the longest matching wildcard.

        A wildcard hit appends the rest of the local part, in its original case, to the
        entry's ext (``+joe-:joe:...:-::`` maps ``joe-Foo`` to ext ``Foo``).
        """
        lower = ascii_lower(local)
        entry = self._exact.get(lower)
        if entry is not None:
            return entry
        for length in self._wild_lengths:
            if length > len(lower):
                continue
            entry = self._wild.get(lower[:length])
            if entry is not None:
                return replace(entry, ext=entry.ext + local[length:])
        return None


def _parse_assign_line(line: str, filename: str, number: int) -> tuple[str, str, UserEntry]:
    """One ``=local:user:uid:gid:home:dash:ext:`` or ``+prefix:...:pre:`` line."""

    def bad(reason: str) -> ControlFileError:
        return ControlFileError(filename, number, reason)

    if not line or line[0] not in "=+":
        raise bad("line must start with '=' or '+' (or be '.' to end the file)")
    if "\0" in line:
        raise bad("NUL byte in line")
    fields = line[1:].split(":")
    if len(fields) != 8 or fields[7] != "":
        raise bad("expected 7 fields each ended by ':' (local:user:uid:gid:home:dash:ext:)")
    key, user, uid, gid, home, dash, ext = fields[:7]
    if not user:
        raise bad("empty user name")
    for label, value in (("uid", uid), ("gid", gid)):
        if not (value.isascii() and value.isdigit()):
            raise bad(f"{label} {value!r} is not a decimal number")
    if not home.startswith("/"):
        raise bad(f"home directory {home!r} is not an absolute path")
    return line[0], key, UserEntry(user, int(uid), int(gid), home, dash, ext)
