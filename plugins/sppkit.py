"""Helpers shared by eqmail's shipped qmail-spp plugins (not a plugin itself).

Each plugin in this directory is a standalone program (``#!/usr/bin/env python3``)
that works under eQmail's qmail-smtpd too, and a module the eqmail plugin sandbox
imports once and calls in-process: ``check(env) -> str`` (or ``async acheck(env)``)
returns the qmail-spp output lines.  Both run with the qmail home (the instance root)
as the current directory, so control files are read from ``control/``.

Control files are re-read when they change (one stat per use), so an edit applies to
the next SMTP command without restarting the sandbox.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

_cache: dict[str, tuple[tuple[int, int, int] | None, Any]] = {}
_lock = threading.Lock()


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def cached(path: str, build: Callable[[str | None], Any]) -> Any:
    """``build(text_or_None)`` of a file, rebuilt when the file changes."""
    stamp = _stamp(path)
    with _lock:
        hit = _cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text: str | None = f.read(1 << 22)
    except OSError:
        text = None
    value = build(text)
    with _lock:
        _cache[path] = (stamp, value)
    return value


def _lines(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    out = (ln.rstrip(" \t\r") for ln in text.split("\n"))
    return tuple(ln for ln in out if ln and not ln.startswith("#"))


def control_lines(name: str) -> tuple[str, ...]:
    """qmail's list files: trailing blanks stripped, empty and # lines dropped."""
    return cached(os.path.join("control", name), _lines)


def control_int(name: str, default: int) -> int:
    lines = control_lines(name)
    first = lines[0].strip() if lines else ""
    return int(first) if first.isdigit() else default


def trusted(env: Mapping[str, str]) -> bool:
    """A relay client or an authenticated one: checks meant for strangers are skipped."""
    return "RELAYCLIENT" in env or bool(env.get("SMTPAUTHUSER"))


def _make_resolver(text: str | None) -> Any:
    import dns.resolver

    servers = _lines(text)
    if not servers:
        res = dns.resolver.Resolver()
    else:
        res = dns.resolver.Resolver(configure=False)
        nameservers = []
        for entry in servers:
            host, port = entry, 53
            if entry.startswith("["):
                host, _, rest = entry[1:].partition("]")
                port = int(rest[1:]) if rest.startswith(":") else 53
            elif entry.count(":") == 1:
                host, _, p = entry.partition(":")
                port = int(p)
            nameservers.append(dns.nameserver.Do53Nameserver(host, port))
        res.nameservers = nameservers
    res.lifetime = 10.0
    res.timeout = 3.0
    return res


def resolver() -> Any:
    """A dnspython resolver: control/dnsservers (``ip[:port]``, eqmail's file) or the
    system's /etc/resolv.conf."""
    import dns.nameserver  # noqa: F401  (used by _make_resolver)

    return cached(os.path.join("control", "dnsservers"), _make_resolver)


def main(plugin: Callable[[dict[str, str]], Any]) -> None:
    """Run ``check`` / ``acheck`` as a qmail-spp program: env in, lines on stdout."""
    env = dict(os.environ)
    result = plugin(env)
    if inspect.isawaitable(result):
        result = asyncio.run(result)  # type: ignore[arg-type]
    sys.stdout.write(result)
    sys.stdout.flush()
