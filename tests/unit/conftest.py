"""Fixtures shared by the unit tests of one subject across files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from eqmail.queue.layout import create_queue
from eqmail.queue.writer import QueueStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    """A QueueStore on a fresh private queue tree (the writer's and the prepend tests)."""
    create_queue(tmp_path / "queue")
    s = QueueStore(tmp_path / "queue")
    yield s
    os.close(s.root_fd)
