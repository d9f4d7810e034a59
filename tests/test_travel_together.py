"""Tasks of one brief function that wait in the parent travel to a worker as one unit (see
``_manager``, "Tasks that travel together"), and that changes nothing a caller can see but
the speed: each still gets its own outcome, a free worker still takes the tasks that wait
behind a long one, and a killed worker still costs only the task that killed it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cleanbreak
from cleanbreak import _manager
from cleanbreak.multiprocessing import ApplyResult, Pool
from tests import tasks
from tests.tasks import GUARD

N = 30  # tasks behind the two that hold the workers


def _held_then(
    p: Pool, tmp_path: Path, fn: Callable[..., Any], args: list[tuple[Any, ...]]
) -> list[ApplyResult]:
    """Submit ``fn(*a)`` for each of ``args`` while both workers are held by a task of
    another function, then let those go: the tasks wait in the parent together, as a program
    that submits faster than the workers run makes them."""
    hold = str(tmp_path / "hold")
    holders = [
        p.apply_async(tasks.release_after, (str(tmp_path / f"holding-{k}"), hold, k))
        for k in range(2)
    ]
    for k in range(2):
        assert tasks.wait_for_path(tmp_path / f"holding-{k}")
    results = [p.apply_async(fn, a) for a in args]
    tasks.touch(hold)
    assert [h.get(GUARD) for h in holders] == [0, 1]
    return results


def _warm(p: Pool, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run ``fn`` a few times: the pool then knows it is brief."""
    assert len([r.get(GUARD) for r in [p.apply_async(fn, args) for _ in range(4)]]) == 4


def test_brief_tasks_that_wait_together_travel_together(tmp_path: Path) -> None:
    called: list[int] = []
    with Pool(2) as p:
        backend: Any = p._pool._backend
        _warm(p, tasks.square, (1,))
        results = _held_then(p, tmp_path, tasks.square, [(i,) for i in range(N)])
        assert [r.get(GUARD) for r in results] == [i * i for i in range(N)]
        assert backend.travelled_together >= N // 2
        # Each task still has its own callback, called with its own value.
        results = [p.apply_async(tasks.square, (i,), callback=called.append) for i in range(N)]
        assert [r.get(GUARD) for r in results] == [i * i for i in range(N)]
        assert sorted(called) == [i * i for i in range(N)]


def test_tasks_behind_a_long_one_in_their_unit_go_to_a_free_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing is sent ahead to a busy worker here, so that the tasks wait in the parent until
    # a worker is free, and the first one free takes all of them as one unit. Task 2 runs until
    # the test says go; the tasks behind it in that unit must not wait for it while the other
    # worker is free: it takes them back. Left behind task 2, they would wait until GUARD.
    monkeypatch.setattr(_manager, "PREFETCH", 1)
    monkeypatch.setattr(_manager, "PREFETCH_BRIEF", 1)
    go = str(tmp_path / "go")
    with Pool(2) as p:
        backend: Any = p._pool._backend
        _warm(p, tasks.wait_then_return, (None, None, 0))
        args = [(go if i == 2 else None, None, i) for i in range(N)]
        results = _held_then(p, tmp_path, tasks.wait_then_return, args)
        others = [r for i, r in enumerate(results) if i != 2]
        assert [r.get(GUARD) for r in others] == [i for i in range(N) if i != 2]
        assert not results[2].ready()  # all that while
        assert backend.travelled_together >= N - 2 and backend.taken_back >= 1
        tasks.touch(go)
        assert results[2].get(GUARD) == 2


@pytest.mark.parametrize("bad", [2, 9])
def test_a_task_that_kills_its_worker_fails_alone(tmp_path: Path, bad: int) -> None:
    # A unit of tasks that travel together, one of which kills the worker: that one fails
    # with WorkerDied, the others (before it in the unit, and after) give their values.
    with Pool(2) as p:
        backend: Any = p._pool._backend
        _warm(p, tasks.die_on, (0, -1))
        results = _held_then(p, tmp_path, tasks.die_on, [(i, bad) for i in range(N)])
        with pytest.raises(cleanbreak.WorkerDied):
            results[bad].get(GUARD)
        assert [r.get(GUARD) for i, r in enumerate(results) if i != bad] == [
            i * i for i in range(N) if i != bad
        ]
        # The tasks of the unit that died run again alone, never with others again (else the
        # bad one would kill a worker time after time): none travels with others twice.
        assert 1 <= backend.travelled_together < N
