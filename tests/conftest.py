"""Shared fixtures: a running eqmail instance per test (see tests/harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Instance  # noqa: E402


@pytest.fixture
def instance() -> Iterator[Instance]:
    """A set-up instance, not started (tests adjust control/ first, then start)."""
    inst = Instance.create()
    try:
        yield inst
    finally:
        inst.destroy()


@pytest.fixture
def running(instance: Instance) -> Instance:
    instance.start()
    return instance
