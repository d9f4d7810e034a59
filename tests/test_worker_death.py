"""A worker that dies fails the one task it was running (contract 2); a broken start-up stops
the pool instead of looping."""

from __future__ import annotations

import contextlib
import itertools
import select
import selectors
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cleanbreak
from tests import tasks
from tests.tasks import GUARD


def _two_workers_run_at_once(pool: cleanbreak.Pool, where: Path, tag: str) -> None:
    """Two tasks that each wait for the other: only two live workers can finish them."""
    a, b = str(where / f"{tag}-a"), str(where / f"{tag}-b")
    meet = [pool.submit(tasks.rendezvous, a, b), pool.submit(tasks.rendezvous, b, a)]
    assert [f.result(timeout=2 * GUARD) for f in meet] == [True, True]


@pytest.mark.parametrize(
    ("killer", "arg", "exitcode", "sig"),
    [
        (tasks.exit_now, 3, 3, None),
        (tasks.sigkill_self, None, -signal.SIGKILL, signal.SIGKILL),
    ],
    ids=["os._exit(3)", "SIGKILL"],
)
def test_a_dying_worker_fails_only_its_task(
    start_method: str,
    tmp_path: Path,
    killer: Callable[[Any], int],
    arg: Any,
    exitcode: int,
    sig: signal.Signals | None,
) -> None:
    with cleanbreak.Pool(2, mp_context=start_method) as pool:
        before = [pool.submit(tasks.square, i) for i in range(5)]
        doomed = pool.submit(killer, arg)
        after = [pool.submit(tasks.square, i) for i in range(5, 10)]

        exc = doomed.exception(timeout=GUARD)
        assert isinstance(exc, cleanbreak.WorkerDied), repr(exc)
        assert exc.exitcode == exitcode
        assert exc.signal == sig
        assert exc.pid > 0
        text = str(exc)
        assert (sig.name if sig else f"code {exitcode}") in text, text
        assert [f.result(timeout=GUARD) for f in before + after] == [i * i for i in range(10)]

        # A new worker replaced the dead one: two tasks can still run side by side.
        _two_workers_run_at_once(pool, tmp_path, "after")
        assert list(pool.map(tasks.square, range(20), timeout=GUARD)) == [i * i for i in range(20)]


def test_a_result_pipe_at_its_end_is_not_read_in_a_loop_until_the_death(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker's result pipe reaches its end a moment before its death is seen (its threads
    # exit first; under load, milliseconds). The manager then waits for the death, rather than
    # read the pipe's end again and again. Here the task closes the pipe and lives on a while.
    with cleanbreak.Pool(1) as pool:
        backend: Any = pool._backend
        reads: list[int] = []
        real = backend._on_readable

        def spy(w: Any) -> None:
            reads.append(w.pid)
            real(w)

        monkeypatch.setattr(backend, "_on_readable", spy)
        doomed = pool.submit(tasks.close_results_then_exit, 0.3)
        exc = doomed.exception(timeout=GUARD)
        assert isinstance(exc, cleanbreak.WorkerDied) and exc.exitcode == 3, repr(exc)
        assert reads.count(exc.pid) <= 2, f"{reads.count(exc.pid)} reads of a pipe at its end"
        assert pool.submit(tasks.square, 4).result(timeout=GUARD) == 16  # its replacement


def test_tasks_queued_on_the_dead_worker_still_run(start_method: str) -> None:
    # One worker: the tasks behind the fatal one may already sit in its pipe when it dies.
    with cleanbreak.Pool(1, mp_context=start_method) as pool:
        doomed = pool.submit(tasks.exit_now, 4)
        behind = [pool.submit(tasks.square, i) for i in range(6)]
        assert isinstance(doomed.exception(timeout=GUARD), cleanbreak.WorkerDied)
        assert [f.result(timeout=GUARD) for f in behind] == [i * i for i in range(6)]


def test_a_death_in_a_map_chunk_fails_only_that_item(start_method: str) -> None:
    with cleanbreak.Pool(2, mp_context=start_method) as pool:
        results = pool.map(tasks.die_on, range(10), itertools.repeat(7), chunksize=5, timeout=GUARD)
        # Items 5 and 6 share the fatal item's chunk: they keep their results.
        assert [next(results) for _ in range(7)] == [i * i for i in range(7)]
        with pytest.raises(cleanbreak.WorkerDied) as info:
            next(results)
        assert info.value.exitcode == 7
        assert info.value.task == 7
    # Items 8 and 9, after it in the same chunk, ran too: it was the only failure.
    with pytest.raises(cleanbreak.WorkerDied) as info:
        cleanbreak.map(
            tasks.star,
            [(tasks.die_on, (x, 7)) for x in range(10)],
            workers=2,
            chunksize=5,
            mp_context=start_method,
        )
    assert info.value.task == 7
    notes = getattr(info.value, "__notes__", [])
    assert any("1 of 10 tasks failed" in note for note in notes), notes


def test_initializer_and_initargs(start_method: str) -> None:
    with cleanbreak.Pool(
        2, mp_context=start_method, initializer=tasks.set_global, initargs=("configured",)
    ) as pool:
        assert (
            list(pool.map(tasks.read_global, range(6), chunksize=1, timeout=GUARD))
            == ["configured"] * 6
        )
    # Only the workers ran it.
    assert tasks.read_global() is None


def test_a_failing_initializer_breaks_the_pool(start_method: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    pool = cleanbreak.Pool(
        2,
        mp_context=start_method,
        initializer=tasks.failing_initializer,
        initargs=(str(tmp_path), str(go)),
    )
    try:
        # The initializer holds until the tasks are queued, then raises.
        futures = [pool.submit(tasks.square, i) for i in range(6)]
        tasks.touch(go)
        for fut in futures:
            exc = fut.exception(timeout=GUARD)
            assert isinstance(exc, cleanbreak.BrokenPool), repr(exc)
            assert isinstance(exc.__cause__, tasks.InitError)
            assert "initializer" in str(exc)
            assert isinstance(exc.__cause__.__cause__, cleanbreak.RemoteTraceback)
            assert "failing_initializer" in str(exc.__cause__.__cause__)
        with pytest.raises(cleanbreak.BrokenPool):
            pool.submit(tasks.square, 1)
    finally:
        assert tasks.shutdown_within(pool, GUARD), "shutdown hung"
    # No crash loop: about one start per worker, not an ever-growing number.
    starts = len(list(tmp_path.glob("init-*")))
    assert 1 <= starts <= 6, starts


def test_workers_that_die_while_starting_break_the_pool(tmp_path: Path) -> None:
    pool = cleanbreak.Pool(
        2, mp_context="forkserver", initializer=tasks.dying_initializer, initargs=(str(tmp_path),)
    )
    try:
        with pytest.raises(cleanbreak.BrokenPool) as info:
            pool.submit(tasks.square, 1).result(timeout=GUARD)
        assert "exit code 5" in str(info.value)  # what the workers died of
        with pytest.raises(cleanbreak.BrokenPool):
            pool.submit(tasks.square, 1).result(timeout=GUARD)
    finally:
        assert tasks.shutdown_within(pool, GUARD), "shutdown hung"
    starts = len(list(tmp_path.glob("init-*")))
    assert 1 <= starts <= 8, starts


class _DeathFirstSelector(selectors.DefaultSelector):
    """The kernel may report a worker's exit before the end of file on its result pipe, in one
    batch. This selector always does, and holds the stale pipe event back until the fd is
    readable again: by then its number belongs to the replacement worker, which has written
    its first frame there."""

    def select(self, timeout: float | None = None) -> Any:
        events = super().select(timeout)
        deaths = [(k, m) for k, m in events if k.data is not None and k.fd == k.data.deathfd]
        if not deaths:
            return events
        rest = [(k, m) for k, m in events if (k, m) not in deaths]
        # (A pipe whose end the manager read before the death is no longer watched.)
        watched = self.get_map()
        stale = [watched[k.data.reader.fd] for k, _ in deaths if k.data.reader.fd in watched]
        rest = [(k, m) for k, m in rest if k not in stale]

        def batch() -> Iterator[tuple[selectors.SelectorKey, int]]:
            yield from deaths  # the manager handles these first: a replacement starts
            yield from rest
            for key in stale:
                with contextlib.suppress(OSError):  # closed, and not reused: no replacement
                    select.select([key.fd], [], [], GUARD)
                yield key, selectors.EVENT_READ

        return batch()


def test_events_of_a_dead_worker_are_not_taken_for_its_replacement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(selectors, "DefaultSelector", _DeathFirstSelector)
    with cleanbreak.Pool(1, mp_context="fork") as pool:
        for _ in range(3):
            with pytest.raises(cleanbreak.WorkerDied):
                pool.submit(tasks.exit_now, 3).result(timeout=GUARD)
            assert pool.submit(tasks.square, 7).result(timeout=GUARD) == 49
