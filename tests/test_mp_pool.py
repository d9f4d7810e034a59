"""``cleanbreak.multiprocessing.Pool``: the stock API and its semantics, with real workers.
(``tests/system/test_mp_dropin.py`` sends it Ctrl-C.)"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cleanbreak
from cleanbreak import _map
from cleanbreak.multiprocessing import Pool
from tests import tasks
from tests.tasks import GUARD, TaskError


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    with Pool(2) as p:
        yield p


def test_the_stock_calls_give_the_stock_results(pool: Pool) -> None:
    assert pool.map(tasks.square, range(10)) == [x * x for x in range(10)]
    assert pool.map(tasks.square, []) == []
    assert pool.starmap(tasks.add, [(1, 2), (3, 4)]) == [3, 7]
    assert pool.apply(tasks.add, (1, 2)) == 3
    assert pool.apply(tasks.combine, (1,), {"b": 2, "scale": 3}) == 9
    assert pool.apply_async(tasks.square, (7,)).get(GUARD) == 49
    assert pool.map_async(tasks.square, range(9), 2).get(GUARD) == [x * x for x in range(9)]
    assert pool.starmap_async(tasks.add, [(1, 1)] * 3).get(GUARD) == [2, 2, 2]
    assert pool.map_async(tasks.square, []).get(GUARD) == []
    assert list(pool.imap(tasks.square, range(5))) == [0, 1, 4, 9, 16]
    assert list(pool.imap(tasks.square, range(5), 2)) == [0, 1, 4, 9, 16]
    assert sorted(pool.imap_unordered(tasks.square, range(5))) == [0, 1, 4, 9, 16]


def test_async_results_say_what_they_are(pool: Pool) -> None:
    result = pool.apply_async(tasks.square, (3,))
    result.wait(GUARD)
    assert result.ready() and result.successful() and result.get() == 9
    failed = pool.apply_async(tasks.raise_task_error, (1,))
    failed.wait(GUARD)
    assert failed.ready() and not failed.successful()
    with pytest.raises(TaskError):
        failed.get()


def test_get_times_out_with_multiprocessing_timeout_error(pool: Pool) -> None:
    slow = pool.apply_async(tasks.sleep_then, (0.5, 1))
    with pytest.raises(multiprocessing.TimeoutError):
        slow.get(0.01)
    with pytest.raises(ValueError, match="not ready"):
        slow.successful()
    assert slow.get(GUARD) == 1
    it = pool.imap(tasks.sleep_star, [(0.5, 2)], 1)
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(0.01)
    assert it.next(GUARD) == 2
    with pytest.raises(StopIteration):
        it.next(GUARD)


def test_callbacks_get_the_value_or_the_error(pool: Pool) -> None:
    got: list[object] = []
    done = threading.Event()

    def keep(x: object) -> None:
        got.append(x)
        done.set()

    pool.apply_async(tasks.square, (4,), callback=keep).wait(GUARD)
    assert done.wait(GUARD) and got == [16]
    done.clear()
    pool.apply_async(tasks.raise_task_error, (1,), error_callback=keep).wait(GUARD)
    assert done.wait(GUARD) and isinstance(got[1], TaskError)
    done.clear()
    pool.map_async(tasks.square, range(3), callback=keep).wait(GUARD)
    assert done.wait(GUARD) and got[2] == [0, 1, 4]


def test_imap_raises_a_failure_in_its_turn_and_goes_on(pool: Pool) -> None:
    it = pool.imap(tasks.raise_task_error, [-1, 2, -3])
    assert next(it) == -1
    with pytest.raises(TaskError):
        next(it)
    assert next(it) == -3


def test_map_raises_the_tasks_exception(pool: Pool) -> None:
    with pytest.raises(TaskError):
        pool.map(tasks.raise_task_error, [-1, 2, -3])
    with pytest.raises(TaskError):
        pool.map_async(tasks.raise_task_error, [-1, 2, -3], 1).get(GUARD)


def test_a_list_map_sends_its_full_window_once_the_probes_are_back(
    pool: Pool, monkeypatch: pytest.MonkeyPatch, unit_sizes: Callable[[Any], list[int]]
) -> None:
    # map() returns a list: its caller takes every piece as it comes, so once a first result
    # has sized the chunks, the whole window goes out at once, in chunks of at most a quarter
    # of the input per worker (as the stock pool's map). It used to keep the small window of
    # the probes and grow it by doubling: chunks of 8, 8, 16, 16, 28, ... (a round trip each).
    # A chunk's target time so long that only that cap sizes the chunks, whatever the timing.
    monkeypatch.setattr(_map, "CHUNK_SECONDS", 1e9)
    # The first map of the function in this pool (a later one starts with its time: no probes).
    monkeypatch.setattr(pool._pool, "_item_times", _map.ItemTimes())
    sizes = unit_sizes(pool._pool._backend)
    assert pool.map(tasks.square, range(1000)) == [i * i for i in range(1000)]
    probes = sizes.index(125)
    assert 1 <= probes <= 2 and set(sizes[:probes]) == {1}, sizes
    assert sizes[probes:] == [125] * ((1000 - probes) // 125) + [(1000 - probes) % 125], sizes


def test_apply_async_tasks_queue_in_busy_workers_and_a_free_one_takes_them_back(
    tmp_path: Path,
) -> None:
    # As the stock pool queues every task: a worker is sent its next task while it runs one
    # (no round trip per task), and one that waits behind a long task goes to a worker that
    # comes free. Task 0 runs until every other task has started; task 1 until the test says
    # go, once the rest wait. A task left behind task 0 would make it wait until GUARD: False.
    folder, go, last = str(tmp_path), str(tmp_path / "go"), 9
    with Pool(2) as p:
        first = p.apply_async(tasks.meet_all, ((folder, 0, last),))
        second = p.apply_async(tasks.wait_then_return, (go, f"{folder}/started-1", True))
        rest = [p.apply_async(tasks.meet_all, ((folder, i, 0),)) for i in range(2, last + 1)]
        backend: Any = p._pool._backend
        tasks.touch(go)
        assert [r.get(GUARD) for r in [first, second, *rest]] == [True] * (last + 1)
        assert backend.taken_back >= 1  # sent ahead behind task 0, then taken back


def test_a_killed_worker_fails_its_own_task_and_close_join_return() -> None:
    p = Pool(2)
    dead = p.apply_async(tasks.sigkill_self, ())
    fine = p.apply_async(tasks.square, (5,))
    with pytest.raises(cleanbreak.WorkerDied):
        dead.get(GUARD)
    assert fine.get(GUARD) == 25
    outcomes = p.map_async(tasks.sigkill_on_3, range(6), 1)
    with pytest.raises(cleanbreak.WorkerDied):
        outcomes.get(GUARD)
    assert p.map(tasks.square, range(4)) == [0, 1, 4, 9]  # the pool goes on
    p.close()
    p.join()


def test_close_join_terminate_and_the_with_block() -> None:
    p = Pool(1)
    with pytest.raises(ValueError, match="still running"):
        p.join()
    result = p.map_async(tasks.square, range(20))
    p.close()
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply_async(tasks.square, (1,))
    p.join()
    assert result.get(0) == [x * x for x in range(20)]
    with Pool(1) as q:
        stuck = q.apply_async(tasks.sleep_then, (GUARD, 1))
    # The with block's exit terminates, as the stock one does; the task it stopped fails.
    with pytest.raises(Exception, match="stopped before it finished"):
        stuck.get(GUARD)


def test_the_constructor_takes_the_stock_arguments() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Pool(0)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Pool(1, initializer=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(1, maxtasksperchild=0)
    ctx = multiprocessing.get_context("spawn")
    with Pool(1, tasks.set_global, ("ready",), 2, ctx) as p:
        assert p.apply(tasks.read_global) == "ready"
        pids = {p.apply(tasks.getpid_of_worker) for _ in range(4)}
        assert len(pids) >= 2  # maxtasksperchild=2: the worker was replaced
        assert os.getpid() not in pids


def test_the_module_is_multiprocessing_with_its_pool_changed() -> None:
    # Code written as `import multiprocessing as mp` moves over by changing that line alone:
    # `mp.get_context("spawn").Pool(4)` is the drop-in, on that start method, and the other
    # names are the stock ones.
    from cleanbreak import multiprocessing as mp

    assert mp.cpu_count is multiprocessing.cpu_count and mp.Queue == multiprocessing.Queue
    assert mp.get_start_method is multiprocessing.get_start_method
    with pytest.raises(AttributeError, match="no attribute 'Pools'"):
        mp.Pools  # noqa: B018
    ctx = mp.get_context("spawn")
    assert ctx.get_start_method() == "spawn"
    assert ctx.Process is multiprocessing.get_context("spawn").Process
    tasks.set_global("set in the parent")  # a forked worker would see it; a spawned one not
    try:
        with ctx.Pool(1, maxtasksperchild=3) as p:
            assert isinstance(p, Pool)
            assert p.apply(tasks.read_global) is None
        with mp.get_context("fork").Pool(1) as p, Pool(1, context=ctx) as q:
            assert p.apply(tasks.read_global) == "set in the parent"
            assert q.apply(tasks.read_global) is None
        assert ctx.get_context("fork").get_start_method() == "fork"
    finally:
        tasks.set_global(None)


def test_errors_reach_get_as_the_stock_pool_raises_them(pool: Pool) -> None:
    """A task's exception has a ``multiprocessing.pool.RemoteTraceback`` as its cause, and a
    result that cannot be pickled raises ``MaybeEncodingError``, to the callback too."""
    import multiprocessing.pool as stock

    with pytest.raises(TaskError) as info:
        pool.apply(tasks.raise_task_error, (1,))
    cause: Any = info.value.__cause__
    assert type(cause) is stock.RemoteTraceback  # type: ignore[attr-defined]
    assert "raise_task_error" in cause.tb
    seen: list[BaseException] = []
    result = pool.apply_async(tasks.return_lock, (), error_callback=seen.append)
    with pytest.raises(stock.MaybeEncodingError):  # type: ignore[attr-defined]
        result.get(GUARD)
    assert isinstance(seen[0], stock.MaybeEncodingError)  # type: ignore[attr-defined]
