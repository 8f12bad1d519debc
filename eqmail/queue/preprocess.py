"""qmail-send's todo_do: preprocessing todo/ entries into info/, local/ and remote/.

Runs inside the scanner worker as eqmails; the QueueManager (eqmail.queue.manager)
owns one Preprocessor and delegates ``process_todo``, ``preprocess`` and
``preprocess_batch`` to it.  Input: todo/ entries (envelope records,
eqmail.queue.envelope) and the size of their mess/ file.  Output: info/ (the sender, and
the origin the queue writer recorded and the REQUIRETLS record, docs/queue-format.md)
and a local/ and/or remote/ channel file (recipients rewritten by eqmail.queue.rewrite),
then a clean request that removes todo/ (and intd/) through the queue writer, because
the scanner cannot write there; the manager's ``schedule`` callback then schedules the
channels (S5).

Crash safety is the order of preprocess_batch's steps: info/ and the channel files are
durable before todo/ is cleaned, so a crash anywhere leaves todo/ in place and the
message is preprocessed again from scratch — never lost, never half-split.

Failures: an unreadable todo/, a failed write (disk full, I/O error), a failed sync or
a refused clean request leave the entry in todo/ and set ``trouble``; the scanner reads
and resets it (as QueueManager.todo_trouble) to try again soon instead of at its next
periodic rescan.

Also kept here: what was just written, for the message's first pass (``take_fresh``),
which then reads no file back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from eqmail import srs
from eqmail.ipc.queue import CleanAnswer, CleanRequest, Origin
from eqmail.log import log, log_lines, sanitize
from eqmail.queue.bounce import bounce_note
from eqmail.queue.envelope import (
    ChannelRecord,
    info_bytes,
    origin_of,
    parse_records,
    requiretls_of,
)
from eqmail.queue.fileio import read_bounded, unlink_quiet, write_all
from eqmail.queue.layout import QueuePaths
from eqmail.queue.recycle import InodePool
from eqmail.queue.schedule import Channel
from eqmail.queue.writer import syncfs
from eqmail.srs import SrsKeys
from eqmail.textio import encode

FRESH_MAX = 20000  # messages whose split is remembered for their first pass

Cleaner = Callable[[list[CleanRequest]], list[CleanAnswer]]  # pipelined qmail-clean requests
Rewriter = Callable[[str], tuple[Channel, str]]  # a recipient -> its channel and address
Scheduler = Callable[[int, list[Channel], float], None]  # (msgid, channels with a file, now)
# (sender, birth, records, origin, requiretls)
Fresh = tuple[str, float, list[ChannelRecord], Origin | None, bool]


class Preprocessor:
    def __init__(self, paths: QueuePaths, cleaner: Cleaner, spares: InodePool, root_fd: int,
                 rewriter: Rewriter, schedule: Scheduler,
                 clock: Callable[[], float] = time.time) -> None:
        self.paths = paths
        self.clean = cleaner
        # info/ and channel files are recycled, not unlinked and re-created (eqmail.queue.recycle);
        # the pool is the manager's, which gives finished files back to it
        self.spares = spares
        self.root_fd = root_fd  # for syncfs: the queue's filesystem
        # the rewriting rules are the manager's, which rereads them on HUP
        self.rewrite = rewriter
        self.schedule = schedule
        self.clock = clock
        # set when a todo/ entry could not be preprocessed (disk full, I/O error): the
        # scanner tries again soon instead of at its next periodic rescan
        self.trouble = False
        # SRS reversal of recipients (eqmail.srs); set by the manager's configure()
        self.srs: SrsKeys | None = None
        # what preprocessing wrote, for the first pass: (channel, id) -> (sender, birth, records)
        self.fresh: dict[tuple[Channel, int], Fresh] = {}

    def process_todo(self, limit: int | None = None) -> int:
        """Preprocess todo entries (all, or at most ``limit``); returns how many."""
        ids = sorted(self.paths.ids_in("todo"))
        if limit is not None:
            ids = ids[:limit]
        return self.preprocess_batch(ids)

    def preprocess(self, msgid: int) -> bool:
        return self.preprocess_batch([msgid]) == 1

    def preprocess_batch(self, ids: list[int]) -> int:
        """qmail-send's todo_do for several messages at once, with one durability
        barrier for all of them (group commit, as the queue writer does):

        1. write info/ and local/ / remote/ for every message;
        2. make them durable: fsync of each file for one message, one syncfs for more;
        3. only then ask the cleaner to remove todo/ (and intd/), pipelined;
        4. schedule the channels (S5).

        A crash anywhere leaves todo/ in place, so the message is preprocessed again from
        scratch — never lost, never half-split."""
        written: list[tuple[int, list[int]]] = []
        channels: dict[int, list[Channel]] = {}  # the channel files each message got
        for msgid in ids:
            split = self._split_one(msgid)
            if split is not None:
                written.append((msgid, split[0]))
                channels[msgid] = split[1]
        if not written:
            return 0
        try:
            self._barrier([fd for _, fds in written for fd in fds])
        except OSError as e:
            log(f"warning: trouble syncing preprocessed messages: {e.strerror}; will try again later")
            self.trouble = True
            for msgid, _ in written:
                self.forget(msgid)
            return 0
        finally:
            for _, fds in written:
                for fd in fds:
                    os.close(fd)
        answers = self.clean([CleanRequest.todo(msgid) for msgid, _ in written])
        now = self.clock()
        done = 0
        for (msgid, _), answer in zip(written, answers, strict=True):
            if answer is not CleanAnswer.DONE:
                log(f"warning: qmail-clean unable to clean up todo/{msgid}")
                self.trouble = True
                self.forget(msgid)
                continue
            done += 1
            self.schedule(msgid, channels[msgid], now)
        return done

    def _barrier(self, fds: list[int]) -> None:
        if len(fds) <= 3:  # one message: its info and channel files
            for fd in fds:
                os.fsync(fd)
        else:
            syncfs(self.root_fd)

    def _split_one(self, msgid: int) -> tuple[list[int], list[Channel]] | None:
        """Step 1 for one message; returns the open fds of the files written and the
        channels that got a file."""
        p = self.paths
        try:
            data = read_bounded(p.todo(msgid), 64 << 20)
            size = os.stat(p.mess(msgid)).st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            log(f"warning: unable to open todo/{msgid}: {e.strerror}")
            self.trouble = True
            return None
        # Leftovers of an earlier, interrupted preprocessing (qmail-send unlinks them
        # unconditionally): info/ is always created first, so without it there are none.
        if os.path.exists(p.info(msgid)):
            for name in ("local", "remote", "info"):
                unlink_quiet(p.split_file(name, msgid))
            unlink_quiet(p.bounce(msgid))  # only _srs_bounce writes it before todo/ goes
        try:
            return self._write_split(msgid, data, size)
        except OSError as e:
            log(f"warning: trouble preprocessing msg {msgid}: {e.strerror}; will try again later")
            self.trouble = True
            return None

    def _create(self, path: os.PathLike[str] | str) -> int:
        """A new, empty info/ or channel file: a spare one renamed, else created."""
        spare = self.spares.take(lambda _ino: path)
        if spare is not None:
            return spare[0]
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def _write_split(self, msgid: int, data: bytes, size: int) -> tuple[list[int], list[Channel]]:
        p = self.paths
        info_fd = self._create(p.info(msgid))
        fds = [info_fd]
        buffers: dict[Channel, list[bytes]] = {Channel.LOCAL: [], Channel.REMOTE: []}
        addrs: dict[Channel, list[str]] = {Channel.LOCAL: [], Channel.REMOTE: []}
        uid = pid = "?"
        sender = ""
        lines = [f"new msg {msgid}"]
        records = parse_records(data)
        origin = origin_of(records)  # after the T records in todo/, but info/ wants it now
        requiretls = requiretls_of(records)
        refused: list[tuple[str, srs.Refusal]] = []  # forged or expired SRS recipients
        try:
            for rec in records:
                if rec.kind == "u":
                    uid = rec.value
                elif rec.kind == "p":
                    pid = rec.value
                elif rec.kind == "F":
                    sender = rec.value
                    write_all(info_fd, info_bytes(rec.value, origin, requiretls))
                    lines.append(f"info msg {msgid}: bytes {size} from <{sanitize(rec.value)}> "
                                 f"qp {pid} uid {uid}")
                elif rec.kind == "T":
                    target = self._srs_reverse(msgid, rec.value, lines)
                    if isinstance(target, srs.Refusal):
                        refused.append((rec.value, target))
                        continue
                    ch, addr = self.rewrite(target)
                    buffers[ch].append(b"T" + encode(addr) + b"\0")
                    addrs[ch].append(addr)
                elif rec.kind != "X":  # X: eqmail's extension records, read above
                    lines.append(f"warning: unknown record type in todo/{msgid}")
            for ch, recs in buffers.items():
                if recs:
                    fd = self._create(p.split_file(ch.dirname, msgid))
                    fds.append(fd)
                    write_all(fd, b"".join(recs))
            if refused:
                fds.append(self._srs_bounce(msgid, refused))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        log_lines(lines)
        self._remember(msgid, sender, buffers, addrs, origin, requiretls)
        return fds, [ch for ch, recs in buffers.items() if recs]

    # ------------------------------------------------------------ SRS reversal
    def _srs_reverse(self, msgid: int, addr: str, lines: list[str]) -> str | srs.Refusal:
        """The SRS step, before qmail-send's rewriting: a recipient that is an SRS
        address at our SRS domain becomes the address it stands for (SRS0: the original
        sender, SRS1: the first forwarder's SRS0 address), which is then rewritten and
        delivered like any address — so a bounce to a forwarded message goes back to
        its sender.  A forged, altered or expired SRS address gives the refusal (the
        recipient bounces with its reason); anything else is returned unchanged."""
        keys = self.srs
        if keys is None or not keys.ours(addr):
            return addr
        result = srs.reverse(addr, keys, self.clock())
        if isinstance(result, srs.Refusal):
            lines.append(f"info msg {msgid}: SRS: refused <{sanitize(addr)}>: {result.value}")
            return result
        lines.append(f"info msg {msgid}: SRS: <{sanitize(addr)}> reversed to <{sanitize(result)}>")
        return result

    def _srs_bounce(self, msgid: int, refused: list[tuple[str, srs.Refusal]]) -> int:
        """bounce/<id> with a note for each refused SRS recipient, written with the other
        files of step 1 (made durable with them, before todo/ is cleaned): the bounce
        goes out when the message is done, as for any failed recipient.  A leftover of
        an interrupted preprocessing is truncated, so no note is doubled."""
        notes = "".join(bounce_note(addr, srs.bounce_text(why)) for addr, why in refused)
        fd = os.open(self.paths.bounce(msgid), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, encode(notes))
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ------------------------------------------------------------ first-pass memory
    def take_fresh(self, channel: Channel, msgid: int) -> Fresh | None:
        """What preprocessing wrote for this channel file, once (its first pass)."""
        return self.fresh.pop((channel, msgid), None)

    def forget(self, msgid: int) -> None:
        for ch in Channel:
            self.fresh.pop((ch, msgid), None)

    def _remember(self, msgid: int, sender: str, buffers: dict[Channel, list[bytes]],
                  addrs: dict[Channel, list[str]], origin: Origin | None,
                  requiretls: bool) -> None:
        """Keep what was just written for the first pass, which then reads no file
        back (info/ and the channel files are still the truth for every later pass and
        after a restart).  Bounded: beyond FRESH_MAX messages the files are read."""
        if len(self.fresh) >= FRESH_MAX:
            return
        birth = self.clock()
        for ch, recs in buffers.items():
            if recs:
                offsets = [0]
                for rec in recs[:-1]:
                    offsets.append(offsets[-1] + len(rec))
                records = [ChannelRecord(off, False, addr) for off, addr in zip(offsets, addrs[ch], strict=True)]
                self.fresh[(ch, msgid)] = (sender, birth, records, origin, requiretls)
