"""``cleanbreak.map``: a pool for one call, a list in input order, every task run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import cleanbreak
from tests import tasks


def test_returns_a_list_in_input_order(start_method: str) -> None:
    results = cleanbreak.map(tasks.square, range(50), workers=2, mp_context=start_method)
    assert isinstance(results, list)
    assert results == [x * x for x in range(50)]


def test_accepts_a_generator_and_chunksize() -> None:
    results = cleanbreak.map(
        tasks.square, (x for x in range(30)), workers=2, chunksize=4, mp_context="fork"
    )
    assert results == [x * x for x in range(30)]


def test_empty_input_gives_an_empty_list() -> None:
    assert cleanbreak.map(tasks.square, [], workers=1, mp_context="fork") == []


def test_initializer_is_passed_on() -> None:
    results = cleanbreak.map(
        tasks.read_global,
        range(4),
        workers=2,
        mp_context="spawn",
        initializer=tasks.set_global,
        initargs=("ready",),
    )
    assert results == ["ready"] * 4


def test_runs_every_task_then_raises_the_first_failure_in_input_order(
    start_method: str, tmp_path: Path
) -> None:
    bad = frozenset({3, 7})
    # Two chunks of five, one per worker: item 3 waits until item 7 (the other worker) has run
    # and failed, so the first failure in time is item 7, the first in input order item 3.
    items = range(10)
    with pytest.raises(tasks.TaskError) as info:
        cleanbreak.map(
            tasks.ordered_failure,
            [(str(tmp_path), x, bad) for x in items],
            workers=2,
            chunksize=5,
            mp_context=start_method,
        )
    assert str(info.value) == "item 3 failed"
    ran = sorted(int(p.name.removeprefix("ran-")) for p in tmp_path.glob("ran-*"))
    assert ran == list(items), "not every task ran"
    notes = getattr(info.value, "__notes__", [])
    assert any(re.search(r"\b2 of 10\b", note) for note in notes), notes
    assert isinstance(info.value.__cause__, cleanbreak.RemoteTraceback)


def test_a_single_failure_is_counted_too() -> None:
    with pytest.raises(tasks.TaskError) as info:
        cleanbreak.map(tasks.raise_task_error, [-1, -2, 5, -3], workers=2, mp_context="fork")
    assert str(info.value) == "bad input 5"
    assert any("1 of 4" in note for note in getattr(info.value, "__notes__", []))
