"""Bad arguments fail at once, with a one-line message that names the parameter and what it
accepts, and without leaving a pool half started."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import cleanbreak
from tests import tasks


def _managers() -> int:
    return sum(t.name == "cleanbreak-manager" for t in threading.enumerate())


def _check_message(exc: BaseException, *words: str) -> None:
    message = str(exc)
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"workers": 0}, ValueError, ("workers", "at least 1", "0")),
        ({"workers": -2}, ValueError, ("workers", "at least 1", "-2")),
        ({"workers": "2"}, (TypeError, ValueError), ("workers", "'2'")),
        ({"workers": 2.0}, (TypeError, ValueError), ("workers", "2.0")),
        ({"workers": True}, (TypeError, ValueError), ("workers", "True")),
        ({"on_interrupt": "nope"}, ValueError, ("on_interrupt", "'nope'", "terminate", "drain")),
        ({"mp_context": "bogus"}, ValueError, ("mp_context", "'bogus'", "spawn", "forkserver")),
        ({"mp_context": 3}, TypeError, ("mp_context", "int")),
        ({"initializer": 5}, TypeError, ("initializer", "callable")),
        ({"task_timeout": 0}, ValueError, ("task_timeout", "above 0")),
        ({"task_timeout": "5"}, (TypeError, ValueError), ("task_timeout", "'5'")),
        ({"retries": -1}, ValueError, ("retries", "at least 0")),
        ({"retry_on": (5,)}, TypeError, ("retry_on", "exception classes")),
        ({"max_tasks_per_worker": 0}, ValueError, ("max_tasks_per_worker", "at least 1")),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_pool_rejects_bad_arguments(
    kwargs: dict[str, Any],
    error: type[Exception] | tuple[type[Exception], ...],
    words: tuple[str, ...],
) -> None:
    before = _managers()
    with pytest.raises(error) as info:
        cleanbreak.Pool(**kwargs)
    _check_message(info.value, *words)
    assert _managers() == before, "a rejected Pool() started a manager thread"


MapCall = Callable[[cleanbreak.Pool], Iterator[Any]]


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda p: p.map(tasks.square, [1], chunksize=0), ValueError, ("chunksize", "at least 1")),
        (lambda p: p.map(tasks.square, [1], chunksize=-3), ValueError, ("chunksize", "-3")),
        (lambda p: p.map(tasks.square, [1], buffersize=-1), ValueError, ("buffersize", "-1")),
        (lambda p: p.map(tasks.square, [1], buffersize=0), ValueError, ("buffersize", "0")),
        (lambda p: p.map(tasks.square, [1], timeout=-1), ValueError, ("timeout", "-1")),
        (
            lambda p: p.imap_unordered(tasks.square, [1], chunksize=0),
            ValueError,
            ("chunksize", "at least 1"),
        ),
        (
            lambda p: p.imap_unordered(tasks.square, [1], buffersize=-1),
            ValueError,
            ("buffersize", "-1"),
        ),
        (lambda p: p.map(tasks.square), TypeError, ("iterable",)),
        (lambda p: p.map(42, [1]), TypeError, ("callable", "42")),
    ],
    ids=[
        "map-chunksize-0",
        "map-chunksize-neg",
        "map-buffersize-neg",
        "map-buffersize-0",
        "map-timeout-neg",
        "imap-chunksize-0",
        "imap-buffersize-neg",
        "map-no-iterable",
        "map-not-callable",
    ],
)
def test_map_rejects_bad_arguments_at_call_time(
    fs_pool: cleanbreak.Pool,
    call: MapCall,
    error: type[Exception],
    words: tuple[str, ...],
) -> None:
    # Errors from a half-built iterator's __del__ are test_rejected_map_leaves_no_stray_error's
    # business; left alone they would surface in whichever test happens to run next.
    with tasks.unraisable_ignored():
        # Raised by the call itself, not by the first next(): like ProcessPoolExecutor.map.
        with pytest.raises(error) as info:
            call(fs_pool)
        _check_message(info.value, *words)
        del info
    # The pool is unharmed.
    assert fs_pool.submit(tasks.square, 3).result(timeout=tasks.GUARD) == 9


def test_module_map_rejects_bad_chunksize_and_cleans_up() -> None:
    before = _managers()
    with tasks.unraisable_ignored():  # see test_map_rejects_bad_arguments_at_call_time
        with pytest.raises(ValueError) as info:
            cleanbreak.map(tasks.square, [1, 2], workers=1, chunksize=0)
        _check_message(info.value, "chunksize")
        del info
    assert _managers() == before


def test_module_map_rejects_bad_workers() -> None:
    with pytest.raises(ValueError) as info:
        cleanbreak.map(tasks.square, [1, 2], workers=0)
    _check_message(info.value, "workers", "at least 1")


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.map(tasks.square, [1], chunksize=0),
        lambda p: p.imap_unordered(tasks.square, [1], buffersize=-1),
    ],
    ids=["map", "imap_unordered"],
)
def test_rejected_map_leaves_no_stray_error(fs_pool: cleanbreak.Pool, call: MapCall) -> None:
    """The ValueError is all the caller sees: nothing is printed later as "Exception ignored"
    when the half-built iterator is collected."""
    with tasks.unraisable_ignored() as stray:
        with pytest.raises(ValueError) as info:
            call(fs_pool)
        del info
    assert not stray, (
        f"{stray[0].exc_type.__name__}: {stray[0].exc_value} ignored in {stray[0].object!r}"
    )
