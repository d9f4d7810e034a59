"""Small maps of fast tasks, as a program makes them in a loop: about one round trip each.

A pool remembers each function's time per item from its last map (``_map.ItemTimes``). A
later map that this time says is small starts without probes, and its chunks, expected to be
brief, go to the workers all at once (``_manager.AHEAD_SECONDS``), as the stock pool's
workers take them from one queue."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cleanbreak
from cleanbreak import _manager, _map
from cleanbreak.multiprocessing import Pool as DropIn
from tests import tasks

SQUARES = [x * x for x in range(100)]
# 100 items, 2 workers: chunks of at most a quarter of each worker's share, as the stock
# pool's map makes them.
CHUNKS = [13] * 7 + [9]


@pytest.fixture
def fresh(fs_pool: cleanbreak.Pool, monkeypatch: pytest.MonkeyPatch) -> cleanbreak.Pool:
    """The shared pool, with no function's time remembered."""
    monkeypatch.setattr(fs_pool, "_item_times", _map.ItemTimes())
    return fs_pool


def test_a_second_small_map_of_a_function_starts_without_probes(
    fresh: cleanbreak.Pool,
    monkeypatch: pytest.MonkeyPatch,
    unit_sizes: Callable[[Any], list[int]],
) -> None:
    sizes = unit_sizes(fresh._backend)
    assert list(fresh.map(tasks.square, range(100))) == SQUARES
    assert sizes[0] == 1, sizes  # a probe
    del sizes[:]
    assert list(fresh.map(tasks.square, range(100))) == SQUARES
    assert sizes[0] > 1, sizes


def test_a_second_small_list_map_is_sent_whole_at_once(
    monkeypatch: pytest.MonkeyPatch, unit_sizes: Callable[[Any], list[int]]
) -> None:
    # A chunk's target time so long that only the cap sizes the chunks, whatever the timing.
    monkeypatch.setattr(_map, "CHUNK_SECONDS", 1e9)
    with DropIn(2) as pool:  # its map returns a list: the whole window at once
        sizes = unit_sizes(pool._pool._backend)
        assert pool.map(tasks.square, range(100)) == SQUARES
        probes = sizes.index(13)
        assert 1 <= probes <= 2 and set(sizes[:probes]) == {1}, sizes
        del sizes[:]
        assert pool.map(tasks.square, range(100)) == SQUARES
        assert sizes == CHUNKS


def test_a_remembered_time_that_makes_the_map_long_still_probes(
    fresh: cleanbreak.Pool, unit_sizes: Callable[[Any], list[int]]
) -> None:
    fresh._item_times.put(tasks.square, (1.0, 8.0))  # a second an item: 100 s of work
    sizes = unit_sizes(fresh._backend)
    assert list(fresh.map(tasks.square, range(100))) == SQUARES
    # A probe for each worker, then chunks sized from the probes' time (the time remembered
    # would have made 32 units of one item).
    assert sizes[:2] == [1, 1] and sizes[2] > 1, sizes


def test_a_lazy_input_or_a_callable_without_code_still_probes(
    fresh: cleanbreak.Pool, unit_sizes: Callable[[Any], list[int]]
) -> None:
    sizes = unit_sizes(fresh._backend)
    for _ in range(2):
        assert list(fresh.map(tasks.square, iter(range(100)))) == SQUARES
        assert sizes[0] == 1, sizes
        del sizes[:]
    for _ in range(2):
        assert list(fresh.map(abs, range(-50, 50))) == [abs(x) for x in range(-50, 50)]
        assert sizes[0] == 1, sizes
        del sizes[:]


@pytest.mark.parametrize("brief", [True, False], ids=["brief", "ahead_seconds_0"])
def test_the_brief_chunks_of_a_small_map_go_to_the_workers_at_once(
    fresh: cleanbreak.Pool, monkeypatch: pytest.MonkeyPatch, brief: bool
) -> None:
    if not brief:  # nothing counts as brief: at most PREFETCH units in a worker
        monkeypatch.setattr(_manager, "AHEAD_SECONDS", 0.0)
    backend: Any = fresh._backend
    depths: list[int] = []
    real = backend._send

    def spy(w: Any, unit: Any) -> None:
        depths.append(len(w.inflight))  # units the worker holds already
        real(w, unit)

    monkeypatch.setattr(backend, "_send", spy)
    assert list(fresh.map(tasks.square, range(100))) == SQUARES  # its time, remembered
    del depths[:]
    assert list(fresh.map(tasks.square, range(100))) == SQUARES
    if brief:
        # Eight chunks for two workers, sent together: four deep in each, unless a worker
        # came free between two sends.
        assert max(depths) >= _manager.PREFETCH, depths
    else:
        assert max(depths) < _manager.PREFETCH, depths


def test_the_drop_ins_starmap_sends_the_users_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not a wrapper made for each call: the function goes to each worker once, and its time
    # is remembered under its own name.
    with DropIn(2) as pool:
        backend: Any = pool._pool._backend
        sent: list[Any] = []
        real = backend.new_unit

        def spy(kind: int, fn: Any, *rest: Any) -> Any:
            sent.append(fn)
            return real(kind, fn, *rest)

        monkeypatch.setattr(backend, "new_unit", spy)
        assert pool.starmap(tasks.add, [(x, 1) for x in range(20)]) == list(range(1, 21))
        assert sent and all(fn is tasks.add for fn in sent), sent
        assert pool._pool._item_times.get(tasks.add) is not None
