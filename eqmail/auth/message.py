"""The header fields of a received message, as the authentication checks read them.

Pure and bounded: at most :data:`MAX_FIELDS` fields of the header section (up to the
first empty line, LF or CRLF line ends) are returned, unfolded, with the names as they
were written.  Nothing here trusts the message: a line that is neither a field nor a
continuation ends nothing and is skipped (dkimpy and the DMARC From: rule see the same
fields because they all stop at the same empty line).
"""

from __future__ import annotations

import re

MAX_FIELDS = 1000
MAX_HEADER = 1 << 20   # bytes of the header section read (the listener bounds it anyway)

_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:(.*)", re.S)


def header_fields(message: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, unfolded value without the line end) for each field."""
    fields: list[tuple[str, bytes]] = []
    current: list[bytes] | None = None
    name = ""
    # only the header section is split into lines (it ends at the first empty line; the
    # loop below stops there too), not the body
    end = message.find(b"\n\n", 0, MAX_HEADER)
    end2 = message.find(b"\n\r\n", 0, MAX_HEADER)
    if end2 >= 0 and (end < 0 or end2 < end):
        end = end2
    head = message[:end + 1] if end >= 0 else message[:MAX_HEADER]
    for raw in head.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        if current is not None:
            fields.append((name, b"".join(current)))
            current = None
            if len(fields) >= MAX_FIELDS:
                return fields
        if not line:
            break
        m = _FIELD.fullmatch(line)
        if m is not None:
            name, current = m.group(1).decode("ascii").lower(), [m.group(2)]
    if current is not None:
        fields.append((name, b"".join(current)))
    return fields
