"""Lazy input: ``map`` and ``imap_unordered`` read a generator only a bounded way ahead."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import cleanbreak
from tests import tasks
from tests.tasks import GUARD


class Counting:
    """An endless generator of 0, 1, 2, ... that counts how many items it produced."""

    def __init__(self) -> None:
        self.produced = 0

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count():
            self.produced += 1
            yield i


Mapper = Callable[[cleanbreak.Pool, Iterator[int]], Iterator[Any]]
MAPPERS: dict[str, Mapper] = {
    "map": lambda pool, items: pool.map(tasks.square, items, timeout=GUARD),
    "imap_unordered": lambda pool, items: pool.imap_unordered(tasks.square, items),
}


@pytest.mark.parametrize("name", MAPPERS)
def test_endless_input_yields_results_and_reads_a_bounded_way_ahead(
    fs_pool: cleanbreak.Pool, name: str
) -> None:
    source = Counting()
    results = MAPPERS[name](fs_pool, iter(source))
    first = [next(results) for _ in range(10)]
    if name == "map":
        assert first == [x * x for x in range(10)]
    else:
        assert len(set(first)) == 10
        assert all(int(v**0.5) ** 2 == v for v in first)
    assert 10 <= source.produced < 200, source.produced
    # Taking many more results keeps the read-ahead bounded: it does not grow with the input.
    for _ in range(1000):
        next(results)
    assert source.produced < 1010 + 200, source.produced


@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_buffersize_bounds_the_read_ahead(fs_pool: cleanbreak.Pool, name: str) -> None:
    source = Counting()
    method = fs_pool.map if name == "map" else fs_pool.imap_unordered
    results = method(tasks.square, iter(source), chunksize=1, buffersize=8)
    for taken in range(1, 31):
        next(results)
        assert source.produced <= taken + 8, (taken, source.produced)


@pytest.mark.parametrize("name", MAPPERS)
def test_breaking_out_stops_reading_the_input(fs_pool: cleanbreak.Pool, name: str) -> None:
    source = Counting()
    for k, _ in enumerate(MAPPERS[name](fs_pool, iter(source))):
        if k == 9:
            break
    gc.collect()
    at_break = source.produced
    # The pool goes on, and nothing reads the abandoned input any more.
    assert fs_pool.submit(tasks.square, 3).result(timeout=GUARD) == 9
    assert list(fs_pool.map(tasks.square, range(100), timeout=GUARD)) == [
        x * x for x in range(100)
    ]
    assert source.produced == at_break


def test_map_zips_an_endless_iterable_with_a_finite_one(fs_pool: cleanbreak.Pool) -> None:
    source = Counting()
    results = fs_pool.map(tasks.add, iter(source), [10, 20, 30], timeout=GUARD)
    assert list(results) == [10, 21, 32]
    assert source.produced <= 4
