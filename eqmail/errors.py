"""Exceptions shared across eqmail.

ControlFileError names the file and line of a bad control value, the way an admin
wants to see it (``control/databytes:1: not a number``).
"""

from __future__ import annotations


class ControlFileError(Exception):
    """A control (or users/assign, .qmail, tcp.smtp) file has a value eqmail refuses."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file = file
        self.line = line
        self.reason = reason


class ControlErrors(Exception):
    """Several ControlFileErrors found in one pass over the control directory."""

    def __init__(self, errors: list[ControlFileError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors
