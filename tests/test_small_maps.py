"""Small maps of fast tasks, as a program makes them in a loop: about one round trip each.

A pool remembers each function's time per item from its last map (``_map.ItemTimes``). A
later map that this time says is small starts without probes; a chunk holds at least
``_map.MOMENT`` of work, so a small map of fast items goes in two chunks for each worker; and
chunks expected to be brief go to the workers all at once (``_manager.AHEAD_SECONDS``), as the
stock pool's workers take them from one queue."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
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


@pytest.fixture
def drop_in() -> Iterator[DropIn]:
    """A new drop-in pool: its map returns a list, so the whole window goes at once."""
    with DropIn(2) as pool:
        yield pool


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
    drop_in: DropIn, monkeypatch: pytest.MonkeyPatch, unit_sizes: Callable[[Any], list[int]]
) -> None:
    # A chunk's target time so long that only the cap sizes the chunks, whatever the timing;
    # no least work per chunk (that is the next test's).
    monkeypatch.setattr(_map, "CHUNK_SECONDS", 1e9)
    monkeypatch.setattr(_map, "MOMENT", 0.0)
    sizes = unit_sizes(drop_in._pool._backend)
    assert drop_in.map(tasks.square, range(100)) == SQUARES
    probes = sizes.index(13)
    assert 1 <= probes <= 2 and set(sizes[:probes]) == {1}, sizes
    del sizes[:]
    assert drop_in.map(tasks.square, range(100)) == SQUARES
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


def test_a_time_is_remembered_for_the_function_under_its_wrappers() -> None:
    # Two functions that one decorator wraps (functools.wraps) run one wrapper's code: each
    # has its own time, and a partial of a function has that function's.
    times = _map.ItemTimes()
    times.put(tasks.wrapped_square, (1.0, 8.0))
    assert times.get(tasks.wrapped_cube) is None
    assert times.get(functools.partial(tasks.wrapped_square)) == (1.0, 8.0)
    times.put(tasks.square, (2.0, 8.0))
    assert times.get(functools.partial(tasks.square, 3)) == (2.0, 8.0)


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


def test_a_small_map_of_fast_items_goes_in_two_chunks_for_each_worker(
    drop_in: DropIn, unit_sizes: Callable[[Any], list[int]]
) -> None:
    pool = drop_in._pool
    # A microsecond an item: 25 items are 25 us of work, less than MOMENT, so each worker's
    # share is two chunks (the cap alone would make eight chunks of 13).
    pool._item_times.put(tasks.square, (1e-6, 8.0))
    sizes = unit_sizes(pool._backend)
    assert drop_in.map(tasks.square, range(100)) == SQUARES
    assert sizes == [25] * 4, sizes
    # A millisecond an item: the chunks are as the cap makes them.
    pool._item_times.put(tasks.square, (1e-3, 8.0))
    del sizes[:]
    assert drop_in.map(tasks.square, range(100)) == SQUARES
    assert sizes == CHUNKS, sizes


@pytest.mark.parametrize("brief", [True, False], ids=["brief", "ahead_seconds_0"])
def test_the_brief_chunks_of_a_small_map_go_to_the_workers_at_once(
    drop_in: DropIn, monkeypatch: pytest.MonkeyPatch, brief: bool
) -> None:
    # Eight chunks of 13 items, a microsecond each, whatever this machine's timing (no least
    # work per chunk: that is the test above's).
    monkeypatch.setattr(_map, "MOMENT", 0.0)
    drop_in._pool._item_times.put(tasks.square, (1e-6, 8.0))
    if not brief:  # nothing counts as brief: at most PREFETCH units in a worker
        monkeypatch.setattr(_manager, "AHEAD_SECONDS", 0.0)
    backend: Any = drop_in._pool._backend
    depths: list[int] = []
    real = backend._send

    def spy(w: Any, unit: Any) -> None:
        depths.append(len(w.inflight))  # units the worker holds already
        real(w, unit)

    monkeypatch.setattr(backend, "_send", spy)
    assert drop_in.map(tasks.square, range(100)) == SQUARES
    if brief:
        # Eight chunks for two workers, sent in one dispatch (the frames are written once
        # all are sent, so no worker comes free in between): four deep in each. (A worker
        # that came free later may have taken back a chunk that waited in the other.)
        assert sorted(depths[: len(CHUNKS)]) == [0, 0, 1, 1, 2, 2, 3, 3], repr(depths)
    else:
        assert max(depths) < _manager.PREFETCH, repr(depths)


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
