"""Faults cost one task, not the run (contract points 2, 3 and 5; issue 3).

Every test runs real worker processes: they segfault, exit, are SIGKILLed from inside and from
outside, run past their deadline, are cancelled while running, start processes of their own,
hit a memory limit, or hand the pool something that will not pickle. Each checks that only the
task at fault fails, with the right error, and that the pool goes on.

Tests synchronise through handshake files (see ``fault_tasks``): a task writes a start file
with its worker's pid, and the test waits for it. Timeouts are deadlock guards only. The times
from a worker's death to its task's error, and from a deadline to the ``TaskTimeout``, are
printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, cast

import psutil
import pytest

import cleanbreak
from tests import fault_tasks as ft
from tests import tasks

TIMEOUT = 40.0  # deadlock guard for every wait in this file
METHODS = ("forkserver", "spawn", "fork")
_POLL = 0.005

# Measured figures, printed together at the end of the module (visible with -s).
_FIGURES: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _print_figures() -> Iterator[None]:
    yield
    if _FIGURES:
        print("\n\ncleanbreak fault timings (printed, not asserted):")
        for line in _FIGURES:
            print("  " + line)


def _figure(line: str) -> None:
    _FIGURES.append(line)
    print(line)


# ── helpers ──────────────────────────────────────────────────────────────────────────────────


@contextlib.contextmanager
def open_pool(tmp_path: Path, workers: int, method: str, **kw: Any) -> Iterator[cleanbreak.Pool]:
    """A pool that is shut down on the way out. Every wait in a task ends once ``release`` exists
    in the folder it watches; it is created first, so that a failed test leaves no task
    blocked."""
    pool = cleanbreak.Pool(workers, mp_context=method, **kw)
    failed = True
    try:
        yield pool
        failed = False
    finally:
        ft.write_atomic(release(tmp_path), "")
        pool.shutdown(wait=False, cancel_futures=failed)
        # Bounded, so that a broken build fails the test instead of hanging the run.
        if not pool._backend.wait(TIMEOUT):
            for pid in live_pids(pool):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not failed:
                raise AssertionError("the pool did not shut down")
        else:
            pool.shutdown(wait=True)  # returns at once; puts the signal handlers back


def release(tmp_path: Path) -> str:
    return str(tmp_path / ft.RELEASE)


def wait_start(path: str | Path) -> dict[str, Any]:
    """Wait (bounded) for a task's start file and return what it reported."""
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"the task never started: no {path}"
        time.sleep(_POLL)
    with open(path) as f:
        return cast(dict[str, Any], json.load(f))


def wait_until(check: Callable[[], bool], what: str) -> float:
    """Wait (bounded) until ``check()`` holds; returns how long that took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < TIMEOUT, what
        time.sleep(_POLL)
    return time.monotonic() - start


def gone(pid: int) -> bool:
    """The process is dead: reaped, or a zombie waiting to be."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def done_time(fut: Future[Any]) -> list[float]:
    """A list that receives the moment ``fut`` settles (set by the manager thread)."""
    seen: list[float] = []
    fut.add_done_callback(lambda _f: seen.append(time.monotonic()))
    return seen


def live_pids(pool: cleanbreak.Pool) -> list[int]:
    return list(pool._backend.pids)


def assert_pool_goes_on(pool: cleanbreak.Pool, tmp_path: Path, dead: list[int]) -> None:
    """The dead workers are gone and replaced: as many workers as before, all able to run."""
    plain = pool.options(task_timeout=None, retries=0)
    assert plain.submit(ft.square, 12).result(timeout=TIMEOUT) == 144
    if pool.workers >= 2:
        # Two tasks that wait for each other finish only if two workers run them at once. (A
        # submitted task is sent only to an idle worker, so neither waits behind the other.)
        tag = f"meet-{len(list(tmp_path.glob('meet-*')))}"
        a, b = str(tmp_path / f"{tag}-a"), str(tmp_path / f"{tag}-b")
        meet = [plain.submit(ft.rendezvous, a, b), plain.submit(ft.rendezvous, b, a)]
        met = [f.result(timeout=TIMEOUT) for f in meet]
        assert met[0] != met[1]
        assert not set(met) & set(dead)
    pids = live_pids(pool)
    assert len(pids) == pool.workers, pids
    for pid in dead:
        assert pid not in pids
        assert gone(pid), f"worker {pid} is still running"


def assert_roundtrip(exc: BaseException, *attrs: str) -> None:
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is type(exc)
    assert str(clone) == str(exc)
    for attr in attrs:
        assert getattr(clone, attr) == getattr(exc, attr), attr


# ── 1. worker death ──────────────────────────────────────────────────────────────────────────

DEATHS: dict[str, tuple[Callable[[str], int] | None, int, signal.Signals | None]] = {
    "segfault": (ft.segfault, -signal.SIGSEGV, signal.SIGSEGV),
    "os._exit(3)": (ft.exit_with, 3, None),
    "SIGKILL-inside": (ft.sigkill_self, -signal.SIGKILL, signal.SIGKILL),
    "SIGKILL-outside": (None, -signal.SIGKILL, signal.SIGKILL),  # the test kills it by pid
}


@pytest.mark.parametrize("how", list(DEATHS))
@pytest.mark.parametrize("method", METHODS)
def test_a_worker_death_fails_only_its_task(method: str, how: str, tmp_path: Path) -> None:
    killer, exitcode, sig = DEATHS[how]
    start = str(tmp_path / "start")
    with open_pool(tmp_path, 2, method) as pool:
        before = [pool.submit(ft.square, i) for i in range(4)]
        if killer is None:
            doomed = pool.submit(ft.block, start, release(tmp_path))
        else:
            doomed = pool.submit(killer, start)
        settled = done_time(doomed)
        after = [pool.submit(ft.square, i) for i in range(5, 9)]

        info = wait_start(start)
        died_at = info["t"]
        if killer is None:
            assert not doomed.done()
            died_at = time.monotonic()
            os.kill(info["pid"], signal.SIGKILL)

        exc = doomed.exception(timeout=TIMEOUT)
        assert isinstance(exc, cleanbreak.WorkerDied), repr(exc)
        assert isinstance(exc, BrokenProcessPool)
        assert exc.exitcode == exitcode
        assert exc.signal == sig
        assert exc.pid == info["pid"]
        assert exc.task == 4
        assert (sig.name if sig else "code 3") in str(exc), str(exc)
        assert_roundtrip(exc, "exitcode", "signal", "pid", "task")
        _figure(
            f"death -> WorkerDied   {method:10} {how:16} {1000 * (settled[0] - died_at):7.1f} ms"
        )

        assert [f.result(timeout=TIMEOUT) for f in before + after] == [
            i * i for i in (*range(4), *range(5, 9))
        ]
        assert_pool_goes_on(pool, tmp_path, [info["pid"]])


@pytest.mark.parametrize("method", METHODS)
def test_a_death_is_pinned_on_the_right_task_among_several(method: str, tmp_path: Path) -> None:
    """Two tasks run on two workers, more wait behind them; the second worker is SIGKILLed from
    outside. Only the task it ran fails; the other running task goes on undisturbed."""
    a_start, b_start = str(tmp_path / "a"), str(tmp_path / "b")
    a_release = str(tmp_path / "a-release")
    with open_pool(tmp_path, 2, method) as pool:
        a = pool.submit(ft.block, a_start, a_release, 100)
        b = pool.submit(ft.block, b_start, release(tmp_path), 101)
        queued = [pool.submit(ft.square, i) for i in range(2, 10)]
        a_info, b_info = wait_start(a_start), wait_start(b_start)
        assert a_info["pid"] != b_info["pid"]

        os.kill(b_info["pid"], signal.SIGKILL)
        exc = b.exception(timeout=TIMEOUT)
        assert isinstance(exc, cleanbreak.WorkerDied), repr(exc)
        assert (exc.pid, exc.task, exc.signal) == (b_info["pid"], 1, signal.SIGKILL)

        # The other worker and its task were not touched.
        assert not a.done()
        assert a_info["pid"] in live_pids(pool)
        ft.write_atomic(a_release, "")
        assert a.result(timeout=TIMEOUT) == 100
        assert [f.result(timeout=TIMEOUT) for f in queued] == [i * i for i in range(2, 10)]
        assert_pool_goes_on(pool, tmp_path, [b_info["pid"]])


@pytest.mark.parametrize("method", METHODS)
def test_a_death_in_a_map_chunk_fails_only_that_item(method: str, tmp_path: Path) -> None:
    """Chunks of 5; item 7 kills its worker. Items 5 and 6, which ran in the same chunk before
    it (and may not have been reported when the worker died), keep their results; so do 8 and 9,
    which came after it in the chunk."""
    with open_pool(tmp_path, 2, method) as pool:
        results = pool.map(ft.die_at, range(15), itertools.repeat(7), chunksize=5, timeout=TIMEOUT)
        assert [next(results) for _ in range(7)] == [i * i for i in range(7)]
        with pytest.raises(cleanbreak.WorkerDied) as info:
            next(results)
        assert (info.value.task, info.value.exitcode) == (7, 7)
        # The map's last chunks may still be running: new tasks must not wait behind them.
        assert_pool_goes_on(pool, tmp_path, [info.value.pid])

    # cleanbreak.map runs every item even when one fails: 8 and 9, after the fatal item in its
    # chunk, have their results too.
    outcomes = cleanbreak.map(
        ft.die_at_7, range(15), workers=2, mp_context=method, chunksize=5, return_exceptions=True
    )
    died = outcomes[7]
    assert isinstance(died, cleanbreak.WorkerDied), outcomes
    assert (died.task, died.exitcode) == (7, 7)
    assert outcomes[:7] + outcomes[8:] == [x * x for x in range(15) if x != 7], outcomes


@pytest.mark.parametrize("method", METHODS)
def test_a_worker_that_dies_mid_chunk_loses_only_what_it_had_not_sent(
    method: str, tmp_path: Path
) -> None:
    """One chunk of 20 results of 2 MB, whose item 10 kills the worker, all within a few
    milliseconds (well inside the worker's 50 ms flush): each result passes the flush size, so
    the worker sent it as soon as it was done, and none of the 10 before the death runs again.
    (Sent only at the chunk's end, all 10 were lost with the worker and ran twice.)"""
    counter = tmp_path / "runs"
    fn = functools.partial(ft.large_then_die, str(counter), 10)
    outcomes = cleanbreak.map(
        fn, range(20), workers=1, mp_context=method, chunksize=20, return_exceptions=True
    )
    assert isinstance(outcomes[10], cleanbreak.WorkerDied), outcomes[10]
    assert [bytes(o[:1]) for o in outcomes[:10] + outcomes[11:]] == [
        bytes([x]) for x in range(20) if x != 10
    ]
    runs = collections.Counter(int(line) for line in counter.read_text().split())
    # Item 10 may run twice: the pool runs what the dead worker had not sent again, one item at
    # a time, to find which item killed it.
    twice = sorted(x for x, n in runs.items() if n > 1 and x != 10)
    assert not twice, f"items the worker had finished and sent ran again: {twice}"
    assert set(runs) == set(range(20))


def test_results_finished_before_a_slow_item_of_their_chunk_arrive_while_it_runs(
    tmp_path: Path,
) -> None:
    """The worker checks the age of what it holds between batches only (tiny tasks pay
    nothing per item), and a batch that ends with an item that runs long would hold the fast
    results before it until that item ends. The worker's flusher thread sends them once they
    are 50 ms old: here they all arrive while the last item of their chunk still waits."""
    release = tmp_path / "release"
    specs = [(None, None, i) for i in range(30)] + [(str(release), None, -1)]
    all_came = threading.Event()
    guard_released = threading.Event()

    def deadlock_guard() -> None:
        if not all_came.wait(tasks.GUARD):
            guard_released.set()
            tasks.touch(release)

    threading.Thread(target=deadlock_guard, daemon=True).start()
    with cleanbreak.Pool(1) as pool:
        it = pool.imap_unordered(tasks.staged, specs, chunksize=len(specs))
        fast = [next(it) for _ in range(30)]
        all_came.set()
        tasks.touch(release)
        rest = list(it)
    assert not guard_released.is_set(), "the fast results came only once the slow item ended"
    assert sorted(fast) == list(range(30)) and rest == [-1]


@pytest.mark.parametrize("how", ["death", "timeout", "cancel"])
@pytest.mark.parametrize("method", METHODS)
def test_processes_a_task_started_die_with_its_worker(
    method: str, how: str, tmp_path: Path
) -> None:
    """The task starts ``sleep 1000``; then its worker exits by itself, runs past its
    deadline, or is cancelled. The grandchild must not outlive the worker."""
    start = str(tmp_path / "start")
    opts = {"task_timeout": 0.5} if how == "timeout" else {}
    expected: type[BaseException] = {
        "death": cleanbreak.WorkerDied,
        "timeout": cleanbreak.TaskTimeout,
        "cancel": CancelledError,
    }[how]
    with open_pool(tmp_path, 1, method, **opts) as pool:
        fut = pool.submit(ft.spawn_grandchild, start, release(tmp_path), how == "death")
        info = wait_start(start)
        grandchild = info["grandchild"]
        try:
            if how == "cancel":
                assert pool.cancel(fut, timeout=TIMEOUT) is True
            with pytest.raises(expected):
                fut.result(timeout=TIMEOUT)
            # It was sent SIGKILL before the task's outcome was set; the wait is for the
            # kernel to finish it off.
            took = wait_until(lambda: gone(grandchild), f"grandchild {grandchild} outlived it")
            _figure(f"grandchild dead after  {method:10} {how:16} {1000 * took:7.1f} ms wait")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)
        assert_pool_goes_on(pool, tmp_path, [info["pid"]])


# ── 2. per-task timeout ──────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("method", METHODS)
def test_a_task_past_its_deadline_fails_with_task_timeout(method: str, tmp_path: Path) -> None:
    start = str(tmp_path / "start")
    with open_pool(tmp_path, 2, method, task_timeout=0.5) as pool:
        quick = [pool.submit(ft.square, i) for i in range(3)]
        slow = pool.submit(ft.block, start, release(tmp_path))
        settled = done_time(slow)
        quick += [pool.submit(ft.square, i) for i in range(4, 10)]
        info = wait_start(start)

        exc = slow.exception(timeout=TIMEOUT)
        assert isinstance(exc, cleanbreak.TaskTimeout), repr(exc)
        assert isinstance(exc, TimeoutError)
        assert exc.timeout == 0.5
        assert exc.task == 3
        assert exc.pid == info["pid"]
        assert "0.5" in str(exc)
        assert_roundtrip(exc, "timeout", "pid", "task")
        late = settled[0] - (info["t"] + 0.5)
        _figure(
            f"start+timeout -> TaskTimeout {method:10} {'pool option':16} {1000 * late:7.1f} ms"
        )

        # The tasks that finish in time are unaffected, those queued behind the slow one too.
        assert [f.result(timeout=TIMEOUT) for f in quick] == [
            i * i for i in (*range(3), *range(4, 10))
        ]
        assert_pool_goes_on(pool, tmp_path, [info["pid"]])


def test_a_task_timeout_holds_after_a_fast_map_of_the_same_function() -> None:
    """A fast map lets a worker's batches grow (many items run before it reports); a map of
    the same function with a timeout still has each item reported as it ends, so its deadline
    moves on: no item that ended within its limit is taken for one that ran past it."""
    with cleanbreak.Pool(1) as pool:
        fast = [(0.0, i) for i in range(20000)]
        assert list(pool.map(tasks.sleep_star, fast)) == list(range(20000))
        # Ten items of 0.15 s in one chunk, each well within its 1 s: run as one batch before
        # a report, they would pass the first item's deadline.
        slow = [(0.15, i) for i in range(10)]
        timed = pool.options(task_timeout=1.0)
        assert list(timed.map(tasks.sleep_star, slow, chunksize=10)) == list(range(10))


def test_options_override_the_pool_task_timeout(tmp_path: Path) -> None:
    """``options(task_timeout=...)`` sets a timeout for some tasks of a pool that has none, and
    lifts it for some tasks of a pool that has one."""
    a_start, b_start = str(tmp_path / "a"), str(tmp_path / "b")
    a_release = str(tmp_path / "a-release")
    with open_pool(tmp_path, 2, "forkserver") as pool:
        free = pool.submit(ft.block, a_start, a_release, 1)
        wait_start(a_start)
        slow = pool.options(task_timeout=0.5).submit(ft.block, b_start, release(tmp_path))
        settled = done_time(slow)
        b_info = wait_start(b_start)
        exc = slow.exception(timeout=TIMEOUT)
        assert isinstance(exc, cleanbreak.TaskTimeout), repr(exc)
        assert (exc.timeout, exc.task, exc.pid) == (0.5, 1, b_info["pid"])
        late = settled[0] - (b_info["t"] + 0.5)
        _figure(
            f"start+timeout -> TaskTimeout {'forkserver':10} {'options()':16} {1000 * late:7.1f} ms"
        )
        # ``free`` started before ``slow``, so it has now run for more than 0.5 s, unharmed.
        assert not free.done()
        ft.write_atomic(a_release, "")
        assert free.result(timeout=TIMEOUT) == 1
        assert_pool_goes_on(pool, tmp_path, [b_info["pid"]])

    phase2 = tmp_path / "phase2"
    phase2.mkdir()
    a_start, b_start = str(phase2 / "a"), str(phase2 / "b")
    a_release = str(phase2 / "a-release")
    with open_pool(phase2, 2, "forkserver", task_timeout=0.5) as pool:
        free = pool.options(task_timeout=None).submit(ft.block, a_start, a_release, 2)
        wait_start(a_start)
        slow = pool.options(task_timeout=0.3).submit(ft.block, b_start, release(phase2))
        exc = slow.exception(timeout=TIMEOUT)
        assert isinstance(exc, cleanbreak.TaskTimeout), repr(exc)
        assert exc.timeout == 0.3
        assert not free.done()
        ft.write_atomic(a_release, "")
        assert free.result(timeout=TIMEOUT) == 2


def test_a_timeout_in_a_map_chunk_fails_only_that_item(tmp_path: Path) -> None:
    with open_pool(tmp_path, 2, "forkserver") as pool:
        results = pool.options(task_timeout=0.5).map(
            ft.block_at,
            range(10),
            itertools.repeat(7),
            itertools.repeat(release(tmp_path)),
            chunksize=5,
            timeout=TIMEOUT,
        )
        assert [next(results) for _ in range(7)] == [i * i for i in range(7)]
        with pytest.raises(cleanbreak.TaskTimeout) as info:
            next(results)
        assert (info.value.task, info.value.timeout) == (7, 0.5)
        assert_pool_goes_on(pool, tmp_path, [info.value.pid])


# ── 3. cancellation ──────────────────────────────────────────────────────────────────────────


def test_cancelling_a_queued_task_keeps_it_from_running(tmp_path: Path) -> None:
    """One worker, busy with a blocking task; tasks queued behind it. ``Future.cancel()`` and
    ``pool.cancel()`` return True and the tasks never run (each would leave a file)."""
    start, go = str(tmp_path / "start"), str(tmp_path / "go")
    mark, other_mark = tmp_path / "ran", tmp_path / "ran-other"
    with open_pool(tmp_path, 1, "forkserver") as pool:
        busy = pool.submit(ft.block, start, go, 1)
        queued = pool.submit(ft.touch_and_return, str(mark), 2)
        other = pool.submit(ft.touch_and_return, str(other_mark), 3)
        # By the time the busy task has started, the pool has long had the chance to hand the
        # queued ones to its (busy) worker: it must not have.
        pids = [wait_start(start)["pid"]]
        assert queued.cancel() is True, "a task that has not started must be cancellable"
        assert queued.cancelled()
        with pytest.raises(CancelledError):
            queued.result(timeout=0)
        # pool.cancel() does the same for a task that has not started, and kills no worker.
        assert pool.cancel(other) is True
        assert other.cancelled()
        assert live_pids(pool) == pids
        ft.write_atomic(go, "")
        assert busy.result(timeout=TIMEOUT) == 1
        assert pool.submit(ft.square, 3).result(timeout=TIMEOUT) == 9
        assert live_pids(pool) == pids
    assert not mark.exists(), "the cancelled task ran"
    assert not other_mark.exists(), "the task cancelled by pool.cancel() ran"


def test_cancelling_tasks_queued_deeper_keeps_them_from_running(tmp_path: Path) -> None:
    """Several tasks queued behind a busy worker: each can be cancelled, and none runs."""
    start, go = str(tmp_path / "start"), str(tmp_path / "go")
    marks = [tmp_path / f"ran-{i}" for i in range(5)]
    with open_pool(tmp_path, 1, "forkserver") as pool:
        busy = pool.submit(ft.block, start, go, 1)
        queued = [pool.submit(ft.touch_and_return, str(m), i) for i, m in enumerate(marks)]
        wait_start(start)
        said = [f.cancel() for f in reversed(queued)][::-1]
        assert said == [True] * 5, "tasks that have not started must be cancellable"
        ft.write_atomic(go, "")
        assert busy.result(timeout=TIMEOUT) == 1
        for fut in queued:
            assert fut.cancelled()
            with pytest.raises(CancelledError):
                fut.result(timeout=0)
        assert pool.submit(ft.square, 2).result(timeout=TIMEOUT) == 4
    assert [m.name for m in marks if m.exists()] == [], "cancelled tasks ran"


@pytest.mark.parametrize("method", METHODS)
def test_pool_cancel_stops_a_running_task(method: str, tmp_path: Path) -> None:
    start = str(tmp_path / "start")
    with open_pool(tmp_path, 2, method) as pool:
        running = pool.submit(ft.block, start, release(tmp_path))
        info = wait_start(start)
        # The standard cancel() cannot stop a running task, and says so.
        assert running.cancel() is False
        assert not running.done()

        began = time.monotonic()
        assert pool.cancel(running, timeout=TIMEOUT) is True
        _figure(
            f"pool.cancel() returned  {method:10} {'running task':16} "
            f"{1000 * (time.monotonic() - began):7.1f} ms"
        )
        assert running.cancelled()
        assert running.done()
        with pytest.raises(CancelledError):
            running.result(timeout=0)
        assert info["pid"] not in live_pids(pool)
        assert_pool_goes_on(pool, tmp_path, [info["pid"]])


def test_pool_cancel_of_a_finished_task_returns_false(tmp_path: Path) -> None:
    with open_pool(tmp_path, 1, "forkserver") as pool:
        done = pool.submit(ft.square, 4)
        assert done.result(timeout=TIMEOUT) == 16
        assert pool.cancel(done) is False
        assert not done.cancelled()
        assert done.result() == 16

        failed = pool.submit(ft.raise_until, str(tmp_path / "n"), 1, "ValueError")
        assert isinstance(failed.exception(timeout=TIMEOUT), ValueError)
        assert pool.cancel(failed) is False
        assert not failed.cancelled()
        pids = live_pids(pool)
        assert pool.submit(ft.square, 5).result(timeout=TIMEOUT) == 25
        assert live_pids(pool) == pids  # no worker was killed for it


# ── 4. retries ───────────────────────────────────────────────────────────────────────────────


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("method", METHODS)
def test_retries_recover_from_worker_deaths(method: str, tmp_path: Path) -> None:
    counter = tmp_path / "attempts"
    with open_pool(tmp_path, 2, method, retries=2) as pool:
        assert pool.submit(ft.die_until, str(counter), 2).result(timeout=TIMEOUT) == 3
        assert lines(counter) == 3
        assert_pool_goes_on(pool, tmp_path, [])


def test_retries_exhausted_report_every_attempt(tmp_path: Path) -> None:
    counter = tmp_path / "attempts"
    with open_pool(tmp_path, 2, "forkserver", retries=1) as pool:
        exc = pool.submit(ft.die_until, str(counter), 100).exception(timeout=TIMEOUT)
        assert isinstance(exc, cleanbreak.WorkerDied), repr(exc)
        assert exc.exitcode == 5
        assert exc.task == 0
        assert lines(counter) == 2
        attempts = cast(Any, exc).attempts
        assert len(attempts) == 2
        assert all(isinstance(a, cleanbreak.WorkerDied) for a in attempts)
        assert attempts[-1] is exc
        assert attempts[0].pid != attempts[1].pid
        notes = getattr(exc, "__notes__", [])
        assert any("attempt 1 of 2 failed" in n and "WorkerDied" in n for n in notes), notes
        assert any("attempt 2 of 2" in n for n in notes), notes
        assert_pool_goes_on(pool, tmp_path, [a.pid for a in attempts])


def test_retries_apply_to_timeouts_and_can_be_set_per_task(tmp_path: Path) -> None:
    counter = tmp_path / "attempts"
    with open_pool(tmp_path, 2, "forkserver") as pool:  # no retries by default
        view = pool.options(task_timeout=0.5, retries=1)
        fut = view.submit(ft.block_once, str(counter), str(tmp_path / "start"), release(tmp_path))
        assert fut.result(timeout=TIMEOUT) == 2
        assert lines(counter) == 2

        # Without retries a death is final: one attempt.
        once = tmp_path / "once"
        exc = pool.submit(ft.die_until, str(once), 1).exception(timeout=TIMEOUT)
        assert isinstance(exc, cleanbreak.WorkerDied)
        assert lines(once) == 1
        # ...and the same task, with retries asked for through options(), succeeds.
        twice = tmp_path / "twice"
        assert (
            pool.options(retries=1).submit(ft.die_until, str(twice), 1).result(timeout=TIMEOUT) == 2
        )


def test_retry_on_retries_only_the_listed_exceptions(tmp_path: Path) -> None:
    with open_pool(tmp_path, 2, "forkserver", retries=1, retry_on=(OSError,)) as pool:
        recovers = tmp_path / "recovers"
        assert pool.submit(ft.raise_until, str(recovers), 1, "OSError").result(timeout=TIMEOUT) == 2
        assert lines(recovers) == 2

        not_listed = tmp_path / "not-listed"
        exc = pool.submit(ft.raise_until, str(not_listed), 5, "ValueError").exception(
            timeout=TIMEOUT
        )
        assert isinstance(exc, ValueError), repr(exc)
        assert lines(not_listed) == 1

        always = tmp_path / "always"
        exc = pool.submit(ft.raise_until, str(always), 5, "OSError").exception(timeout=TIMEOUT)
        assert isinstance(exc, OSError), repr(exc)
        assert lines(always) == 2
        assert len(cast(Any, exc).attempts) == 2
        assert any("attempt 1 of 2 failed: OSError" in n for n in exc.__notes__), exc.__notes__

        # Deaths are retried whatever retry_on says.
        deaths = tmp_path / "deaths"
        assert pool.submit(ft.die_until, str(deaths), 1).result(timeout=TIMEOUT) == 2


# ── 5. worker lifecycle ──────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("method", METHODS)
def test_max_tasks_per_worker_recycles_workers(method: str, tmp_path: Path) -> None:
    with open_pool(tmp_path, 1, method, max_tasks_per_worker=2) as pool:
        futures = [pool.submit(ft.pid_and_square, i) for i in range(6)]
        outcomes = [f.result(timeout=TIMEOUT) for f in futures]
        assert [sq for _pid, sq in outcomes] == [i * i for i in range(6)]
        pids = [pid for pid, _sq in outcomes]
        assert len(set(pids)) == 3, pids
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5], pids

        # A map's chunks are split at the budget: 7 items in chunks of 3 take 4 workers.
        mapped = list(pool.map(ft.pid_and_square, range(7), chunksize=3, timeout=TIMEOUT))
        assert [sq for _pid, sq in mapped] == [i * i for i in range(7)]
        groups = [len(list(g)) for _pid, g in itertools.groupby(pid for pid, _ in mapped)]
        assert groups == [2, 2, 2, 1], mapped
        assert not {pid for pid, _ in mapped} & set(pids)


def test_initializer_and_initargs(tmp_path: Path) -> None:
    log = tmp_path / "init"
    with open_pool(
        tmp_path, 2, "forkserver", initializer=ft.configure, initargs=("ready", str(log))
    ) as pool:
        assert (
            list(pool.map(ft.read_configured, range(8), chunksize=1, timeout=TIMEOUT))
            == ["ready"] * 8
        )
    assert lines(log) == 2  # once in each worker
    assert ft.read_configured() is None  # and not in the parent


@pytest.mark.parametrize("method", METHODS)
def test_an_initializer_that_raises_breaks_the_pool_at_once(method: str, tmp_path: Path) -> None:
    log, go = tmp_path / "init", tmp_path / "go"
    with open_pool(
        tmp_path, 2, method, initializer=ft.failing_initializer, initargs=(str(log), str(go))
    ) as pool:
        # The initializer holds until the tasks are queued, then raises.
        futures = [pool.submit(ft.square, i) for i in range(6)]
        settled = done_time(futures[0])
        ft.write_atomic(str(go), "")
        for fut in futures:
            exc = fut.exception(timeout=TIMEOUT)
            assert isinstance(exc, cleanbreak.BrokenPool), repr(exc)
            assert isinstance(exc, BrokenProcessPool)
            assert isinstance(exc.__cause__, ft.InitFailed), repr(exc.__cause__)
            assert "initializer" in str(exc)
        # The other worker may be writing its report right now: skip a file half made.
        reports = [p for p in tmp_path.glob("raised-*") if not p.name.endswith(".tmp")]
        raised = min(wait_start(p)["t"] for p in reports)
        _figure(
            f"initializer raised -> BrokenPool {method:10} {1000 * (settled[0] - raised):7.1f} ms"
        )
        with pytest.raises(cleanbreak.BrokenPool) as info:
            pool.submit(ft.square, 1)
        causes = []
        cause: BaseException | None = info.value
        while cause is not None:
            causes.append(cause)
            cause = cause.__cause__
        assert any(isinstance(c, ft.InitFailed) for c in causes), causes
    # No crash loop: the initializer ran at most once per worker.
    assert 1 <= lines(log) <= 2, lines(log)


def test_workers_that_die_while_starting_break_the_pool(tmp_path: Path) -> None:
    log = tmp_path / "init"
    with open_pool(
        tmp_path, 2, "forkserver", initializer=ft.exiting_initializer, initargs=(str(log),)
    ) as pool:
        exc = pool.submit(ft.square, 1).exception(timeout=TIMEOUT)
        assert isinstance(exc, cleanbreak.BrokenPool), repr(exc)
        message = str(exc)
        assert "3 workers in a row died while starting" in message, message
        assert "exit code 1" in message, message
        assert "initializer" in message, message
        with pytest.raises(cleanbreak.BrokenPool):
            pool.submit(ft.square, 2)
    # Two workers, and one replacement after each of the first two deaths: four at most.
    starts = lines(log)
    assert 3 <= starts <= 4, starts


# ── 6. memory limit ──────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("method", METHODS)
def test_a_task_over_the_memory_limit_fails_alone(method: str, tmp_path: Path) -> None:
    with open_pool(
        tmp_path, 1, method, initializer=ft.limit_memory, initargs=(200 * 1024**2,)
    ) as pool:
        assert pool.submit(ft.allocate, 10 * 1024**2).result(timeout=TIMEOUT) == 10 * 1024**2
        exc = pool.submit(ft.allocate, 2 * 1024**3).exception(timeout=TIMEOUT)
        assert isinstance(exc, (MemoryError, cleanbreak.WorkerDied)), repr(exc)
        _figure(f"2 GiB under RLIMIT_AS    {method:10} -> {type(exc).__name__}")
        assert pool.submit(ft.allocate, 10 * 1024**2).result(timeout=TIMEOUT) == 10 * 1024**2
        assert_pool_goes_on(
            pool, tmp_path, [exc.pid] if isinstance(exc, cleanbreak.WorkerDied) else []
        )


# ── 7. bad payloads ──────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def payload_pool() -> Iterator[cleanbreak.Pool]:
    with cleanbreak.Pool(2, mp_context="forkserver") as pool:
        yield pool


def _fails_alone(pool: cleanbreak.Pool, fut: Future[Any]) -> BaseException:
    """The task's error; the pool goes on with the same workers (none was killed)."""
    pids = sorted(live_pids(pool))
    exc = fut.exception(timeout=TIMEOUT)
    assert exc is not None
    assert pool.submit(ft.square, 7).result(timeout=TIMEOUT) == 49
    assert sorted(live_pids(pool)) == pids
    return exc


def _serialization_error(exc: BaseException | None, part: str) -> cleanbreak.SerializationError:
    assert isinstance(exc, cleanbreak.SerializationError), repr(exc)
    assert isinstance(exc, pickle.PicklingError)
    assert exc.part == part, exc
    assert part in str(exc)
    assert_roundtrip(exc, "part", "reason")
    return exc


def test_an_unpicklable_function_fails_its_task(payload_pool: cleanbreak.Pool) -> None:
    lock = threading.Lock()  # a lambda goes by value, but not one that holds a lock
    exc = _fails_alone(payload_pool, payload_pool.submit(lambda: lock))
    _serialization_error(exc, "function")


def test_an_unpicklable_argument_fails_its_task(payload_pool: cleanbreak.Pool) -> None:
    exc = _fails_alone(payload_pool, payload_pool.submit(ft.identity, threading.Lock()))
    assert "lock" in str(_serialization_error(exc, "arguments"))


def test_an_argument_that_will_not_unpickle_in_the_worker_fails_its_task(
    payload_pool: cleanbreak.Pool,
) -> None:
    exc = _fails_alone(payload_pool, payload_pool.submit(ft.identity, ft.Unloadable()))
    assert "refuses to be unpickled" in str(_serialization_error(exc, "arguments"))


def test_an_unpicklable_result_fails_its_task(payload_pool: cleanbreak.Pool) -> None:
    exc = _fails_alone(payload_pool, payload_pool.submit(ft.return_lock))
    assert "lock" in str(_serialization_error(exc, "result"))


def test_a_result_that_will_not_unpickle_fails_its_task(payload_pool: cleanbreak.Pool) -> None:
    exc = _fails_alone(payload_pool, payload_pool.submit(ft.return_unloadable))
    assert "refuses to be unpickled" in str(_serialization_error(exc, "result"))


@pytest.mark.parametrize("task", [ft.raise_lock_holding, ft.raise_two_arg])
def test_an_exception_that_will_not_pickle_fails_its_task(
    payload_pool: cleanbreak.Pool, task: Callable[[], int]
) -> None:
    exc = _fails_alone(payload_pool, payload_pool.submit(task))
    error = _serialization_error(exc, "exception")
    assert ("LockHoldingError" if task is ft.raise_lock_holding else "TwoArgError") in str(error)


@pytest.mark.parametrize(
    ("task", "arg", "kind"),
    [
        (ft.raise_system_exit, 3, "SystemExit"),
        (ft.raise_keyboard_interrupt, None, "KeyboardInterrupt"),
    ],
)
def test_system_exit_and_keyboard_interrupt_in_a_task_fail_only_it(
    payload_pool: cleanbreak.Pool, task: Callable[[Any], int], arg: Any, kind: str
) -> None:
    exc = _fails_alone(payload_pool, payload_pool.submit(task, arg))
    assert isinstance(exc, cleanbreak.TaskAborted), repr(exc)
    assert exc.kind == kind
    assert_roundtrip(exc, "kind", "detail")


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt"])
def test_a_result_that_raises_as_it_is_unpickled_fails_its_task_only(
    payload_pool: cleanbreak.Pool, kind: str
) -> None:
    """Unpickling a result runs the user's code in the manager thread. Whatever it raises,
    that task fails and the pool goes on (it used to end the manager thread)."""
    exc = _fails_alone(payload_pool, payload_pool.submit(ft.return_raises_on_load, kind))
    assert kind in str(_serialization_error(exc, "result"))
    assert list(payload_pool.map(ft.square, range(5), timeout=TIMEOUT)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt"])
def test_a_result_that_raises_as_it_is_pickled_fails_its_task_and_keeps_the_worker(
    payload_pool: cleanbreak.Pool, kind: str
) -> None:
    """The same exception raised by the task gives TaskAborted; raised while the worker pickles
    the result, it is a SerializationError, like any result that will not pickle. Either way
    the task fails alone and its worker lives on (it used to die)."""
    exc = _fails_alone(payload_pool, payload_pool.submit(ft.return_raises_on_dump, kind))
    assert kind in str(_serialization_error(exc, "result"))


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt"])
def test_an_argument_that_raises_as_it_is_pickled_or_unpickled_fails_its_task(
    payload_pool: cleanbreak.Pool, kind: str
) -> None:
    """Pickled by the manager thread, unpickled by the worker: neither may end."""
    exc = _fails_alone(payload_pool, payload_pool.submit(ft.identity, ft.RaisesOnDump(kind)))
    assert kind in str(_serialization_error(exc, "arguments"))
    exc = _fails_alone(payload_pool, payload_pool.submit(ft.identity, ft.RaisesOnLoad(kind)))
    assert kind in str(_serialization_error(exc, "arguments"))


@pytest.mark.parametrize("fn", [ft.raises_on_load_at_6, ft.raises_on_dump_at_6])
def test_a_result_that_raises_system_exit_in_a_map_chunk_fails_only_its_item(
    payload_pool: cleanbreak.Pool, fn: Callable[[int], Any]
) -> None:
    results = list(payload_pool.map(fn, range(10), chunksize=5, return_exceptions=True))
    assert isinstance(results[6], cleanbreak.SerializationError), results
    assert results[:6] + results[7:] == [i * i for i in range(10) if i != 6], results


def test_a_done_callback_that_raises_system_exit_does_not_end_the_pool(
    payload_pool: cleanbreak.Pool, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Done-callbacks run in the manager thread. One that raises SystemExit is logged, as
    Future logs an Exception; the callbacks after it still run, and the pool goes on."""
    ran: list[int] = []

    def exits(_: Future[Any]) -> None:
        raise SystemExit(1)

    # The task waits until the callbacks are added: on a future already done, Future runs a
    # new callback at once, in the caller's thread.
    go = tmp_path / "go"
    fut = payload_pool.submit(tasks.wait_then_return, str(go), None, 9)
    fut.add_done_callback(exits)
    fut.add_done_callback(lambda f: ran.append(f.result()))
    tasks.touch(go)
    assert fut.result(timeout=TIMEOUT) == 9
    assert payload_pool.submit(ft.square, 4).result(timeout=TIMEOUT) == 16
    assert ran == [9]
    assert any("exception calling callback" in r.message for r in caplog.records)


def _chunked_outcomes(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """Every item's result or error, for a map in chunks of 5 (``cleanbreak.map`` runs every
    item even when some fail)."""
    return cleanbreak.map(
        fn,
        items,
        workers=2,
        mp_context="forkserver",
        chunksize=5,
        return_exceptions=True,
    )


def test_an_unpicklable_result_in_a_map_chunk_fails_only_its_item(
    payload_pool: cleanbreak.Pool,
) -> None:
    """Chunks of 5: item 6's result cannot be pickled; the other items of its chunk keep their
    results, and the pool's workers live on."""
    results = payload_pool.map(
        ft.lock_at, range(10), itertools.repeat(6), chunksize=5, timeout=TIMEOUT
    )
    assert [next(results) for _ in range(6)] == [i * i for i in range(6)]
    with pytest.raises(cleanbreak.SerializationError) as info:
        next(results)
    assert info.value.part == "result"
    assert payload_pool.submit(ft.square, 8).result(timeout=TIMEOUT) == 64

    outcomes = _chunked_outcomes(ft.lock_at_6, range(10))
    assert isinstance(outcomes[6], cleanbreak.SerializationError), outcomes
    assert outcomes[:6] + outcomes[7:] == [i * i for i in range(10) if i != 6], outcomes


def test_a_result_that_will_not_unpickle_in_a_map_chunk_fails_only_its_item() -> None:
    outcomes = _chunked_outcomes(ft.unloadable_at_6, range(10))
    error = outcomes[6]
    assert isinstance(error, cleanbreak.SerializationError), outcomes
    assert error.part == "result"
    assert "refuses to be unpickled" in str(error)
    assert outcomes[:6] + outcomes[7:] == [i * i for i in range(10) if i != 6], outcomes


def test_an_unpicklable_argument_in_a_map_chunk_fails_only_its_item(
    payload_pool: cleanbreak.Pool,
) -> None:
    """Chunks of 5: item 7's argument cannot be pickled; the other items of its chunk keep
    their results (contract 5: "that one task fails")."""
    items: list[Any] = [0, 1, 2, 3, 4, 5, 6, threading.Lock(), 8, 9]
    results = payload_pool.map(ft.identity, items, chunksize=5, timeout=TIMEOUT)
    assert [next(results) for _ in range(5)] == list(range(5))
    assert [next(results) for _ in range(2)] == [5, 6], "the chunk's good items were failed too"
    with pytest.raises(cleanbreak.SerializationError) as info:
        next(results)
    assert info.value.part == "arguments"
    assert payload_pool.submit(ft.square, 8).result(timeout=TIMEOUT) == 64

    items[7] = ft.Unloadable()  # pickles here, fails to unpickle in the worker
    outcomes = _chunked_outcomes(ft.identity, items)
    error = outcomes[7]
    assert isinstance(error, cleanbreak.SerializationError), outcomes
    assert error.part == "arguments"
    assert outcomes[:7] + outcomes[8:] == [0, 1, 2, 3, 4, 5, 6, 8, 9], outcomes


# ── 8. the error hierarchy ───────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "make",
    [
        lambda: cleanbreak.WorkerDied(5, 101, 3),
        lambda: cleanbreak.TaskTimeout(0.5, 102, 4),
        lambda: cleanbreak.SerializationError("result", "cannot pickle '_thread.lock' object"),
        lambda: cleanbreak.TaskAborted("SystemExit", "3"),
        lambda: cleanbreak.BrokenPool("3 workers in a row died while starting"),
    ],
    ids=["WorkerDied", "TaskTimeout", "SerializationError", "TaskAborted", "BrokenPool"],
)
def test_errors_keep_their_notes_and_attempts_through_pickle(
    make: Callable[[], BaseException],
) -> None:
    """A retried task's error carries its attempts, in ``.attempts`` and in its notes. Like a
    built-in exception's notes, they survive a trip through pickle (to another process, a log
    queue, a Dask client)."""
    error = make()
    earlier = cleanbreak.WorkerDied(-signal.SIGKILL, 100, 3)
    error.add_note("attempt 1 of 2 failed: WorkerDied: ...")
    error.add_note("attempt 2 of 2 failed: this error")
    cast(Any, error).attempts = [earlier, error]
    clone = pickle.loads(pickle.dumps(error))
    assert getattr(clone, "__notes__", None) == error.__notes__
    attempts = getattr(clone, "attempts", None)
    assert attempts is not None, "the attempts were lost"
    assert [type(a) for a in attempts] == [cleanbreak.WorkerDied, type(error)]
    assert attempts[0].pid == 100


def test_errors_subclass_the_standard_types_and_pickle_intact() -> None:
    died = cleanbreak.WorkerDied(-signal.SIGKILL, 1234, 5)
    assert isinstance(died, BrokenProcessPool)
    assert isinstance(died, cleanbreak.CleanbreakError)
    assert (died.exitcode, died.signal, died.pid, died.task) == (-9, signal.SIGKILL, 1234, 5)
    assert "SIGKILL" in str(died)
    assert_roundtrip(died, "exitcode", "signal", "pid", "task")
    exited = cleanbreak.WorkerDied(3, 99)
    assert exited.signal is None
    assert "code 3" in str(exited)
    assert_roundtrip(exited, "exitcode", "signal", "pid", "task")

    timeout = cleanbreak.TaskTimeout(0.25, 4321, 6)
    assert isinstance(timeout, TimeoutError)
    assert not isinstance(timeout, BrokenProcessPool)
    assert_roundtrip(timeout, "timeout", "pid", "task")

    bad = cleanbreak.SerializationError("arguments", "cannot pickle '_thread.lock' object")
    assert isinstance(bad, pickle.PicklingError)
    assert_roundtrip(bad, "part", "reason")

    broken = cleanbreak.BrokenPool("the pool's initializer raised")
    assert isinstance(broken, BrokenProcessPool)
    assert not isinstance(broken, cleanbreak.WorkerDied)
    assert_roundtrip(broken, "args")

    aborted = cleanbreak.TaskAborted("SystemExit", "3")
    assert isinstance(aborted, Exception)
    assert not isinstance(aborted, (SystemExit, KeyboardInterrupt))
    assert_roundtrip(aborted, "kind", "detail")
