"""``Pool``, the executor the user holds: its API, its lifecycle, and what Ctrl-C does to it.

Lifecycle::

    open ──shutdown()──▶ closing ──all done──▶ finished
      │                                          ▲
      └──Ctrl-C / SIGTERM──▶ interrupted ────────┘  (drain: running tasks finish first)

An interrupted pool accepts nothing more. Whichever pool call the main thread is in when the
``Interrupted`` arrives (a ``map`` iterator, ``shutdown``, the ``with`` block's exit) waits until
every worker is gone, gathers the results that finished, and raises ``Interrupted`` with them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, PENDING, RUNNING
from multiprocessing.context import BaseContext
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar

from . import _signals
from ._errors import BrokenPool, Interrupted
from ._manager import DRAINING, KILLING, STOPPING, LocalBackend, default_context
from ._units import TaskOptions, Unit
from ._wire import CALL_KW, CALL_ONE, CALL_STAR

T = TypeVar("T")
P = ParamSpec("P")

OnInterrupt = Literal["terminate", "drain"]
_ESCALATION: dict[str, tuple[int, ...]] = {
    "terminate": (STOPPING, KILLING),
    "drain": (DRAINING, STOPPING, KILLING),
}


def default_workers() -> int:
    """The number of CPUs this process may use."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13
    if count is not None:
        n = count()
    elif hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS
        n = os.cpu_count()
    return n or 1


def _context(mp_context: BaseContext | str | None) -> BaseContext:
    if mp_context is None:
        return default_context()
    if isinstance(mp_context, str):
        methods = multiprocessing.get_all_start_methods()
        if mp_context not in methods:
            raise ValueError(
                f"mp_context={mp_context!r} is not a start method here: use one of "
                + ", ".join(repr(m) for m in methods)
            )
        return multiprocessing.get_context(mp_context)
    if isinstance(mp_context, BaseContext):
        return mp_context
    raise TypeError(
        "mp_context must be a start method name ('forkserver', 'spawn', 'fork') or a "
        f"multiprocessing context, not {type(mp_context).__name__}"
    )


def _positive(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1 (or None), got {value!r}")
    return value


class _Unset:
    """The default of ``Pool.options()`` arguments: keep the pool's value."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


class Pool(Executor):
    """A process pool that stops cleanly on Ctrl-C and keeps every finished result.

    A true ``concurrent.futures.Executor``: code written for ``ProcessPoolExecutor`` runs
    unchanged. ``workers`` defaults to the CPUs this process may use. ``on_interrupt`` is
    ``"terminate"`` (stop running tasks at once) or ``"drain"`` (let them finish; a second
    Ctrl-C stops them, a third kills them). ``mp_context`` picks the start method: a context,
    or ``"forkserver"`` (the default where available), ``"spawn"`` or ``"fork"``.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        on_interrupt: OnInterrupt = "terminate",
        mp_context: BaseContext | str | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        task_timeout: float | None = None,
        retries: int = 0,
        retry_on: Sequence[type[BaseException]] = (),
        max_tasks_per_worker: int | None = None,
    ) -> None:
        if os.name != "posix":  # pragma: no cover - exercised on Windows only
            raise NotImplementedError(
                f"cleanbreak needs a POSIX system (Linux or macOS), not {sys.platform}: it relies "
                "on process groups and POSIX signals"
            )
        n = _positive("workers", workers) or default_workers()
        if on_interrupt not in _ESCALATION:
            raise ValueError(f"on_interrupt must be 'terminate' or 'drain', got {on_interrupt!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r}")
        self._opts = TaskOptions.make(task_timeout, retries, retry_on)
        max_tasks = _positive("max_tasks_per_worker", max_tasks_per_worker)
        self._mode: OnInterrupt = on_interrupt
        self._lock = threading.Lock()
        self._closed = False
        self._signal: signal.Signals | None = None
        self._signals_seen = 0
        self._index = itertools.count()
        self._futures: weakref.WeakValueDictionary[int, Future[Any]] = weakref.WeakValueDictionary()
        self._runs: weakref.WeakSet[_MapRun[Any]] = weakref.WeakSet()
        self._backend = LocalBackend(
            n, _context(mp_context), initializer, tuple(initargs), max_tasks
        )
        _signals.attach(self)

    @property
    def workers(self) -> int:
        """How many worker processes the pool keeps."""
        return self._backend.size

    # ── Executor API ─────────────────────────────────────────────────────────────────────

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` and return a Future for its result."""
        return self._submit(self._opts, fn, args, kwargs)

    def _submit(self, opts: TaskOptions, fn: Callable[..., T], args: Any, kwargs: Any) -> Future[T]:
        with self._lock:
            self._check_open()
            fut: _TaskFuture[T] = _TaskFuture()
            index = next(self._index)
            self._futures[index] = fut
            unit = self._backend.new_unit(
                CALL_KW, fn, ((args, kwargs),), _FutureSink(fut), index, opts
            )
            fut.uid = unit.uid
            self._backend.put(unit)
        return fut

    def options(
        self,
        *,
        task_timeout: float | _Unset | None = _UNSET,
        retries: int | _Unset = _UNSET,
        retry_on: Sequence[type[BaseException]] | _Unset = _UNSET,
    ) -> TaskOptionsView:
        """The same pool, with other options for the tasks you submit or map through it::

            pool.options(task_timeout=5, retries=2).submit(fn, x)

        Options not given keep the pool's values.
        """
        base = self._opts
        opts = TaskOptions.make(
            base.task_timeout if isinstance(task_timeout, _Unset) else task_timeout,
            base.retries if isinstance(retries, _Unset) else retries,
            base.retry_on if isinstance(retry_on, _Unset) else retry_on,
        )
        return TaskOptionsView(self, opts)

    def cancel(self, future: Future[Any], *, timeout: float | None = 10.0) -> bool:
        """Cancel a task, running or not. Returns whether it ended up cancelled.

        A task that has not started is cancelled as ``Future.cancel()`` would. A running task is
        stopped: its worker and the processes it started are killed, a new worker replaces it,
        and the future reads as cancelled. False means the task had finished already. Waits up
        to ``timeout`` seconds for the worker to be gone.
        """
        if not isinstance(future, _TaskFuture) or future.uid < 0:
            raise ValueError("pool.cancel() takes a future returned by this pool's submit()")
        if future.cancel():
            return True
        if future.done():
            return future.cancelled()
        self._backend.stop_unit(future.uid)
        with contextlib.suppress(TimeoutError, CancelledError):
            future.exception(timeout)
        return future.cancelled()

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Like the built-in ``map``, run in the workers; results come in input order.

        Input is read lazily, at most ``buffersize`` items ahead of the results the caller has
        taken. Items travel in chunks of ``chunksize`` (chosen for you by default). A task's
        exception is raised when its turn comes; the iterator can be resumed past it and the
        other tasks are not stopped.
        """
        return self._map(self._opts, fn, iterables, timeout, chunksize, buffersize)

    def _map(
        self,
        opts: TaskOptions,
        fn: Callable[..., T],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int | None,
        buffersize: int | None,
    ) -> Iterator[T]:
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        return _MapRun(
            self,
            opts,
            fn,
            iterables,
            ordered=True,
            timeout=timeout,
            chunksize=chunksize,
            buffersize=buffersize,
        )

    def imap_unordered(
        self,
        fn: Callable[[Any], T],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Like ``map`` over one iterable, but results come as soon as each finishes."""
        return self._imap_unordered(self._opts, fn, iterable, chunksize, buffersize)

    def _imap_unordered(
        self,
        opts: TaskOptions,
        fn: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None,
        buffersize: int | None,
    ) -> Iterator[T]:
        return _MapRun(
            self,
            opts,
            fn,
            (iterable,),
            ordered=False,
            timeout=None,
            chunksize=chunksize,
            buffersize=buffersize,
        )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more tasks, and release the workers once the queued ones are done.

        With ``cancel_futures``, tasks that have not started are cancelled. With ``wait``, the
        call returns once every worker has exited; Ctrl-C meanwhile raises ``Interrupted``.
        """
        with self._lock:
            self._closed = True
        self._backend.close(cancel_pending=cancel_futures)
        if wait:
            try:
                self._backend.wait()
            except KeyboardInterrupt as exc:
                self._stop(exc)
                raise self._interrupted(exc, self._completed()) from None
        _signals.detach(self)

    def __enter__(self) -> Pool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if isinstance(exc, KeyboardInterrupt) or self._signal is not None:
            self._stop(exc)
            if isinstance(exc, Interrupted) and exc._filled:
                return None  # a pool call inside the block already gathered its results
            raise self._interrupted(exc, self._completed()) from None
        self.shutdown(wait=True)
        return None

    # ── interrupts ───────────────────────────────────────────────────────────────────────

    def on_signal(self, signum: signal.Signals) -> bool:
        """Called by the signal handler (main thread) or by a pool call that caught Ctrl-C."""
        if self._signal is None:
            self._signal = signum
        levels = _ESCALATION[self._mode]
        level = levels[min(self._signals_seen, len(levels) - 1)]
        self._signals_seen += 1
        raise_now = level >= STOPPING or not self._busy()
        self._backend.raise_level(level)
        return raise_now

    def is_live(self) -> bool:
        return not self._backend.finished.is_set()

    def _busy(self) -> bool:
        if any(not run.finished for run in list(self._runs)):
            return True
        return any(not f.done() for f in list(self._futures.values()))

    def _stop(self, exc: BaseException | None) -> None:
        """Make sure the pool is stopping, wait until every worker is gone, drop the handler."""
        seen = isinstance(exc, Interrupted) and (exc._counted or exc._filled)
        if isinstance(exc, KeyboardInterrupt) and not seen:
            # A KeyboardInterrupt our handler did not see: the user's own handler raised it,
            # or the pool lives outside the main thread. It counts as a Ctrl-C all the same.
            sig = exc.signal if isinstance(exc, Interrupted) else signal.SIGINT
            self.on_signal(sig)
        while True:
            try:
                self._backend.wait()
                break
            except KeyboardInterrupt as again:
                if not (isinstance(again, Interrupted) and again._counted):
                    self.on_signal(signal.SIGINT)
        _signals.detach(self)

    def _interrupted(
        self, exc: BaseException | None, completed: dict[int, Any], total: int | None = None
    ) -> Interrupted:
        """The Interrupted to raise once the pool has stopped (see ``_stop``)."""
        if isinstance(exc, Interrupted) and exc._filled:
            return exc
        result = Interrupted(self._signal or signal.SIGINT, completed, total=total)
        result._filled = True
        return result

    def _completed(self) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for index, fut in list(self._futures.items()):
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                out[index] = fut.result()
        return out

    def _check_open(self) -> None:
        if self._signal is not None:
            raise RuntimeError(
                f"cannot schedule new tasks: the pool was interrupted by {self._signal.name}"
            )
        broken = self._backend.broken
        if broken is not None:
            raise BrokenPool(str(broken)) from broken
        if self._closed:
            raise RuntimeError("cannot schedule new tasks after shutdown")


class TaskOptionsView:
    """A pool seen through other task options; made by ``Pool.options()``.

    ``submit``, ``map`` and ``imap_unordered`` behave as the pool's own, with these options.
    """

    def __init__(self, pool: Pool, opts: TaskOptions) -> None:
        self.pool = pool
        self.opts = opts

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.opts}>"

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return self.pool._submit(self.opts, fn, args, kwargs)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        return self.pool._map(self.opts, fn, iterables, timeout, chunksize, buffersize)

    def imap_unordered(
        self,
        fn: Callable[[Any], T],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        return self.pool._imap_unordered(self.opts, fn, iterable, chunksize, buffersize)


def _settle(fut: Future[Any], value: Any, exc: BaseException | None) -> None:
    try:
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)
    except InvalidStateError:  # pragma: no cover - settled twice: keep the first outcome
        pass


class _TaskFuture(Future[T]):
    """A ``concurrent.futures.Future`` that a running task's stop can cancel.

    ``Future.cancel()`` refuses once a task runs, because the standard library cannot stop it.
    cleanbreak can (it kills the worker), and the future should then read as cancelled, so this
    does what ``cancel()`` does, for the RUNNING state too. It relies on Future's private
    ``_condition``, ``_state`` and ``_invoke_callbacks``, unchanged since Python 3.2.
    """

    uid = -1

    def _cancel_running(self) -> None:
        with self._condition:
            if self._state not in (PENDING, RUNNING):
                return
            self._state = CANCELLED
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        self.set_running_or_notify_cancel()  # tells wait() and as_completed()


class _FutureSink:
    """Outcomes of one ``submit``: onto its Future."""

    __slots__ = ("fut",)

    def __init__(self, fut: _TaskFuture[Any]) -> None:
        self.fut = fut

    def start(self, unit: Unit) -> bool:
        if self.fut.running():  # sent again, after its worker died or to retry it
            return True
        return self.fut.set_running_or_notify_cancel()

    def deliver(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        _settle(self.fut, values[0], errors.get(0))

    def fail(self, start: int, count: int, exc: BaseException) -> None:
        _settle(self.fut, None, exc)

    def cancel(self, start: int, count: int) -> None:
        self.fut._cancel_running()


_OK, _FAIL, _CANCEL = 0, 1, 2


class _MapSink:
    """Outcomes of one ``map`` call: onto a queue its iterator reads.

    Kept apart from the iterator so that queued units do not keep the iterator alive: when the
    caller drops it (a ``break`` out of the loop), ``finished`` is set and the units that have
    not left the parent are dropped.
    """

    __slots__ = ("events", "finished")

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.finished = False

    def start(self, unit: Unit) -> bool:
        return not self.finished

    def deliver(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        self.events.put((_OK, start, values, errors))

    def fail(self, start: int, count: int, exc: BaseException) -> None:
        self.events.put((_FAIL, start, count, exc))

    def cancel(self, start: int, count: int) -> None:
        self.events.put((_CANCEL, start, count, None))


class _MapRun(Iterator[T]):
    """One ``map`` or ``imap_unordered`` call: feeds input lazily, yields results.

    The caller's thread reads the input, a chunk at a time, while fewer than ``window`` items
    are out (read but not yet yielded). The manager thread reports outcomes through the sink's
    queue. A task's exception is raised in its turn and the iterator stays usable after it.
    """

    def __init__(
        self,
        pool: Pool,
        opts: TaskOptions,
        fn: Callable[..., T],
        iterables: tuple[Iterable[Any], ...],
        *,
        ordered: bool,
        timeout: float | None,
        chunksize: int | None,
        buffersize: int | None,
        keep_all: bool | None = None,
    ) -> None:
        chunk = _positive("chunksize", chunksize)
        window = _positive("buffersize", buffersize)
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        if not callable(fn):
            raise TypeError(f"the function to map must be callable, got {fn!r}")
        pool._check_open()
        sizes = [len(it) for it in iterables if hasattr(it, "__len__")]  # type: ignore[arg-type]
        self.total = min(sizes) if len(sizes) == len(iterables) else None
        workers = pool.workers
        if chunk is None:
            if self.total is not None:
                chunk = max(1, min(math.ceil(self.total / (workers * 8)), 1024))
            else:
                chunk = max(1, 64 // (workers * 4))
        if window is None:
            window = max(chunk * workers * 4, workers * 32)
        self._pool = pool
        self._backend = pool._backend
        self._sink = _MapSink()
        self._opts = opts
        self._fn = fn
        self._kind = CALL_ONE if len(iterables) == 1 else CALL_STAR
        self._it: Iterator[Any] = (
            iter(iterables[0]) if len(iterables) == 1 else zip(*iterables, strict=False)
        )
        self._chunk = chunk
        self._window = window
        self._ordered = ordered
        self._deadline = None if timeout is None else time.monotonic() + timeout
        # Sized input is in memory already, so results that were yielded are kept too, for
        # Interrupted.completed. For lazy input only results not yet yielded are: keeping the
        # others would make memory grow without bound on an endless generator.
        keep = self.total is not None if keep_all is None else keep_all
        self._kept: dict[int, Any] | None = {} if keep else None
        self._done: dict[int, Any] = {}  # ordered: finished, not yet yielded
        self._errors: dict[int, BaseException] = {}
        self._ready: deque[tuple[int, Any, BaseException | None]] = deque()  # unordered
        self._pulled = 0
        self._yielded = 0
        self._next = 0
        self._cancelled = False
        self._exhausted = False
        pool._runs.add(self)
        self._guarded(self._top_up)

    @property
    def finished(self) -> bool:
        return self._sink.finished

    def __iter__(self) -> _MapRun[T]:
        return self

    def __next__(self) -> T:
        if self._sink.finished:
            raise StopIteration
        return self._guarded(self._next_ordered if self._ordered else self._next_unordered)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop reading input; tasks that have not left the parent are dropped."""
        self._sink.finished = True

    def __del__(self) -> None:
        self._sink.finished = True

    def _guarded(self, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except KeyboardInterrupt as exc:
            self._sink.finished = True
            self._pool._stop(exc)
            raise self._pool._interrupted(exc, self._gather(), self.total) from None
        except StopIteration:
            self._sink.finished = True
            raise

    def _gather(self) -> dict[int, Any]:
        """Every result that finished. Called once the pool has stopped and sent everything."""
        while True:
            try:
                event = self._sink.events.get_nowait()
            except queue.Empty:
                break
            self._apply(event)
        out = dict(self._kept) if self._kept is not None else {}
        out.update(self._done)
        out.update((i, v) for i, v, err in self._ready if err is None)
        return dict(sorted(out.items()))

    def _top_up(self) -> None:
        while not self._exhausted and self._pulled - self._yielded < self._window:
            try:
                items = list(itertools.islice(self._it, self._chunk))
            except Exception:
                self._sink.finished = True
                raise
            if len(items) < self._chunk:
                self._exhausted = True
            if not items:
                break
            unit = self._backend.new_unit(
                self._kind, self._fn, items, self._sink, self._pulled, self._opts
            )
            self._pulled += len(items)
            self._backend.put(unit)

    def _next_ordered(self) -> T:
        while True:
            i = self._next
            if i in self._done:
                value = self._done.pop(i)
                self._taken(i, value)
                return value  # type: ignore[no-any-return]
            if i in self._errors:
                exc = self._errors.pop(i)
                self._taken(i, None, kept=False)
                raise exc
            if self._exhausted and i >= self._pulled:
                raise StopIteration
            self._wait_event()

    def _next_unordered(self) -> T:
        while True:
            if self._ready:
                i, value, exc = self._ready.popleft()
                self._taken(i, value, kept=exc is None)
                if exc is not None:
                    raise exc
                return value  # type: ignore[no-any-return]
            if self._exhausted and self._yielded >= self._pulled:
                raise StopIteration
            self._wait_event()

    def _taken(self, i: int, value: Any, kept: bool = True) -> None:
        self._next = i + 1
        self._yielded += 1
        if self._kept is not None and kept:
            self._kept[i] = value
        self._top_up()

    def _wait_event(self) -> None:
        timeout = None
        if self._deadline is not None:
            timeout = self._deadline - time.monotonic()
        try:
            if timeout is not None and timeout <= 0:
                raise queue.Empty
            event = self._sink.events.get(timeout=timeout)
        except queue.Empty:
            self._sink.finished = True
            raise TimeoutError("map() timed out before the next result was ready") from None
        self._apply(event)
        if self._cancelled:
            if self._pool._signal is not None:
                # The pool was interrupted: go and gather what finished. The signal was
                # counted already, so mark it as such.
                stop = Interrupted(self._pool._signal)
                stop._counted = True
                raise stop
            self._sink.finished = True
            raise CancelledError("map() was cancelled: the pool was shut down")

    def _apply(self, event: tuple[Any, ...]) -> None:
        kind, start = event[0], event[1]
        if kind == _OK:
            values, errors = event[2], event[3]
            for k, value in enumerate(values):
                self._store(start + k, value, errors.get(k) if errors else None)
        elif kind == _FAIL:
            for i in range(start, start + event[2]):
                self._store(i, None, event[3])
        else:
            self._cancelled = True

    def _store(self, i: int, value: Any, exc: BaseException | None) -> None:
        if self._ordered:
            if exc is None:
                self._done[i] = value
            else:
                self._errors[i] = exc
        else:
            self._ready.append((i, value, exc))


def map(
    fn: Callable[[Any], T],
    iterable: Iterable[Any],
    *,
    workers: int | None = None,
    on_interrupt: OnInterrupt = "terminate",
    chunksize: int | None = None,
    mp_context: BaseContext | str | None = None,
    initializer: Callable[..., object] | None = None,
    initargs: Iterable[Any] = (),
    task_timeout: float | None = None,
    retries: int = 0,
    retry_on: Sequence[type[BaseException]] = (),
    max_tasks_per_worker: int | None = None,
) -> list[T]:
    """Run ``fn`` over ``iterable`` in a fresh pool and return the results in input order.

    Every task runs even if some fail; the first failure (in input order) is then raised, with
    a note saying how many failed. On Ctrl-C, ``Interrupted.completed`` holds every result that
    had finished.
    """
    with Pool(
        workers,
        on_interrupt=on_interrupt,
        mp_context=mp_context,
        initializer=initializer,
        initargs=initargs,
        task_timeout=task_timeout,
        retries=retries,
        retry_on=retry_on,
        max_tasks_per_worker=max_tasks_per_worker,
    ) as pool:
        run: _MapRun[T] = _MapRun(
            pool,
            pool._opts,
            fn,
            (iterable,),
            ordered=True,
            timeout=None,
            chunksize=chunksize,
            buffersize=None,
            keep_all=True,
        )
        results: list[T] = []
        failures: list[BaseException] = []
        while True:
            try:
                results.append(next(run))
            except StopIteration:
                break
            except Exception as exc:
                failures.append(exc)
        if failures:
            first = failures[0]
            first.add_note(
                f"{len(failures)} of {len(results) + len(failures)} tasks failed; this is the "
                "first in input order"
            )
            raise first
        return results
