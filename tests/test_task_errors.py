"""Task errors (contract 6) and bad payloads (contract 5): one task fails, clearly, and the
pool goes on."""

from __future__ import annotations

import inspect
import itertools
import pickle
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest

import cleanbreak
from tests import tasks
from tests.tasks import GUARD


def _raise_line() -> int:
    lines, first = inspect.getsourcelines(tasks.raise_task_error)
    return first + next(i for i, line in enumerate(lines) if "RAISE-LINE" in line)


def _pool_still_works(pool: cleanbreak.Pool) -> None:
    assert pool.submit(tasks.square, 12).result(timeout=GUARD) == 144
    assert list(pool.map(tasks.square, range(5), timeout=GUARD)) == [0, 1, 4, 9, 16]


# ── task errors ──────────────────────────────────────────────────────────────────────────────


def test_task_exception_arrives_as_its_own_type_with_the_remote_traceback(
    pool: cleanbreak.Pool,
) -> None:
    exc = pool.submit(tasks.raise_task_error, 5).exception(timeout=GUARD)
    assert type(exc) is tasks.TaskError
    assert exc.args == ("bad input 5",)
    cause = exc.__cause__
    assert isinstance(cause, cleanbreak.RemoteTraceback)
    text = str(cause)
    assert "raise_task_error" in text
    assert f'tasks.py", line {_raise_line()}, in raise_task_error' in text
    assert "TaskError: bad input 5" in text


def test_map_task_exception_has_the_remote_traceback(pool: cleanbreak.Pool) -> None:
    results = pool.map(tasks.raise_task_error, [-1, 2], timeout=GUARD)
    assert next(results) == -1
    with pytest.raises(tasks.TaskError, match="bad input 2") as info:
        next(results)
    assert isinstance(info.value.__cause__, cleanbreak.RemoteTraceback)
    assert f"line {_raise_line()}, in raise_task_error" in str(info.value.__cause__)


def test_the_remote_traceback_is_printed_with_the_error(pool: cleanbreak.Pool) -> None:
    exc = pool.submit(tasks.raise_task_error, 5).exception(timeout=GUARD)
    assert exc is not None
    printed = "".join(traceback.format_exception(exc))
    assert "raise_task_error" in printed
    assert "direct cause" in printed


def test_a_failing_task_does_not_stop_the_others(pool: cleanbreak.Pool) -> None:
    futures = [pool.submit(tasks.fail_on, i, {4}) for i in range(10)]
    for i, fut in enumerate(futures):
        if i == 4:
            assert isinstance(fut.exception(timeout=GUARD), tasks.TaskError)
        else:
            assert fut.result(timeout=GUARD) == i * i


@pytest.mark.parametrize(
    ("fn", "arg", "kind"),
    [
        (tasks.raise_system_exit, 3, "SystemExit"),
        (tasks.raise_keyboard_interrupt, None, "KeyboardInterrupt"),
    ],
    ids=["SystemExit", "KeyboardInterrupt"],
)
def test_system_exit_and_keyboard_interrupt_fail_only_that_task(
    pool: cleanbreak.Pool, fn: Callable[[Any], int], arg: Any, kind: str
) -> None:
    before = pool.submit(tasks.square, 2)
    fut = pool.submit(fn, arg)
    after = [pool.submit(tasks.square, i) for i in range(5)]
    exc = fut.exception(timeout=GUARD)
    assert isinstance(exc, cleanbreak.TaskAborted)
    assert exc.kind == kind
    assert kind in str(exc)
    if kind == "SystemExit":
        assert "3" in exc.detail
    assert isinstance(exc.__cause__, cleanbreak.RemoteTraceback)
    assert fn.__name__ in str(exc.__cause__)
    assert before.result(timeout=GUARD) == 4
    assert [f.result(timeout=GUARD) for f in after] == [0, 1, 4, 9, 16]
    _pool_still_works(pool)


def _only_failure(exc: BaseException, total: int) -> None:
    """``cleanbreak.map`` ran every task and says that this one failure was the only one."""
    notes = getattr(exc, "__notes__", [])
    assert any(f"1 of {total} tasks failed" in note for note in notes), (exc, notes)


def test_system_exit_in_a_map_chunk_fails_only_that_item(pool: cleanbreak.Pool) -> None:
    pids_before = set(pool.map(tasks.getpid_of_worker, range(20), chunksize=1, timeout=GUARD))
    results = pool.map(tasks.exit_on, range(8), itertools.repeat(5), chunksize=8, timeout=GUARD)
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    with pytest.raises(cleanbreak.TaskAborted):
        next(results)
    # No worker died over it.
    pids_after = set(pool.map(tasks.getpid_of_worker, range(20), chunksize=1, timeout=GUARD))
    assert pids_after <= pids_before
    # And the items after it in the chunk ran too.
    with pytest.raises(cleanbreak.TaskAborted) as info:
        cleanbreak.map(
            tasks.star,
            [(tasks.exit_on, (x, 5)) for x in range(8)],
            workers=1,
            chunksize=8,
            mp_context="fork",
        )
    _only_failure(info.value, 8)


# ── things that do not pickle ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("fn", "name"),
    [
        (tasks.raise_lock_holding_error, "LockHoldingError"),
        (tasks.raise_two_arg_error, "TwoArgError"),
    ],
    ids=["holds-a-lock", "init-needs-two-args"],
)
def test_an_exception_that_does_not_pickle_arrives_as_serialization_error(
    pool: cleanbreak.Pool, fn: Callable[[Any], int], name: str
) -> None:
    exc = pool.submit(fn, None).exception(timeout=GUARD)
    assert isinstance(exc, cleanbreak.SerializationError)
    assert isinstance(exc, pickle.PicklingError)
    assert exc.part == "exception"
    assert name in str(exc)
    assert isinstance(exc.__cause__, cleanbreak.RemoteTraceback)
    assert fn.__name__ in str(exc.__cause__)
    _pool_still_works(pool)


def test_a_result_that_does_not_pickle_fails_that_task(pool: cleanbreak.Pool) -> None:
    exc = pool.submit(tasks.return_lock, None).exception(timeout=GUARD)
    assert isinstance(exc, cleanbreak.SerializationError)
    assert exc.part == "result"
    assert "result" in str(exc)
    _pool_still_works(pool)


def test_a_lambda_result_comes_back_by_value(pool: cleanbreak.Pool) -> None:
    # Plain pickle cannot send a lambda: the worker sends it by value (cloudpickle).
    returned = pool.submit(tasks.return_lambda, None).result(timeout=GUARD)
    assert returned() == 1


@pytest.mark.parametrize(
    "fn", [tasks.lock_on, tasks.unloadable_on], ids=["does-not-pickle", "does-not-unpickle"]
)
def test_a_bad_result_in_a_map_chunk_fails_only_that_item(
    fs_pool: cleanbreak.Pool, fn: Callable[[int, int], Any]
) -> None:
    # Pickling does not depend on the start method: one pool is enough. Item 2 of the chunk
    # returns something that will not cross; the items before and after it are fine.
    results = fs_pool.map(fn, range(6), itertools.repeat(2), chunksize=6, timeout=GUARD)
    assert [next(results) for _ in range(2)] == [0, 1]
    with pytest.raises(cleanbreak.SerializationError) as info:
        next(results)
    assert info.value.part == "result"
    _pool_still_works(fs_pool)
    with pytest.raises(cleanbreak.SerializationError) as info:
        cleanbreak.map(
            tasks.star, [(fn, (x, 2)) for x in range(6)], workers=1, chunksize=6, mp_context="fork"
        )
    _only_failure(info.value, 6)


def test_an_argument_that_does_not_pickle_fails_that_submit(pool: cleanbreak.Pool) -> None:
    with pytest.raises(cleanbreak.SerializationError) as info:
        pool.submit(tasks.identity, threading.Lock()).result(timeout=GUARD)
    assert info.value.part == "arguments"
    assert "arguments" in str(info.value)
    assert "lock" in str(info.value)
    _pool_still_works(pool)


@pytest.mark.parametrize(
    "bad", [threading.Lock(), tasks.Unloadable()], ids=["does-not-pickle", "does-not-unpickle"]
)
@pytest.mark.parametrize("chunksize", [1, 5])
def test_a_bad_argument_in_a_map_fails_only_that_item(
    fs_pool: cleanbreak.Pool, bad: object, chunksize: int
) -> None:
    items: list[object] = [0, 1, bad, 3, 4]
    results = fs_pool.map(tasks.identity, items, chunksize=chunksize, timeout=GUARD)
    assert [next(results) for _ in range(2)] == [0, 1]
    with pytest.raises(Exception) as info:
        next(results)
    if isinstance(bad, tasks.Unloadable):
        # It pickled, but the worker could not rebuild it. Which error type says so is not
        # pinned down; it must not blame the result, though.
        assert getattr(info.value, "part", "arguments") == "arguments", repr(info.value)
    else:
        assert isinstance(info.value, cleanbreak.SerializationError), repr(info.value)
        assert info.value.part == "arguments"
    _pool_still_works(fs_pool)
    with pytest.raises(Exception) as info:
        cleanbreak.map(tasks.identity, items, workers=1, chunksize=chunksize, mp_context="fork")
    _only_failure(info.value, 5)


def test_a_function_that_does_not_pickle_fails_with_serialization_error(
    pool: cleanbreak.Pool,
) -> None:
    # A lambda goes by value; one that holds a lock cannot go at all.
    lock = threading.Lock()
    with pytest.raises(cleanbreak.SerializationError) as info:
        pool.submit(lambda: lock).result(timeout=GUARD)
    assert info.value.part == "function"
    assert "function" in str(info.value)
    assert "lock" in str(info.value)
    with pytest.raises(cleanbreak.SerializationError) as info:
        list(pool.map(lambda x: (x, lock), [1, 2], timeout=GUARD))
    assert info.value.part == "function"
    _pool_still_works(pool)
