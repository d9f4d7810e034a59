"""``Pool.imap_unordered``: every result, in completion order."""

from __future__ import annotations

from pathlib import Path

import pytest

import cleanbreak
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


def test_a_failed_task_is_raised_in_its_turn_and_the_rest_follow(pool: cleanbreak.Pool) -> None:
    outcomes = tasks.collect(pool.imap_unordered(tasks.raise_task_error, [-1, -2, 3, -4]))
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert len(outcomes) == 4
    assert len(errors) == 1
    assert isinstance(errors[0], tasks.TaskError)
    assert sorted(o for o in outcomes if not isinstance(o, Exception)) == [-4, -2, -1]
