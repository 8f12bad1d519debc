#!/usr/bin/env python3
"""An atheris (libFuzzer) target for the PROXY protocol parser, eqmail.smtp.proxy.

Input layout: byte 0 is the largest piece the rest is fed in (0: all at once); the rest
is what a balancer (or anyone) sends first.  Checked on every input: only ProxyError
escapes; each feed takes at most what it was given; a complete header was taken whole
and not a byte more (its length is what was consumed), and feeding the same bytes at
once gives the same header; once complete the parser takes nothing more.

Run:  python tests/fuzz/fuzz_proxy.py -max_total_time=60 -dict=tests/fuzz/proxy.dict CORPUS_DIR
(tests/fuzz/test_fuzz_proxy.py runs it for a bounded time in the test suite.)
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["eqmail"]):
    from eqmail.smtp.proxy import ProxyError, ProxyHeader, ProxyParser


def feed(data: bytes, step: int) -> tuple[ProxyHeader | None, int, bool]:
    """The header, the bytes taken, and whether ProxyError was raised."""
    parser = ProxyParser()
    taken = 0
    try:
        for pos in range(0, len(data), step):
            piece = data[pos:pos + step]
            got = parser.feed(piece)
            if not 0 <= got <= len(piece):
                raise AssertionError(f"took {got} of {len(piece)}")
            if parser.header is None and got != len(piece):
                raise AssertionError("left bytes before the header was complete")
            taken += got
            if parser.header is not None:
                if parser.feed(data[pos + step:pos + step + 8]) != 0:
                    raise AssertionError("took bytes after a complete header")
                break
        else:
            parser.eof()
    except ProxyError:
        return None, taken, True
    return parser.header, taken, False


def run_one(data: bytes) -> None:
    step = (data[0] if data else 0) or max(1, len(data) - 1)
    stream = data[1:]
    header, taken, failed = feed(stream, step)
    whole, whole_taken, whole_failed = feed(stream, max(1, len(stream)))
    if (header, failed) != (whole, whole_failed):
        raise AssertionError(f"split feeding gives {header} ({failed}), whole {whole} ({whole_failed})")
    if header is not None and not header.length == taken == whole_taken:
        raise AssertionError(f"header of {header.length} bytes, {taken} / {whole_taken} taken")


def TestOneInput(data: bytes) -> None:  # noqa: N802 - libFuzzer's name
    run_one(data)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
