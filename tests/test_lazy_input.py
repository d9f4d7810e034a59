"""Lazy input: ``map`` and ``imap_unordered`` read a generator only a bounded way ahead."""

from __future__ import annotations

import functools
import gc
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import cleanbreak
from cleanbreak._map import HELD_BYTES, PROBE_ITEMS
from tests import tasks
from tests.tasks import GUARD


class ReadTooFar(Exception):
    pass


class Counting:
    """An endless generator of 0, 1, 2, ... that counts how many items it produced, and fails
    (instead of hanging the test) if it is read more than ``limit`` items."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.produced = 0
        self.limit = limit

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count():
            if self.produced >= self.limit:
                raise ReadTooFar(f"the input was read {self.limit} items ahead")
            self.produced += 1
            yield i


Mapper = Callable[..., Iterator[Any]]


def _mapper(pool: cleanbreak.Pool, name: str) -> Mapper:
    return pool.map if name == "map" else pool.imap_unordered


def _check_squares(name: str, got: list[int], start: int = 0) -> None:
    if name == "map":
        assert got == [x * x for x in range(start, start + len(got))]
    else:
        assert len(set(got)) == len(got)
        assert all(int(v**0.5) ** 2 == v for v in got)


@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_endless_input_with_a_buffersize_reads_at_most_that_far_ahead(
    fs_pool: cleanbreak.Pool, name: str
) -> None:
    source = Counting()
    results = _mapper(fs_pool, name)(tasks.square, iter(source), chunksize=1, buffersize=8)
    got = []
    for taken in range(1, 101):
        got.append(next(results))
        assert source.produced <= taken + 8, (taken, source.produced)
    _check_squares(name, got)


@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_buffersize_with_automatic_chunks(fs_pool: cleanbreak.Pool, name: str) -> None:
    # Chunks are sized automatically, at most a quarter of the window on two workers, and
    # never read past it: a chunk that does not fit waits. Of the chunk the caller is in, at
    # least one result was taken.
    assert fs_pool.workers == 2
    source = Counting()
    results = _mapper(fs_pool, name)(tasks.square, iter(source), buffersize=100)
    for taken in range(1, 2001):
        next(results)
        assert source.produced <= taken + (100 // 4 - 1) + 100, (taken, source.produced)


def test_a_chunk_size_larger_than_the_default_window_still_runs(
    fs_pool: cleanbreak.Pool, unit_sizes: Callable[[Any], list[int]]
) -> None:
    # The default window starts small (16 items per worker) and grows; a chunk of 1000 the user
    # asked for does not wait for it to grow, and is not cut into pieces either, once the first
    # results have shown that they are small (until then each worker gets one probe unit; a
    # first result can come back before the second probe is made, on a loaded machine).
    sizes = unit_sizes(fs_pool._backend)
    results = fs_pool.map(tasks.square, iter(Counting()), chunksize=1000, timeout=GUARD)
    assert [next(results) for _ in range(5000)] == [i * i for i in range(5000)]
    probes = sizes.index(1000)
    assert 1 <= probes <= fs_pool.workers, sizes
    assert set(sizes[:probes]) == {PROBE_ITEMS} and set(sizes[probes:]) == {1000}, sizes


def test_the_window_is_never_overrun_by_part_of_a_chunk(fs_pool: cleanbreak.Pool) -> None:
    # Chunks of at most 60 in a window of 100. The items read ahead of those handed to the
    # caller never pass the window: after the first chunk is handed, 40 more fit, not 60. Of
    # a chunk handed, at least one result was taken, so at most 59 wait in the caller.
    source = Counting()
    results = fs_pool.map(tasks.square, iter(source), chunksize=60, buffersize=100)
    for taken in range(1, 1001):
        next(results)
        assert source.produced <= taken + 59 + 100, (taken, source.produced)


@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_endless_input_by_default_yields_results_and_reads_a_bounded_way_ahead(
    fs_pool: cleanbreak.Pool, name: str
) -> None:
    # Tiny tasks, 200,000 results: the read-ahead stays within the default window (50 items
    # per worker) however many results are taken. (tests/test_map_results.py checks it at
    # every result, for tasks of 1 ms too.)
    source = Counting()
    results = _mapper(fs_pool, name)(tasks.square, iter(source))
    first = [next(results) for _ in range(10)]
    _check_squares(name, first)
    for _ in range(200_000):
        next(results)
    assert source.produced - 200_010 <= 50 * fs_pool.workers


@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_breaking_out_stops_reading_the_input(fs_pool: cleanbreak.Pool, name: str) -> None:
    source = Counting()
    for k, _ in enumerate(_mapper(fs_pool, name)(tasks.square, iter(source))):
        if k == 9:
            break
    gc.collect()
    at_break = source.produced
    # The pool goes on, and nothing reads the abandoned input any more.
    assert fs_pool.submit(tasks.square, 3).result(timeout=GUARD) == 9
    assert list(fs_pool.map(tasks.square, range(100), timeout=GUARD)) == [x * x for x in range(100)]
    assert source.produced == at_break


def test_map_zips_an_endless_iterable_with_a_finite_one(fs_pool: cleanbreak.Pool) -> None:
    source = Counting()
    results = fs_pool.map(tasks.add, iter(source), [10, 20, 30], timeout=GUARD)
    assert list(results) == [10, 21, 32]
    assert source.produced <= 4


@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_large_results_cut_the_chunks_to_fit_what_the_run_may_hold(
    fs_pool: cleanbreak.Pool, unit_sizes: Callable[[Any], list[int]], name: str
) -> None:
    """Results of 1 MiB with chunks of 200 asked for: after one probe unit per worker, each
    unit holds what fits in HELD_BYTES with one unit per worker, so that the results the run
    holds for its caller stay under it (a unit of 200 would hold 200 MiB)."""
    sizes = unit_sizes(fs_pool._backend)
    fn = functools.partial(tasks.blob, tasks.MiB)
    results = _mapper(fs_pool, name)(fn, range(120), chunksize=200)
    assert sum(len(r) for r in results) == 120 * tasks.MiB
    fits = HELD_BYTES // tasks.MiB // fs_pool.workers
    probes = fs_pool.workers
    assert sum(sizes) == 120 and max(sizes[:probes]) <= PROBE_ITEMS, sizes
    assert max(sizes[probes:]) <= fits, sizes
