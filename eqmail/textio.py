"""Byte-exact text handling for envelope data.

qmail treats addresses and header text as bytes.  eqmail keeps them as ``str`` in memory,
decoded from UTF-8 with ``surrogateescape`` so that *any* byte sequence round-trips: an
address that arrives as arbitrary 8-bit bytes is written to the queue exactly as received.
"""

from __future__ import annotations


def decode(data: bytes) -> str:
    """Bytes from the wire or the queue -> str, losslessly."""
    return data.decode("utf-8", "surrogateescape")


def encode(text: str) -> bytes:
    """The inverse of :func:`decode`."""
    return text.encode("utf-8", "surrogateescape")
