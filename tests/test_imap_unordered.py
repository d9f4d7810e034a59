"""``Pool.imap_unordered``: every result, in completion order."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

import cleanbreak
from cleanbreak.multiprocessing import Pool
from tests import tasks


def test_yields_every_result(pool: cleanbreak.Pool) -> None:
    results = list(pool.imap_unordered(tasks.square, range(200)))
    assert sorted(results) == [x * x for x in range(200)]


@pytest.mark.parametrize("chunksize", [1, 5, 1000])
def test_chunksize_does_not_change_the_results(pool: cleanbreak.Pool, chunksize: int) -> None:
    results = list(pool.imap_unordered(tasks.square, range(57), chunksize=chunksize))
    assert sorted(results) == [x * x for x in range(57)]


def test_of_nothing_is_empty(pool: cleanbreak.Pool) -> None:
    assert list(pool.imap_unordered(tasks.square, [])) == []


def test_yields_in_completion_order(pool: cleanbreak.Pool, tmp_path: Path) -> None:
    # Item 0 waits until the test has received item 1's result: an ordered iterator could not
    # yield anything (item 0 would end by raising TimeoutError after tasks.GUARD).
    go = str(tmp_path / "go")
    results = pool.imap_unordered(tasks.staged, [(go, None, 0), (None, None, 1)], chunksize=1)
    assert next(results) == 1
    tasks.touch(go)
    assert next(results) == 0
    with pytest.raises(StopIteration):
        next(results)


@pytest.mark.parametrize("call", ["map", "imap_unordered"])
def test_a_unit_is_not_held_behind_a_long_item_while_a_worker_comes_free(
    pool: cleanbreak.Pool, tmp_path: Path, call: str
) -> None:
    # Items 2 and 3 each wait for the other to start; item 1 holds its worker until item 2
    # has started. When 2 and 3 are queued, one worker is free and the other busy: 3 must wait
    # for the busy one to come free, not be sent ahead behind 2 (which would then wait for it
    # until tasks.GUARD and report False).
    folder = str(tmp_path)
    items = [(folder, 0, None), (folder, 1, 2), (folder, 2, 3), (folder, 3, 2)]
    results = list(getattr(pool, call)(tasks.meet_star, items))
    assert results == [True] * 4


@pytest.mark.parametrize("face", ["cleanbreak", "drop-in"])
def test_a_unit_sent_ahead_behind_a_long_item_is_taken_back_by_a_free_worker(
    pool: cleanbreak.Pool, start_method: str, tmp_path: Path, face: str
) -> None:
    # Item 0 runs until every other item has started; the others return at once. In chunks
    # of one, a busy worker is sent one ahead while many wait: the one sent ahead behind
    # item 0 must go to the other worker once that has run the rest, as a free worker takes
    # the next task in the stock pool (else item 0 waits for it until tasks.GUARD: False).
    folder, last = str(tmp_path), 12
    items = [(folder, i, last if i == 0 else 0) for i in range(last + 1)]
    if face == "cleanbreak":
        results = sorted(pool.imap_unordered(tasks.meet_all, items, chunksize=1))
    else:  # the stock API's list map, which reads its input at once
        with Pool(2, context=multiprocessing.get_context(start_method)) as stock_face:
            results = stock_face.map(tasks.meet_all, items, 1)
    assert results == [True] * (last + 1)


@pytest.mark.parametrize("face", ["cleanbreak.map", "drop-in"])
def test_a_list_map_goes_on_past_a_long_first_item(
    start_method: str, tmp_path: Path, face: str
) -> None:
    # Item 0 runs until the 100 others have started, more than the window a lazy map keeps
    # ahead: a map that returns a list reads on while its first item runs, as the stock
    # pool's map does (else item 0 waits until tasks.GUARD: False).
    folder, last = str(tmp_path), 100
    items = [(folder, i, last if i == 0 else 0) for i in range(last + 1)]
    if face == "cleanbreak.map":
        results = cleanbreak.map(tasks.meet_all, items, workers=2, mp_context=start_method)
    else:
        with Pool(2, context=multiprocessing.get_context(start_method)) as stock_face:
            results = stock_face.map(tasks.meet_all, items, 1)
    assert results == [True] * (last + 1)


def test_a_failed_task_is_raised_and_ends_the_iteration(pool: cleanbreak.Pool) -> None:
    outcomes = tasks.collect(pool.imap_unordered(tasks.raise_task_error, [-1, -2, 3, -4]))
    assert isinstance(outcomes[-1], tasks.TaskError), outcomes
    assert str(outcomes[-1]) == "bad input 3"
    assert all(o in (-1, -2, -4) for o in outcomes[:-1]), outcomes
    assert pool.submit(tasks.square, 5).result(timeout=tasks.GUARD) == 25
