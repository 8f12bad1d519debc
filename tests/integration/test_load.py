"""500 concurrent SMTP clients with good and bad behaviour (issue 8, part 4).

One instance with one listener (``concurrency=1000``: tcpserver's -c is the admin's
knob; with fewer slots than clients, slow clients would fill them by design), no
per-client limit (every client is 127.0.0.1) and no junk-command limit (see server()).  For
LOAD_SECONDS, asyncio clients in this process keep 500 connections busy:

- GOOD clients send a message per session (EHLO, MAIL, RCPT, DATA of 2–6 KB, QUIT) and
  pause; each session's duration is recorded;
- SLOWLORIS clients send their commands one byte per second and hold their connection
  for the whole run;
- FLOOD clients pipeline thousands of commands per write, half of them reading the
  replies, half never reading (the listener must push back, not buffer);
- OVERSIZE clients send messages over ``databytes`` and must get qmail's 552;
- ABRUPT clients break off at a random point (mid-command, mid-DATA), some with a RST.

Asserted: every good session got its 250 and every acknowledged message is in the
Maildir, whole; no good session failed; the p99 of good sessions' durations is bounded;
the listener's RSS (sampled from /proc during the run) stays under RSS_CAP_MB; the
listener was never restarted and nothing logged an ``alert:``; the queue ends empty.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import statistics
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from harness import ME, Instance, free_port, queue_files, rss_kb, worker_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LOAD_SECONDS = 60.0  # issue 8: 500 clients for 60 s
GOOD, SLOWLORIS, FLOOD, OVERSIZE, ABRUPT = 200, 100, 60, 40, 100
DATABYTES = 200_000
RSS_CAP_MB = 300
BURST = 500
P99_CAP = 10.0      # seconds, for a good session from connect to 250 (2 cores, shared with the clients)
RCPT = f"testuser@{ME}"
HOST = "127.0.0.1"


@dataclass
class Stats:
    durations: list[float] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    good_failures: list[str] = field(default_factory=list)
    tempfails: list[bytes] = field(default_factory=list)  # 451 at the end of DATA
    oversize_replies: list[bytes] = field(default_factory=list)
    slowloris_kept: int = 0  # slow clients served to the end of the run
    flood_bytes: int = 0
    abrupt: int = 0


class Client:
    """A minimal SMTP client on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        r, w = await asyncio.open_connection(HOST, port, limit=1 << 20)
        return cls(r, w)

    async def reply(self) -> tuple[int, bytes]:
        """One (possibly multi-line) reply: its code and last line."""
        while True:
            line = await self.r.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return int(line[:3]), line.rstrip()

    async def cmd(self, line: bytes, want: int) -> bytes:
        self.w.write(line + b"\r\n")
        code, text = await self.reply()
        if code != want:
            raise AssertionError(f"{line!r} -> {text!r}")
        return text

    def abort(self) -> None:
        """Close with a RST (SO_LINGER 0)."""
        sock = self.w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.w.close()


def body(tag: str, size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstu\r\n"
    return (f"Subject: load {tag}\r\n\r\n".encode() + line * (size // len(line))
            + b"..leading dot\r\n" + f"END {tag}\r\n".encode())  # dot-stuffed


async def good(port: int, stats: Stats, until: float, rng: random.Random) -> None:
    await asyncio.sleep(rng.uniform(0, 2))
    tag = uuid.uuid4().hex
    while time.monotonic() < until:
        t0 = time.monotonic()
        try:
            c = await Client.connect(port)
            try:
                assert (await c.reply())[0] == 220
                await c.cmd(b"EHLO good.test", 250)
                await c.cmd(f"MAIL FROM:<good-{tag}@good.test>".encode(), 250)
                await c.cmd(f"RCPT TO:<{RCPT}>".encode(), 250)
                await c.cmd(b"DATA", 354)
                c.w.write(body(tag, 2000 + int(tag[:3], 16)) + b".\r\n")
                code, text = await c.reply()
                if code == 451:  # temporary: a client keeps the message and tries again
                    stats.tempfails.append(text)
                elif code != 250:
                    raise AssertionError(f"end of DATA -> {text!r}")
                else:
                    stats.acked.add(tag)
                    stats.durations.append(time.monotonic() - t0)
                    tag = uuid.uuid4().hex
                c.w.write(b"QUIT\r\n")
                await c.reply()
            finally:
                c.w.close()
        except (OSError, AssertionError, ConnectionError, ValueError) as e:
            stats.good_failures.append(f"{tag}: {e!r}")
        await asyncio.sleep(rng.uniform(1.5, 3.5))


async def slowloris(port: int, stats: Stats, until: float, rng: random.Random) -> None:
    await asyncio.sleep(rng.uniform(0, 2))
    script = b"EHLO slow.test\r\nMAIL FROM:<slow@slow.test>\r\nRCPT TO:<" + RCPT.encode() + b">\r\nDATA\r\n"
    try:
        c = await Client.connect(port)
    except OSError:
        return
    try:
        await c.reply()
        i = 0
        while time.monotonic() < until:
            c.w.write(script[i % len(script):i % len(script) + 1])
            await c.w.drain()
            i += 1
            await asyncio.sleep(1.0)
        if c.r.at_eof():
            return
        stats.slowloris_kept += 1
    except (OSError, ConnectionError):
        return
    finally:
        c.w.close()


async def flood(port: int, stats: Stats, until: float, rng: random.Random, reads: bool) -> None:
    await asyncio.sleep(rng.uniform(0, 2))
    batch = (b"NOOP\r\nRSET\r\nMAIL FROM:<f@flood.test>\r\nRCPT TO:<" + RCPT.encode()
             + b">\r\nRSET\r\nVRFY x\r\n") * 500
    while time.monotonic() < until:
        try:
            c = await Client.connect(port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        drain = asyncio.ensure_future(_discard(c.r)) if reads else None
        try:
            for _ in range(rng.randint(5, 40)):
                c.w.write(batch)
                stats.flood_bytes += len(batch)
                await asyncio.wait_for(c.w.drain(), 3)  # a non-reader is pushed back here
        except (OSError, TimeoutError):
            pass
        finally:
            if drain is not None:
                drain.cancel()
            c.abort()
        await asyncio.sleep(rng.uniform(0.2, 1.0))


async def _discard(r: asyncio.StreamReader) -> None:
    while await r.read(65536):
        pass


async def oversize(port: int, stats: Stats, until: float, rng: random.Random) -> None:
    await asyncio.sleep(rng.uniform(0, 2))
    big = body("oversize", DATABYTES + 100_000)
    while time.monotonic() < until:
        try:
            c = await Client.connect(port)
            try:
                await c.reply()
                await c.cmd(b"EHLO big.test", 250)
                await c.cmd(b"MAIL FROM:<big@big.test>", 250)
                await c.cmd(f"RCPT TO:<{RCPT}>".encode(), 250)
                await c.cmd(b"DATA", 354)
                c.w.write(big + b".\r\n")
                stats.oversize_replies.append((await c.reply())[1])
                c.w.write(b"QUIT\r\n")
            finally:
                c.w.close()
        except (OSError, AssertionError, ConnectionError) as e:
            stats.oversize_replies.append(repr(e).encode())
        await asyncio.sleep(rng.uniform(0.5, 2.0))


async def abrupt(port: int, stats: Stats, until: float, rng: random.Random) -> None:
    await asyncio.sleep(rng.uniform(0, 2))
    script = (b"EHLO abrupt.test\r\nMAIL FROM:<a@abrupt.test>\r\nRCPT TO:<" + RCPT.encode()
              + b">\r\nDATA\r\n" + body("abrupt", 20_000))
    while time.monotonic() < until:
        try:
            c = await Client.connect(port)
            c.w.write(script[:rng.randint(0, len(script))])  # no final dot: never a message
            await asyncio.sleep(rng.uniform(0, 0.3))
            if rng.random() < 0.5:
                c.abort()
            else:
                c.w.close()
            stats.abrupt += 1
        except OSError:
            pass
        await asyncio.sleep(rng.uniform(0.1, 0.5))


async def load(port: int, stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    until = time.monotonic() + LOAD_SECONDS
    tasks = [good(port, stats, until, random.Random(rng.random())) for _ in range(GOOD)]
    tasks += [slowloris(port, stats, until, random.Random(rng.random())) for _ in range(SLOWLORIS)]
    tasks += [flood(port, stats, until, random.Random(rng.random()), i % 2 == 0) for i in range(FLOOD)]
    tasks += [oversize(port, stats, until, random.Random(rng.random())) for _ in range(OVERSIZE)]
    tasks += [abrupt(port, stats, until, random.Random(rng.random())) for _ in range(ABRUPT)]
    assert len(tasks) == 500
    await asyncio.wait_for(asyncio.gather(*tasks), LOAD_SECONDS + 90)


class RssSampler(threading.Thread):
    """Peak RSS (KiB) of the instance's listener processes, sampled every 0.2 s."""

    def __init__(self, inst: Instance) -> None:
        super().__init__(daemon=True)
        self.inst = inst
        self.peak = 0
        self.samples = 0
        self.pids: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            pids = worker_pids(self.inst, "eqmail: listener")
            self.pids.update(pids)
            self.peak = max(self.peak, sum(rss_kb(p) for p in pids))
            self.samples += 1


@pytest.fixture
def server() -> Iterator[tuple[Instance, int]]:
    port = free_port((HOST,))
    # All 500 clients come from one address: control/concurrencyperclient (default 50)
    # would refuse most of them, so this instance turns it off (0).  The FLOOD clients
    # pipeline NOOP/RSET/VRFY by the thousand to make the listener push back; with
    # control/smtpjunklimit (default 100) it would cut them off with 421 instead, so
    # that is off here too.  Both limits have their own tests (test_smtp_limits_live.py,
    # tests/cases/smtp/junk.txt).
    inst = Instance.create(listen=f"smtp {HOST}:{port} concurrency=1000\n",
                           extra_controls={"databytes": str(DATABYTES),
                                           "concurrencyperclient": "0", "smtpjunklimit": "0"})
    try:
        inst.start()
        yield inst, port
    finally:
        inst.destroy()


def test_500_concurrent_clients_good_and_bad(server: tuple[Instance, int]) -> None:
    inst, port = server
    listeners = worker_pids(inst, "eqmail: listener")
    sampler = RssSampler(inst)
    sampler.start()
    stats = Stats()
    t0 = time.monotonic()
    try:
        asyncio.run(load(port, stats, 8))
    finally:
        sampler.stop.set()
        sampler.join()
    load_time = time.monotonic() - t0

    assert stats.good_failures == [], stats.good_failures[:10]
    assert len(stats.acked) >= GOOD * 5, len(stats.acked)  # every good client was served repeatedly
    durations = sorted(stats.durations)
    p50 = statistics.median(durations)
    p99 = durations[int(len(durations) * 0.99) - 1]
    assert p99 < P99_CAP, (p50, p99)
    assert stats.oversize_replies and all(
        r == b"552 sorry, that message size exceeds my databytes limit (#5.3.4)"
        for r in stats.oversize_replies), set(stats.oversize_replies)
    assert stats.slowloris_kept == SLOWLORIS, "slow clients were cut off before timeoutsmtpd"
    assert sampler.peak < RSS_CAP_MB * 1024, sampler.peak
    assert sampler.pids == set(listeners), "the listener was restarted"
    assert "alert:" not in inst.log()

    # nothing acknowledged is lost: every good message arrives, whole, once
    deadline = time.monotonic() + 90
    found: dict[str, bytes] = {}
    new = inst.home / "Maildir" / "new"
    while True:
        for f in new.iterdir():
            if f.name not in found:
                found[f.name] = f.read_bytes()
        tags = {m.group(1).decode() for d in found.values()
                if (m := re.search(rb"\nSubject: load (\w+)\n", d))}
        if stats.acked <= tags:
            break
        assert time.monotonic() < deadline, f"{len(stats.acked - tags)} acknowledged messages missing"
        time.sleep(0.2)
    inst.wait_queue_empty(timeout=60)
    by_tag: dict[str, list[bytes]] = {}
    for d in found.values():
        m = re.search(rb"\nSubject: load (\w+)\n", d)
        assert m, d[:300]
        by_tag.setdefault(m.group(1).decode(), []).append(d)
    assert set(by_tag) == stats.acked  # oversize, flood and abrupt sessions queued nothing
    for tag, datas in by_tag.items():
        assert len(datas) == 1, tag
        assert datas[0].endswith(b"\n.leading dot\nEND " + tag.encode() + b"\n")
    assert queue_files(inst) == []
    print(f"\nload {load_time:.0f}s: {len(stats.acked)} good messages, p50 {p50:.3f}s p99 {p99:.3f}s; "
          f"listener peak RSS {sampler.peak / 1024:.0f} MB ({sampler.samples} samples); "
          f"{len(stats.tempfails)} temporary failures {set(stats.tempfails)}; "
          f"{len(stats.oversize_replies)} oversize, {stats.abrupt} abrupt, "
          f"{stats.flood_bytes / 1e6:.0f} MB flooded")


def test_burst_of_sessions_entering_data_together_is_accepted(server: tuple[Instance, int]) -> None:
    """BURST sessions reach DATA at the same moment (each opens its queue-writer
    connection then): every one must get its 250, none a 451."""
    inst, port = server

    ready: list[int] = []

    async def one(gate: asyncio.Event, replies: list[bytes]) -> None:
        c = await Client.connect(port)
        try:
            await c.reply()
            await c.cmd(b"EHLO burst.test", 250)
            await c.cmd(b"MAIL FROM:<burst@burst.test>", 250)
            await c.cmd(f"RCPT TO:<{RCPT}>".encode(), 250)
            ready.append(1)
            await gate.wait()
            c.w.write(b"DATA\r\n" + body(uuid.uuid4().hex, 3000) + b".\r\n")
            assert (await c.reply())[0] == 354
            replies.append((await c.reply())[1])
        finally:
            c.w.close()

    async def burst() -> list[bytes]:
        gate, replies = asyncio.Event(), []
        tasks = [asyncio.ensure_future(one(gate, replies)) for _ in range(BURST)]
        deadline = time.monotonic() + 60
        while len(ready) < BURST:  # every session waits after RCPT
            assert time.monotonic() < deadline and not any(t.done() for t in tasks), len(ready)
            await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return replies

    replies = asyncio.run(burst())
    refused = [r for r in replies if not r.startswith(b"250 ok")]
    assert refused == [], f"{len(refused)} of {BURST}: {set(refused)}"
    inst.wait_for_mail(BURST, timeout=60)
