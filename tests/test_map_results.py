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
from tests.tasks import GUARD, MiB

Mapper = Callable[..., Iterator[Any]]


def _mapper(pool: cleanbreak.Pool, name: str) -> Mapper:
    return pool.map if name == "map" else pool.imap_unordered


@pytest.mark.parametrize("chunksize", [1, 10])
@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_a_result_handed_over_is_not_kept(
    fs_pool: cleanbreak.Pool, name: str, chunksize: int
) -> None:
    seen = 0
    # 12 items: more than one chunk of 10, and each gc.collect() in this process is slow.
    for obj in _mapper(fs_pool, name)(tasks.make_dummy, range(12), chunksize=chunksize):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None, "the pool still holds a result it handed over"
        seen += 1
    assert seen == 12


def test_a_long_map_of_large_results_holds_only_those_not_taken(fs_pool: cleanbreak.Pool) -> None:
    """300 results of 1 MiB, over a list (a sized input), taken one by one: the parent's memory
    does not grow with them."""
    base = tasks.rss()
    peak = base
    count = 0
    # A small window, so that what the parent holds does not depend on it keeping up.
    for data in fs_pool.map(tasks.blob, [MiB] * 300, range(300), buffersize=16):
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


@pytest.fixture(scope="module")
def one_report_pool() -> Iterator[cleanbreak.Pool]:
    """A pool whose workers report a unit once, when it is done (no report every 50 ms)."""
    with cleanbreak.Pool(2, mp_context="forkserver", initializer=tasks.no_partial_reports) as pool:
        yield pool


@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_a_failure_that_ends_the_iteration_carries_the_results_not_given(
    one_report_pool: cleanbreak.Pool, name: str
) -> None:
    """One chunk of six items, item 2 fails: the caller gets 0 and 1, then the error, which
    holds the results of 3, 4 and 5 that finished with it. (The window is set, so that the
    chunk is not cut into probe units: see _map.PROBE_ITEMS.)"""
    pool = one_report_pool
    results = _mapper(pool, name)(
        tasks.raise_task_error, [-1, -2, 3, -4, -5, -6], chunksize=6, buffersize=6
    )
    assert [next(results), next(results)] == [-1, -2]
    with pytest.raises(tasks.TaskError) as info:
        next(results)
    assert info.value.completed == {3: -4, 4: -5, 5: -6}  # type: ignore[attr-defined]
    with pytest.raises(StopIteration):
        next(results)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize(("chunksize", "buffersize"), [(None, 1), (1, 1), (5, 5), (3, 4)])
def test_a_small_window_never_stalls(
    fs_pool: cleanbreak.Pool, chunksize: int | None, buffersize: int, lazy: bool
) -> None:
    """The window counts the piece being handed out; once it is handed, more input must be read
    even when nothing else is out (it used to wait for ever)."""
    source = iter(range(30)) if lazy else range(30)
    results = fs_pool.map(
        tasks.square, source, chunksize=chunksize, buffersize=buffersize, timeout=GUARD
    )
    assert list(results) == [x * x for x in range(30)]


@pytest.mark.parametrize("name", ["map", "imap_unordered"])
def test_an_input_that_fails_hands_over_what_was_read_before_it(
    fs_pool: cleanbreak.Pool, name: str
) -> None:
    """The generator fails after five items: their results come first, then its error."""

    def five_then_fail() -> Iterator[int]:
        yield from range(5)
        raise tasks.TaskError("the input broke")

    got: list[int] = []
    with pytest.raises(tasks.TaskError, match="the input broke"):
        for value in _mapper(fs_pool, name)(tasks.square, five_then_fail(), chunksize=3):
            got.append(value)
    assert sorted(got) == [0, 1, 4, 9, 16]


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
