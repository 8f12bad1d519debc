"""The spare-inode pool (eqmail.queue.recycle): finished queue files renamed, not unlinked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eqmail.queue.recycle import InodePool


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    d = tmp_path / "spare"
    d.mkdir()
    return d


def test_empty_pool_gives_nothing_and_the_caller_creates(pool_dir: Path, tmp_path: Path) -> None:
    assert InodePool(pool_dir).take(lambda ino: tmp_path / f"m{ino}") is None


def test_given_file_is_taken_back_empty_under_its_new_name(pool_dir: Path, tmp_path: Path) -> None:
    pool = InodePool(pool_dir)
    old = tmp_path / "info-17"
    old.write_bytes(b"Fsender@example.org\0")
    ino = old.stat().st_ino
    assert pool.give(old) is True
    pool.settle()
    assert not old.exists() and len(pool) == 1 and len(os.listdir(pool_dir)) == 1
    taken = pool.take(lambda i: tmp_path / f"mess-{i}")
    assert taken is not None
    fd, got = taken
    os.write(fd, b"new")
    os.close(fd)
    assert got == ino and (tmp_path / f"mess-{ino}").read_bytes() == b"new"
    assert os.listdir(pool_dir) == [] and len(pool) == 0


def test_give_of_a_missing_file_is_false_and_data_is_freed_in_the_background(pool_dir: Path,
                                                                              tmp_path: Path) -> None:
    pool = InodePool(pool_dir)
    assert pool.give(tmp_path / "absent") is False
    f = tmp_path / "big"
    f.write_bytes(b"x" * 100_000)
    assert pool.give(f)
    pool.settle()
    [name] = os.listdir(pool_dir)
    assert (pool_dir / name).stat().st_size == 0 and len(pool) == 1


def test_full_pool_unlinks_and_a_second_name_is_never_pooled(pool_dir: Path, tmp_path: Path) -> None:
    pool = InodePool(pool_dir, limit=1)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    assert pool.give(a) and pool.give(b)
    pool.settle()
    assert not b.exists() and len(os.listdir(pool_dir)) == 1
    (tmp_path / "spare2").mkdir()
    pool2 = InodePool(tmp_path / "spare2")
    linked, other = tmp_path / "todo", tmp_path / "intd"
    linked.write_bytes(b"T")
    os.link(linked, other)  # a todo file whose intd name still exists
    assert pool2.give(linked) is True
    assert not linked.exists() and other.exists() and len(pool2) == 0


def test_leftovers_of_an_earlier_run_are_adopted(pool_dir: Path, tmp_path: Path) -> None:
    (pool_dir / "s1.99").write_bytes(b"old")
    (pool_dir / "junkdir").mkdir()
    pool = InodePool(pool_dir)
    assert len(pool) == 1
    taken = pool.take(lambda i: tmp_path / "x")
    assert taken is not None
    os.close(taken[0])
    assert (tmp_path / "x").read_bytes() == b""


def test_missing_pool_directory_means_create_and_unlink(tmp_path: Path) -> None:
    pool = InodePool(tmp_path / "nope")
    f = tmp_path / "f"
    f.write_bytes(b"1")
    assert not pool.enabled and pool.give(f) and not f.exists()
    assert pool.take(lambda i: tmp_path / "g") is None


def test_missing_target_directory_keeps_the_spare(pool_dir: Path, tmp_path: Path) -> None:
    pool = InodePool(pool_dir)
    f = tmp_path / "f"
    f.write_bytes(b"1")
    pool.give(f)
    pool.settle()
    with pytest.raises(FileNotFoundError):
        pool.take(lambda i: tmp_path / "no-such-dir" / str(i))
    assert len(pool) == 1 and len(os.listdir(pool_dir)) == 1


def test_a_file_someone_has_open_is_unlinked_not_recycled(pool_dir: Path, tmp_path: Path) -> None:
    # a delivery may still read a mess file (its scanner was killed and the message was
    # finished by the next one): recycling would empty and rewrite it under that reader
    import subprocess
    import sys

    f = tmp_path / "mess-1"
    f.write_bytes(b"Subject: still being read\n\nbody\n")
    reader = subprocess.Popen([sys.executable, "-c", "import sys, time\nf = open(sys.argv[1], 'rb')\n"
                               "print('open', flush=True)\ntime.sleep(30)\nsys.stdout.write(f.read().decode())",
                               str(f)], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "open\n"
        pool = InodePool(pool_dir)
        assert pool.give(f) is True
        assert not f.exists() and os.listdir(pool_dir) == [] and len(pool) == 0
    finally:
        reader.kill()
        reader.wait()
    # and with nobody reading, the same kind of file is recycled
    g = tmp_path / "mess-2"
    g.write_bytes(b"x")
    assert pool.give(g) and len(os.listdir(pool_dir)) == 1



def test_take_never_replaces_an_existing_name(pool_dir: Path, tmp_path: Path) -> None:
    # O_EXCL's guarantee: a name that already exists (e.g. mess/<n>/<id> in a copied
    # queue, where names do not match inodes) is an error, and the spare stays spare
    pool = InodePool(pool_dir)
    f = tmp_path / "old"
    f.write_bytes(b"")
    pool.give(f)
    victim = tmp_path / "queued"
    victim.write_bytes(b"a queued message")
    with pytest.raises(FileExistsError):
        pool.take(lambda i: victim)
    assert victim.read_bytes() == b"a queued message" and len(pool) == 1
