"""Shared fixtures: one long-lived pool per start method, so the many small API tests stay fast.

Tests that shut a pool down, kill its workers or break it make their own.
"""

from __future__ import annotations

import copyreg
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

import cleanbreak
from tests import tasks

START_METHODS = ("forkserver", "spawn", "fork")


@pytest.fixture(scope="session", params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    """Each start method in turn. Session scope lets pytest group the tests by method."""
    return cast(str, request.param)


@pytest.fixture(scope="session")
def pool(start_method: str) -> Iterator[cleanbreak.Pool]:
    """A two-worker pool of the current start method, shared by the tests that leave it
    healthy."""
    yield from tasks.shared_pool(2, start_method)


@pytest.fixture(scope="session")
def fs_pool() -> Iterator[cleanbreak.Pool]:
    """A two-worker forkserver pool, for behaviour that does not depend on the start method."""
    yield from tasks.shared_pool(2, "forkserver")


@pytest.fixture(scope="module")
def distributed() -> Iterator[Any]:
    """dask.distributed, for one test module (skipped where it is not installed).

    Importing it installs tblib's pickling for every exception class (in ``copyreg``), which
    fork workers then inherit: that is undone once the module's tests end, so that the other
    tests see Python's own pickling. (A program that imports distributed, or uses
    ``Pool(dask=...)``, keeps tblib's, which can pickle more exceptions.)
    """
    saved = dict(copyreg.dispatch_table)
    module = pytest.importorskip("distributed")
    yield module
    copyreg.dispatch_table.clear()
    copyreg.dispatch_table.update(saved)


@pytest.fixture
def unit_sizes(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], list[int]]:
    """``unit_sizes(backend)``: the number of items of each unit that ``backend`` makes from
    now on, as a list that grows (a pool's ``_backend``; the drop-in's ``_pool._backend``)."""

    def watch(backend: Any) -> list[int]:
        sizes: list[int] = []
        real = backend.new_unit

        def spy(kind: int, fn: Any, items: list[Any], *rest: Any) -> Any:
            sizes.append(len(items))
            return real(kind, fn, items, *rest)

        monkeypatch.setattr(backend, "new_unit", spy)
        return sizes

    return watch
