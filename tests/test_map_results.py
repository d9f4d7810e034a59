"""What ``map`` and ``imap_unordered`` hand over, keep and report (issue 9, points 2, 3 and 8).

- Once a result is handed to the caller, the pool holds no reference to it (CPython's
  ``test_free_reference``, issue 14406 there), so a long map holds only what the caller has
  not taken yet.
- ``return_exceptions=True`` puts each failure in its result's place, and the run goes on; a
  failure that ends the iteration carries the finished results the caller was not given.
- A lazy input is read at most 50 items per worker ahead of the results taken, whatever the
  task costs.
"""

from __future__ import annotations

import gc
import itertools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import cleanbreak
from tests import tasks
from tests.tasks import MiB

Mapper = Callable[..., Iterator[Any]]


def _mapper(pool: cleanbreak.Pool, name: str) -> Mapper:
    return pool.map if name == "map" else pool.imap_unordered


@pytest.mark.parametrize("chunksize", [1, 10])
@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_a_result_handed_over_is_not_kept(
    fs_pool: cleanbreak.Pool, name: str, chunksize: int
) -> None:
    seen = 0
    for obj in _mapper(fs_pool, name)(tasks.make_dummy, range(40), chunksize=chunksize):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None, "the pool still holds a result it handed over"
        seen += 1
    assert seen == 40


def test_a_long_map_of_large_results_holds_only_those_not_taken(fs_pool: cleanbreak.Pool) -> None:
    """300 results of 1 MiB, over a list (a sized input), taken one by one: the parent's memory
    does not grow with them."""
    base = tasks.rss()
    peak = base
    count = 0
    for data in fs_pool.map(tasks.blob, [MiB] * 300, range(300)):
        assert len(data) == MiB
        del data
        count += 1
        peak = max(peak, tasks.rss())
    assert count == 300
    assert peak - base < 100 * MiB, f"the parent grew by {(peak - base) / MiB:.0f} MiB"


@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_return_exceptions_delivers_every_outcome(fs_pool: cleanbreak.Pool, name: str) -> None:
    """Task 3's worker is SIGKILLed: its WorkerDied takes its place, the other nine results
    come all the same."""
    outcomes = list(
        _mapper(fs_pool, name)(
            tasks.sigkill_on, range(10), itertools.repeat(3), chunksize=1, return_exceptions=True
        )
        if name == "map"
        else fs_pool.imap_unordered(
            tasks.sigkill_on_3, range(10), chunksize=1, return_exceptions=True
        )
    )
    assert len(outcomes) == 10
    died = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(died) == 1 and isinstance(died[0], cleanbreak.WorkerDied), outcomes
    values = [o for o in outcomes if not isinstance(o, BaseException)]
    assert sorted(values) == [x * x for x in range(10) if x != 3]
    if name == "map":
        assert outcomes[3] is died[0]


@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_a_failure_that_ends_the_iteration_carries_the_results_not_given(
    fs_pool: cleanbreak.Pool, name: str
) -> None:
    """One chunk of six items, item 2 fails: the caller gets 0 and 1, then the error, which
    holds the results of 3, 4 and 5 that finished with it."""
    results = _mapper(fs_pool, name)(tasks.raise_task_error, [-1, -2, 3, -4, -5, -6], chunksize=6)
    assert [next(results), next(results)] == [-1, -2]
    with pytest.raises(tasks.TaskError) as info:
        next(results)
    assert info.value.completed == {3: -4, 4: -5, 5: -6}  # type: ignore[attr-defined]
    with pytest.raises(StopIteration):
        next(results)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_return_exceptions_must_be_a_bool(fs_pool: cleanbreak.Pool, bad: Any) -> None:
    with pytest.raises(TypeError, match="return_exceptions must be True or False"):
        fs_pool.map(tasks.square, range(3), return_exceptions=bad)
    with pytest.raises(TypeError, match="return_exceptions must be True or False"):
        fs_pool.imap_unordered(tasks.square, range(3), return_exceptions=bad)
    with pytest.raises(TypeError, match="return_exceptions must be True or False"):
        cleanbreak.map(tasks.square, range(3), return_exceptions=bad)


class Counting:
    """An endless generator of 0, 1, 2, ... that counts what it produced."""

    def __init__(self) -> None:
        self.produced = 0

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count():
            self.produced += 1
            yield i


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("fn", [tasks.identity, tasks.one_ms])
@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_a_lazy_input_is_read_at_most_50_items_per_worker_ahead(
    name: str, fn: Callable[[int], int], workers: int
) -> None:
    """Whatever the task costs (here nothing, or 1 ms), the default window holds at most 50
    items per worker: read from the input and not yet handed over."""
    source = Counting()
    with cleanbreak.Pool(workers, mp_context="fork") as pool:
        results = _mapper(pool, name)(fn, iter(source))
        most = 0
        for taken in range(1, 1001):
            next(results)
            most = max(most, source.produced - taken)
        assert most <= 50 * workers, most
        del results
