"""Tasks of one brief function that wait in the parent travel to a worker as one unit (see
``_manager``, "Tasks that travel together"), and that changes nothing a caller can see but
the speed: each still gets its own outcome, a free worker still takes the tasks that wait
behind a long one, and a killed worker still costs only the task that killed it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cleanbreak
from cleanbreak import _manager, _worker
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


def _all_travel_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks that wait together travel in units of MERGE_ITEMS, however long the last ones
    took: how many travel together otherwise follows the time the warm-up measured (a first
    task on a worker can take 0.5 ms, and the next ones 15 us), and the units would not be
    the ones a test lays out."""
    monkeypatch.setattr(_manager, "MERGE_SECONDS", 1.0)


def _nothing_sent_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks wait here until a worker is free, and go to it as one unit."""
    monkeypatch.setattr(_manager, "PREFETCH", 1)
    monkeypatch.setattr(_manager, "PREFETCH_BRIEF", 1)
    _all_travel_together(monkeypatch)


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
    _nothing_sent_ahead(monkeypatch)
    go = str(tmp_path / "go")
    with Pool(2) as p:
        backend: Any = p._pool._backend
        _warm(p, tasks.wait_then_return, (None, None, 0))
        args = [(go if i == 2 else None, None, i) for i in range(N)]
        results = _held_then(p, tmp_path, tasks.wait_then_return, args)
        others = [r for i, r in enumerate(results) if i != 2]
        assert [r.get(GUARD) for r in others] == [i for i in range(N) if i != 2]
        assert not results[2].ready()  # all that while
        assert backend.travelled_together >= N // 2 and backend.taken_back >= 1
        tasks.touch(go)
        assert results[2].get(GUARD) == 2


@pytest.mark.parametrize("bad", [2, 9])
def test_a_task_that_kills_its_worker_fails_alone(
    tmp_path: Path, bad: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A unit of tasks that travel together, one of which kills the worker: that one fails
    # with WorkerDied and runs once (the claims say which task was running), the others
    # (before it in the unit, and after) give their values, and those after it never ran
    # before the death, so they run once too.
    _all_travel_together(monkeypatch)
    log = tmp_path / "log"
    log.mkdir()
    with Pool(2) as p:
        backend: Any = p._pool._backend
        _warm(p, tasks.die_on, (0, -1))
        args = [(str(log), i, bad) for i in range(N)]
        results = _held_then(p, tmp_path, tasks.die_on_logged, args)
        with pytest.raises(cleanbreak.WorkerDied):
            results[bad].get(GUARD)
        assert [r.get(GUARD) for i, r in enumerate(results) if i != bad] == [
            i * i for i in range(N) if i != bad
        ]
        assert backend.travelled_together >= N // 2
    runs = tasks.runs_logged(str(log))
    assert runs[bad] == 1  # the bad one ran once
    # Only those that finished before it, with their results still in the worker, ran twice.
    twice = {i for i, n in runs.items() if n > 1}
    assert twice <= set(range(bad)), sorted(twice)
    assert max(runs.values()) <= 2 and set(runs) == set(range(N))


def test_tasks_that_do_not_unpickle_blame_only_the_bad_one_after_a_take_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four tasks travel together to one worker, which cannot unpickle their arguments (task
    # 1's raises, once the test says go). Meanwhile the other worker, free, takes tasks 1..3
    # back, and the unit is cut to task 0. The unpickling error is then the cut unit's, but
    # task 0 did nothing wrong: it runs again alone, and only task 1 fails. Failed as if it
    # were the bad one, task 0 would raise the SerializationError. (Nothing is sent ahead, so
    # that the four wait here until a worker is free, and go to it as one unit.)
    _nothing_sent_ahead(monkeypatch)
    go = str(tmp_path / "go")
    with Pool(2) as p:
        backend: Any = p._pool._backend
        _warm(p, tasks.identity, (1,))
        args = [(0,), (tasks.UnloadableOnceTold(go),), (2,), (3,)]
        results = _held_then(p, tmp_path, tasks.identity, args)
        deadline = time.monotonic() + GUARD
        while backend.taken_back < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert backend.taken_back >= 1
        tasks.touch(go)
        assert results[0].get(GUARD) == 0
        with pytest.raises(cleanbreak.SerializationError):
            results[1].get(GUARD)
        assert [r.get(GUARD) for r in results[2:]] == [2, 3]


CALLERS_TAKE_BACK = """
import os, sys, threading, time
sys.path.insert(0, {root!r})
from cleanbreak.multiprocessing import Pool
from tests import tasks

N, folder = {n}, {folder!r}
go = os.path.join(folder, "go")


def release_when_the_others_are_done():
    deadline = time.monotonic() + tasks.GUARD
    while time.monotonic() < deadline:
        done = sum(os.path.exists(os.path.join(folder, f"done-{{i}}")) for i in range(1, N))
        if done == N - 1:
            tasks.touch(go)
            return
        time.sleep(0.005)


if __name__ == "__main__":
    with Pool(2) as p:
        backend = p._pool._backend
        quick = [(None, None, i) for i in range(N)]
        assert p.map(tasks.staged, quick, 1) == list(range(N))  # the function is brief
        callers, taken = backend.sent_by_callers, backend.taken_back
        specs = [(go if i == 0 else None, os.path.join(folder, f"done-{{i}}"), i) for i in range(N)]
        threading.Thread(target=release_when_the_others_are_done, daemon=True).start()
        assert p.map(tasks.staged, specs, 1) == list(range(N))
        print(backend.sent_by_callers - callers, backend.taken_back - taken)
"""


def test_a_take_back_timed_in_the_callers_thread_still_happens(tmp_path: Path) -> None:
    # The workers are idle when the map starts, so a caller's thread sends its tasks (see
    # _manager, "Sending from the caller's thread"; under pytest, whose SIGINT handler is not
    # cleanbreak's, the main thread does not, so this runs as a script): they travel together
    # to one worker, behind task 0, which runs until the script says go. The take-back that
    # thread timed is the manager's to keep: woken for it, the manager gives the other worker
    # the tasks behind task 0. Left asleep, it waits for a result that comes only when task 0
    # gives up (GUARD), and the script fails. Eight tasks: few enough to travel in one unit.
    # Task 0 is let go once the others are done.
    script = tmp_path / "callers_take_back.py"
    root = str(Path(__file__).resolve().parents[1])
    script.write_text(CALLERS_TAKE_BACK.format(root=root, n=8, folder=str(tmp_path)))
    done = tasks.run_script(script, timeout=3 * GUARD)
    assert done.returncode == 0, done.stderr
    sent_by_callers, taken_back = map(int, done.stdout.split())
    assert sent_by_callers >= 1 and taken_back >= 1


def test_every_waiter_of_a_result_wakes_when_it_is_set(tmp_path: Path) -> None:
    go = str(tmp_path / "go")
    with Pool(2) as p:
        result = p.apply_async(tasks.wait_then_return, (go, None, 7))
        got: list[Any] = []
        waiters = [threading.Thread(target=lambda: got.append(result.get(GUARD))) for _ in range(3)]
        for t in waiters:
            t.start()
        assert not result.ready()
        result.wait(0.01)  # a wait that times out
        assert not result.ready()
        tasks.touch(go)
        for t in waiters:
            t.join(GUARD)
        assert got == [7, 7, 7] and result.ready() and result.successful()
        assert result.get(0) == 7


# The workers of the test below are forked from the test's process, so they run this in place
# of _worker._claim: the first claim a worker looks for once the file _PAUSE names exists, it
# looks for only after the test creates _RESUME (it creates _PAUSED to say it waits, and
# _RESUMED once it has looked).
_real_claim = _worker._claim
_PAUSE, _PAUSED, _RESUME, _RESUMED = "", "", "", ""


def _pause_a_claim_when_told(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The workers forked from here on run _claim_when_told, with its files in tmp_path."""
    for name in ("pause", "paused", "resume", "resumed"):
        monkeypatch.setitem(globals(), f"_{name.upper()}", str(tmp_path / name))
    monkeypatch.setattr(_worker, "_claim", _claim_when_told)


def _claim_when_told(ahead: int) -> bool:
    if not os.path.exists(_PAUSE) or os.path.exists(_PAUSED):
        return _real_claim(ahead)
    tasks.touch(_PAUSED)
    assert tasks.wait_for_path(_RESUME)
    try:
        return _real_claim(ahead)
    finally:
        tasks.touch(_RESUMED)


def test_a_worker_that_skips_a_chunk_taken_back_keeps_no_task_behind_a_long_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker W that comes to a chunk taken back from it learns so by reading the next claim
    # on its pipe, and holds it. Here W comes to that chunk only once the manager, seeing W
    # free, has sent it a unit of tasks that travel together: c, which runs until the test
    # says go, then d and e. Sent with no claim of its own, that unit's first claim would be
    # d's: W would hold it, and d would wait behind c while the other worker is free (until
    # GUARD). Sent with a claim of its own (W is behind a take-back), W holds that one, and
    # the free worker takes d and e back.
    _pause_a_claim_when_told(monkeypatch, tmp_path)
    _all_travel_together(monkeypatch)
    path = {name: str(tmp_path / name) for name in ("p", "q", "h", "go-p", "go-q", "go-h")}
    go_c = str(tmp_path / "go-c")
    with Pool(2, context=multiprocessing.get_context("fork")) as p:
        backend: Any = p._pool._backend
        _warm(p, tasks.staged, ((None, None, 0),))
        _warm(p, tasks.wait_then_return, (None, None, 0))  # brief: C may go ahead
        # P holds W, then Q the other worker. C (one task) is sent ahead to W, whose item
        # started first, and another task to the other worker; a third waits here (one is
        # sent ahead only while one waits for each worker). Each of another function: they do
        # not travel together.
        rp = p.apply_async(tasks.release_after, (path["p"], path["go-p"], -1))
        assert tasks.wait_for_path(path["p"])
        rq = p.apply_async(tasks.release_after, (path["q"], path["go-q"], -2))
        assert tasks.wait_for_path(path["q"])
        rc = p.apply_async(tasks.wait_then_return, (None, None, -3))
        r2 = p.apply_async(tasks.square, (5,))
        r3 = p.apply_async(tasks.identity, (6,))
        _holding(backend, 2, both=True)
        # The other worker, free once Q and the other two end, takes C back and runs it;
        # then H holds it.
        tasks.touch(path["go-q"])
        assert [r.get(GUARD) for r in (rq, r2, r3, rc)] == [-2, 25, 6, -3]
        assert backend.taken_back >= 1
        _holding(backend, 1)  # W, with P only
        rh = p.apply_async(tasks.release_after, (path["h"], path["go-h"], -4))
        assert tasks.wait_for_path(path["h"])
        # From here on the tasks wait in the parent until a worker is free: W, once P ends.
        monkeypatch.setattr(_manager, "PREFETCH", 1)
        monkeypatch.setattr(_manager, "PREFETCH_BRIEF", 1)
        together = [
            p.apply_async(tasks.staged, ((go_c if i == 2 else None, None, i),)) for i in (2, 3, 4)
        ]
        tasks.touch(_PAUSE)
        tasks.touch(path["go-p"])  # W ends P, comes to C's frame and waits to read its claim
        assert rp.get(GUARD) == -1 and tasks.wait_for_path(_PAUSED)
        _holding(backend, 1, items=3)  # the manager has sent W the three together
        tasks.touch(_RESUME)
        assert tasks.wait_for_path(_RESUMED)  # W has read the claim past C's
        tasks.touch(path["go-h"])  # the other worker is free: it takes back d and e
        assert rh.get(GUARD) == -4
        assert [r.get(GUARD) for r in together[1:]] == [3, 4]
        assert not together[0].ready()  # c still runs
        tasks.touch(go_c)
        assert together[0].get(GUARD) == 2


def test_a_unit_sent_ahead_that_never_started_runs_again_when_its_worker_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # W ends P and dies (SIGKILL, from outside) before it reads the claim of C, sent ahead to
    # it: C never started, so nothing of it is to blame. Its claim, still unread, says so,
    # and it runs again. Taken for the task W was running, it would fail with WorkerDied.
    _pause_a_claim_when_told(monkeypatch, tmp_path)
    path = {name: str(tmp_path / name) for name in ("p", "q", "go-p", "go-q")}
    with Pool(2, context=multiprocessing.get_context("fork")) as p:
        backend: Any = p._pool._backend
        _warm(p, tasks.wait_then_return, (None, None, 0))
        rp = p.apply_async(tasks.release_after, (path["p"], path["go-p"], -1))
        assert tasks.wait_for_path(path["p"])
        rq = p.apply_async(tasks.release_after, (path["q"], path["go-q"], -2))
        assert tasks.wait_for_path(path["q"])
        rc = p.apply_async(tasks.wait_then_return, (None, None, -3))  # ahead, to W
        r2 = p.apply_async(tasks.square, (5,))  # ahead, to the other
        r3 = p.apply_async(tasks.identity, (6,))  # waits here
        _holding(backend, 2, both=True)
        tasks.touch(_PAUSE)
        tasks.touch(path["go-p"])  # W ends P and comes to C: it waits to read C's claim
        assert rp.get(GUARD) == -1 and tasks.wait_for_path(_PAUSED)
        with backend._state:
            (w,) = [w for w in backend._workers.values() if len(w.inflight) == 1]
        os.kill(w.pid, signal.SIGKILL)
        deadline = time.monotonic() + GUARD
        while not w.gone and time.monotonic() < deadline:  # the manager has seen it die
            time.sleep(0.001)
        tasks.touch(path["go-q"])
        assert [r.get(GUARD) for r in (rq, r2, r3, rc)] == [-2, 25, 6, -3]


def test_a_unit_sent_to_an_idle_worker_is_never_taken_back() -> None:
    # Every unit has a claim, one sent to an idle worker too; but the unit at the head of a
    # worker's queue is running or about to, and another idle worker taking it would only
    # move it (and the next, and the next: round trips one at a time, each sent to one idle
    # worker while the other idles, would each be sent twice).
    with Pool(2) as p:
        backend: Any = p._pool._backend
        assert [p.apply_async(tasks.square, (i,)).get(GUARD) for i in range(200)] == [
            i * i for i in range(200)
        ]
        assert backend.taken_back == 0


def _holding(backend: Any, units: int, items: int = 1, both: bool = False) -> None:
    """Wait until a worker (``both``: each) holds ``units`` units, the last of ``items``."""
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        with backend._state:
            holds = [
                len(w.inflight) == units and len(w.inflight[-1].items) == items
                for w in backend._workers.values()
            ]
        if all(holds) if both else any(holds):
            return
        time.sleep(0.001)
    raise AssertionError(f"no worker came to hold {units} units (the last of {items} items)")
