"""``multiprocessing.Pool``, on cleanbreak's pool: change the import and nothing else.

    from cleanbreak.multiprocessing import Pool

    with Pool(4) as pool:
        print(pool.map(work, range(100)))

The whole documented API of ``multiprocessing.pool.Pool`` is here, with its semantics, run by a
``cleanbreak.Pool`` (this is a face, not a second pool). So it keeps cleanbreak's promise: on
Ctrl-C or SIGTERM no task starts, the running ones stop (or finish, with
``on_interrupt="drain"``), and the call that waits (``get()``, ``map``, the ``imap`` loop)
raises ``cleanbreak.Interrupted`` at once, with no worker traceback. An ``AsyncResult`` that
had finished still gives its value, and ``Interrupted.completed`` holds what a ``map``,
``starmap``, ``map_async`` or ``imap`` had finished (``{index: result}``). A killed worker fails
its own task with ``cleanbreak.WorkerDied``; nothing hangs.

``from cleanbreak import multiprocessing as mp`` stands for ``import multiprocessing as mp``:
``mp.Pool`` and ``mp.get_context(method).Pool`` are this pool, the other names the stock ones.

The start method is the stock pool's (``set_start_method()``'s choice, or the platform's
default), unless ``context=`` names another. Where it differs from the stock pool (see the
README's list): ``imap``'s ``chunksize=1`` lets cleanbreak size the chunks; ``terminate()``
fails the tasks
it stops (their ``get()`` raises ``concurrent.futures.CancelledError``) instead of leaving
them to wait for ever; a task's exception keeps cleanbreak's remote traceback as its
``__cause__``.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import queue
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError, Future
from multiprocessing import TimeoutError
from multiprocessing.context import BaseContext

from . import _signals
from ._errors import Interrupted

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any

    Callback = Callable[[Any], object] | None

__all__ = [
    "ApplyResult",
    "AsyncResult",
    "IMapIterator",
    "MapResult",
    "Pool",
    "TimeoutError",
    "get_context",
]

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"
_STOPPING = 2  # the backends' stop level that terminates the running tasks (see _manager)
_DEFAULT = object()  # imap's chunksize left to cleanbreak (the stock default is 1)
_FEEDER_GUARD = 10.0  # seconds: imap's thread ends once the stopped pool has ended its run


def _stock(exc: BaseException) -> BaseException:
    """A task's exception as the stock pool raises it: its worker's traceback as the cause, a
    ``multiprocessing.pool.RemoteTraceback`` (cleanbreak's own is the same text)."""
    import multiprocessing.pool as stock  # (its stubs lack the two classes used here)

    from ._errors import RemoteTraceback, SerializationError

    if isinstance(exc, SerializationError) and exc.part == "result":
        # What the stock pool raises for a result that does not pickle (it names the
        # result's repr, which only the worker had: here, what pickling it raised).
        wrapped: BaseException = stock.MaybeEncodingError(  # type: ignore[attr-defined]
            exc.reason, "the task's result"
        )
        wrapped.__cause__ = exc
        return wrapped
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        exc.__cause__ = stock.RemoteTraceback(cause.tb)  # type: ignore[attr-defined]
    return exc


def _terminated() -> CancelledError:
    return CancelledError(
        "the task was stopped before it finished (Ctrl-C, SIGTERM, or the pool's terminate())"
    )


def _outcome(fut: Future[Any]) -> tuple[Any, BaseException | None]:
    """A done future's value or exception, read in its done-callback (the manager thread):
    a future the pool's stop cancelled is never asked for its result, which would be a
    pool call waiting for that stop."""
    if fut.cancelled():
        return None, _terminated()
    # Done: the base class's reads, without the pool future's waits in slices.
    error = Future.exception(fut, 0)
    return (None, error) if error is not None else (Future.result(fut, 0), None)


class ApplyResult:
    """What ``apply_async`` returns; ``AsyncResult`` is the same class."""

    def __init__(self, pool: Pool, callback: Callback, error_callback: Callback) -> None:
        self._pool = pool
        # Set once the outcome is. Its Event ("_event", in __dict__) is made only for a get()
        # or wait() that comes first: an Event's Condition cost more than the rest of an
        # apply_async together.
        self._ready = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callback = callback
        self._error_callback = error_callback
        self._settled = False
        self._settle_lock = threading.Lock()

    def ready(self) -> bool:
        return self._ready

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        self._wait(timeout)

    def _wait(self, timeout: float | None) -> bool:
        """Whether the outcome is set, within ``timeout`` seconds."""
        if self._ready:
            return True
        # One Event for every waiter (setdefault is atomic). _set makes _ready true, then
        # looks for it; this puts it there, then looks at _ready: one of the two sees the
        # other's. No lock is taken here that a Ctrl-C could leave held.
        event: threading.Event | None = vars(self).get("_event")
        if event is None:  # (made here only by the first waiter)
            event = vars(self).setdefault("_event", threading.Event())
        if self._ready:
            return True
        return event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        try:
            if not self._wait(timeout):
                raise TimeoutError
        except Interrupted as exc:
            self._on_interrupt(exc)
            raise
        error = self._error
        if error is not None:
            if isinstance(error, (CancelledError, Interrupted)) and _signals.in_main_thread():
                # The stop's outcome, where the handler may have put the signal's Interrupted
                # off (the main thread was sending a task itself: see _manager). A cancelled
                # task raises that Interrupted, not CancelledError; an Interrupted from the
                # map's thread is raised in its place (it is not raised twice).
                put_off = _signals.take_put_off()
                if put_off is not None and not isinstance(error, Interrupted):
                    self._on_interrupt(put_off)
                    raise put_off.with_traceback(None)
            raise _stock(error)
        return self._value

    def _on_interrupt(self, exc: Interrupted) -> None:
        """An Interrupted raised while this waited: what it holds is this call's results."""

    def _set(self, value: Any, error: BaseException | None) -> None:
        with self._settle_lock:  # once: terminate() and the map's own end may both come
            if self._settled:
                return
            self._settled = True
        if error is not None:
            error = _stock(error)
        self._value, self._error = value, error
        try:
            if error is None and self._callback is not None:
                self._callback(value)
            elif (
                error is not None
                and self._error_callback is not None
                and not isinstance(error, Interrupted)  # not a task's failure
            ):
                self._error_callback(error)
        finally:
            self._ready = True
            event = vars(self).get("_event")
            if event is not None:
                event.set()
            self._pool._forget(self)

    def _from_future(self, fut: Future[Any]) -> None:
        self._set(*_outcome(fut))


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """What ``map_async`` and ``starmap_async`` return: ready when every item is done, or at
    the first failure (as the stock pool). A cleanbreak map run underneath, item by item,
    taken by a thread of its own: at a Ctrl-C, every item that had finished is in
    ``Interrupted.completed``, those of a chunk that was still running included."""

    def __init__(self, pool: Pool, run: Any, callback: Callback, error_callback: Callback) -> None:
        super().__init__(pool, callback, error_callback)
        self._run = run
        self._total: int | None = run.total
        self._got: list[Any] = []  # the values taken so far, in input order
        # A Ctrl-C may come before the caller is in get() (still in map_async, or in its own
        # code): the pool's Interrupted then gathers from the run, which must know these.
        run.taken_by_thread = self._got
        self._stopped: Interrupted | None = None  # how the run ended, if by a signal
        self._feeder = threading.Thread(target=self._feed, name="cleanbreak-map-async", daemon=True)

    def _start(self) -> None:
        self._feeder.start()

    def _feed(self) -> None:
        parts = _values(self._run)
        stopped = False
        try:
            for part in parts:
                if isinstance(part, BaseException):  # the first failure fails the whole map
                    self._set(None, part)
                    return
                self._got += part
        except Interrupted as exc:  # it holds what the run had and this had not taken
            # The main thread may be waiting in get() with nothing to wake it (a drain: the
            # signal raised nothing there): it raises this, holding every finished item.
            stopped = True
            self._stopped = exc
            self._fill(exc)
            self._set(None, exc)
            return
        except BaseException as exc:  # terminate(), a broken pool
            self._set(None, exc)
            return
        finally:
            parts.close()
            if not stopped:  # the caller has them, or an error instead, from get()
                self._run.taken_by_thread = None
        self._set(self._got, None)

    def _on_interrupt(self, exc: Interrupted) -> None:
        exc.completed  # noqa: B018 - gathers the pool's futures first (waits for its stop)
        self._feeder.join(_FEEDER_GUARD)  # the stopped run ends the thread
        self._fill(exc)

    def _fill(self, exc: Interrupted) -> None:
        """Make ``exc.completed`` every item this map finished: those the thread took, and
        those the run had that it had not."""
        completed = dict(self._stopped.completed) if self._stopped is not None else {}
        completed.update(enumerate(self._got))
        _replace_completed(exc, completed, self._total)


def _replace_completed(exc: Interrupted, completed: dict[int, Any], total: int | None) -> None:
    exc._pending = None
    exc.completed = completed
    exc.total = total
    exc._filled = True
    exc.args = (str(exc),)


class IMapIterator:
    """What ``imap`` and ``imap_unordered`` return: an iterator, whose ``next(timeout)`` raises
    ``multiprocessing.TimeoutError`` when no result came in time. A task's exception is raised
    in its turn, and the iteration goes on after it, as in the stock pool.

    With a timeout, a thread takes the results from the run into ``_items`` and drops a token
    in ``_wake`` for each; ``next`` waits on a token (``SimpleQueue.get``: a Ctrl-C there
    leaves the queue as it was), then takes the item from ``_items``, naming it in
    ``_returning`` before it removes it: a Ctrl-C at any moment finds every result this has
    not returned in one of the two (see ``_on_interrupt``)."""

    def __init__(self, pieces: Iterator[tuple[int, Any, bool]], total: int | None) -> None:
        self._pieces = pieces
        self._total = total
        self._items: collections.deque[tuple[int, Any, bool] | BaseException | None] | None
        self._items = None
        self._wake: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._returning: tuple[int, Any, bool] | None = None
        self._feeder: threading.Thread | None = None

    def __iter__(self) -> IMapIterator:
        return self

    def next(self, timeout: float | None = None) -> Any:
        if timeout is None and self._items is None:
            _index, value, failed = next(self._pieces)
        else:
            self._returning = None  # the caller has the one before: it called again
            try:
                _index, value, failed = self._next_in_time(timeout)
            except Interrupted as exc:
                self._on_interrupt(exc)
                raise
        if failed:
            raise _stock(value)
        return value

    __next__ = next

    def _next_in_time(self, timeout: float | None) -> tuple[int, Any, bool]:
        if self._items is None:
            self._items = collections.deque()
            self._feeder = threading.Thread(target=self._feed, name="cleanbreak-imap", daemon=True)
            self._feeder.start()
        items = self._items
        deadline = None if timeout is None else time.monotonic() + timeout
        while not items:  # (a token may be left over from an item taken already: look again)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                self._wake.get(timeout=left)
            except queue.Empty:
                raise TimeoutError from None
        got = items[0]
        if got is None:
            raise StopIteration  # the end, left in place for every later call
        if isinstance(got, BaseException):
            items[0] = None
            raise got
        self._returning = got
        items.popleft()
        return got

    def _feed(self) -> None:
        assert self._items is not None
        items = self._items
        try:
            for got in self._pieces:
                items.append(got)
                self._wake.put(True)
        except BaseException as exc:
            items.append(exc)
        else:
            items.append(None)
        self._wake.put(True)

    def _on_interrupt(self, exc: Interrupted) -> None:
        """Results the thread took but this did not return belong in ``completed``: once the
        pool has stopped (reading ``completed`` waits for that), the thread ends, having
        queued all it took."""
        completed = dict(exc.completed)
        assert self._items is not None and self._feeder is not None
        self._feeder.join(_FEEDER_GUARD)
        taken = [self._returning] if self._returning is not None else []
        for got in [*taken, *self._items]:
            if isinstance(got, tuple) and not got[2]:
                completed[got[0]] = got[1]
            elif isinstance(got, Interrupted):
                completed.update(got.completed)
        self._returning = None
        _replace_completed(exc, completed, self._total)


IMapUnorderedIterator = IMapIterator


def _each_piece(run: Any) -> Iterator[tuple[int, int, dict[int, BaseException], Any]]:
    """A map run's pieces as ``(start, count, errors, current)``, where ``current`` hands the
    values out; the run is closed at the end, saying how it ended."""
    how = "stopped"
    try:
        while (piece := run.next_piece()) is not None:
            start, values, errors = piece
            count = len(values)
            del piece, values
            yield start, count, errors, run.current
        how = "done"
    except KeyboardInterrupt:
        how = "interrupted"
        raise
    finally:
        run.close(how)


def _pieces(run: Any) -> Iterator[tuple[int, Any, bool]]:
    """A map run's outcomes, one by one, with their input index: ``(index, value, False)``,
    or ``(index, exception, True)`` for a task that failed. (A piece without failures is
    handed through C-level iterators: no bytecode here per item.)"""
    for start, count, errors, current in _each_piece(run):
        if not errors:
            yield from zip(
                range(start, start + count), current.take(count), itertools.repeat(False)
            )
            continue
        for k in range(count):
            value = current.rest.pop()
            if k in errors:
                yield start + k, errors[k], True
            else:
                yield start + k, value, False


def _values(run: Any) -> Generator[list[Any] | BaseException]:
    """A map run's outcomes a piece at a time, for ``map``: the values of a piece without
    failures as one list, or, in a piece with failures, each value or failure alone."""
    for _start, count, errors, current in _each_piece(run):
        if not errors:
            # Left in ``current`` until the caller has them: a Ctrl-C meanwhile finds them
            # there (or in both places: the same values, by index).
            yield current.rest[::-1]
            current.rest.clear()
            continue
        for k in range(count):
            value = current.rest.pop()
            yield errors.get(k, [value])


class Pool:
    """A drop-in for ``multiprocessing.Pool`` (see the module's docstring).

    Beyond the stock arguments: ``on_interrupt`` ("terminate" or "drain"), ``task_timeout``,
    ``retries``, ``retry_on`` and ``journal``, as for ``cleanbreak.Pool``.
    """

    @_signals.making_a_pool
    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: BaseContext | _Context | None = None,
        *,
        on_interrupt: str = "terminate",
        task_timeout: float | None = None,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (),
        journal: Any = None,
    ) -> None:
        import cleanbreak

        if processes is not None and (
            isinstance(processes, bool) or not isinstance(processes, int) or processes < 1
        ):
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (
            isinstance(maxtasksperchild, bool)
            or not isinstance(maxtasksperchild, int)
            or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if isinstance(context, _Context):
            context = context.stock
        self._lock = threading.Lock()
        self._pending: set[ApplyResult] = set()
        self._idle = threading.Condition(self._lock)
        self._pool = cleanbreak.Pool(
            processes,
            on_interrupt=on_interrupt,  # type: ignore[arg-type]
            # The start method the stock pool would use: the one set_start_method() chose,
            # or the platform's default (fork on Linux up to Python 3.13), so that code that
            # relies on it runs unchanged. context= names another, as in the stock pool.
            mp_context=context if context is not None else multiprocessing.get_context(),
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_worker=maxtasksperchild,
            task_timeout=task_timeout,
            retries=retries,
            retry_on=retry_on,
            journal=journal,
        )
        self._processes = self._pool.workers
        # Last: a pool whose making was interrupted (Ctrl-C while cleanbreak's pool started)
        # is not one to warn about when it is collected.
        self._state = _RUN

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, "_state", None) == _RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    def __repr__(self) -> str:
        name = f"{type(self).__module__}.{type(self).__qualname__}"
        state = getattr(self, "_state", "unmade")
        return f"<{name} state={state} pool_size={getattr(self, '_processes', None)}>"

    # ── the stock API ─────────────────────────────────────────────────────────────────────

    def apply(
        self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: Mapping[str, Any] = {}
    ) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = {},
        callback: Callback = None,
        error_callback: Callback = None,
    ) -> ApplyResult:
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        self._remember(result)
        try:
            # Sent ahead to a busy worker as the stock pool queues it: an AsyncResult cannot
            # be cancelled, so nothing needs it kept here until a worker is free.
            fut = self._pool._submit(self._pool._opts, func, tuple(args), dict(kwds), ahead=True)
            fut.add_done_callback(result._from_future)
        except BaseException:
            self._forget(result)  # nothing may settle it: join() must not wait for it
            raise
        return result

    def map(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        return self._collect(self._run(func, (iterable,), chunksize, ordered=True, eager=True))

    def starmap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[Any]:
        return self._collect(
            self._run(func, (iterable,), chunksize, ordered=True, star=True, eager=True)
        )

    def map_async(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callback = None,
        error_callback: Callback = None,
    ) -> MapResult:
        return self._map_async(func, iterable, chunksize, callback, error_callback, star=False)

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callback = None,
        error_callback: Callback = None,
    ) -> MapResult:
        return self._map_async(func, iterable, chunksize, callback, error_callback, star=True)

    def imap(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: Any = _DEFAULT
    ) -> IMapIterator:
        run = self._run(func, (iterable,), _chosen(chunksize), ordered=True)
        return IMapIterator(_pieces(run), run.total)

    def imap_unordered(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: Any = _DEFAULT
    ) -> IMapIterator:
        run = self._run(func, (iterable,), _chosen(chunksize), ordered=False)
        return IMapIterator(_pieces(run), run.total)

    def close(self) -> None:
        """No more tasks; the workers exit once the queued ones are done (``join`` waits)."""
        with self._lock:
            if self._state == _RUN:
                self._state = _CLOSE

    def terminate(self) -> None:
        """Stop the workers now; the tasks not finished fail with ``CancelledError``."""
        with self._lock:
            self._state = _TERMINATE
        # The stop a signal makes, without the signal: no task starts, the running ones are
        # stopped (SIGTERM, then SIGKILL after a grace), and their futures read as cancelled.
        self._pool._backend.raise_level(_STOPPING)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for result in list(self._pending):
            if not result.ready():
                result._set(None, _terminated())

    def join(self) -> None:
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        with self._idle:
            while self._pending and self._state == _CLOSE:
                self._idle.wait(0.05)
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    # ── internals ─────────────────────────────────────────────────────────────────────────

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _remember(self, result: ApplyResult) -> None:
        with self._lock:
            self._pending.add(result)

    def _forget(self, result: ApplyResult) -> None:
        with self._idle:
            self._pending.discard(result)
            self._idle.notify_all()

    def _run(
        self,
        func: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        chunksize: int | None,
        *,
        ordered: bool,
        star: bool = False,
        eager: bool = False,
    ) -> Any:
        """A cleanbreak map run (item by item: a killed worker or a Ctrl-C costs only the
        items that had not finished)."""
        from ._map import MapRun

        self._check_running()
        if chunksize is not None and (
            isinstance(chunksize, bool) or not isinstance(chunksize, int)
        ):
            raise TypeError(f"chunksize must be an int, got {chunksize!r}")
        pool = self._pool
        pool._rearm()
        run = MapRun(
            pool,
            pool._opts,
            func,
            iterables,
            ordered=ordered,
            timeout=None,
            chunksize=max(chunksize, 1) if chunksize is not None else None,
            buffersize=None,
            eager=eager,
            journal=pool._journal,
            star=star,
        )
        return run

    def _collect(self, run: Any) -> list[Any]:
        """Every result in input order; the first failure (in input order) is raised, as the
        stock pool's map raises it, once the map has stopped."""
        values: list[Any] = []
        # Closed on the way out, not when the traceback that holds it goes: a failure ends
        # the run at once (its tasks not started are dropped).
        parts = _values(run)
        try:
            for part in parts:
                if isinstance(part, BaseException):
                    raise _stock(part)
                values += part
        except Interrupted as exc:
            completed = dict(exc.completed)
            completed.update(enumerate(values))
            _replace_completed(exc, completed, run.total)
            raise
        finally:
            parts.close()
        return values

    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        callback: Callback,
        error_callback: Callback,
        *,
        star: bool,
    ) -> MapResult:
        items = list(iterable)  # at once, as the stock pool does
        run = self._run(func, (items,), chunksize, ordered=True, star=star, eager=True)
        result = MapResult(self, run, callback, error_callback)
        self._remember(result)
        result._start()
        return result


def _chosen(chunksize: Any) -> int | None:
    """``imap``'s chunk size: 1 (the stock default, which stock code writes out for results
    one by one) lets cleanbreak size the chunks, which gives that (a worker sends what it has
    every 50 ms, and tasks of 50 ms or more go one to a chunk) without a round trip per tiny
    task; another size is kept."""
    return None if chunksize is _DEFAULT or chunksize == 1 else chunksize


class _Context:
    """A start method's context, as ``multiprocessing.get_context()`` gives it, whose ``Pool``
    is this module's: everything else is the stock context's own."""

    __slots__ = ("stock",)

    def __init__(self, stock: BaseContext) -> None:
        self.stock = stock

    def Pool(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        **cleanbreak_options: Any,
    ) -> Pool:
        return Pool(
            processes, initializer, initargs, maxtasksperchild, self.stock, **cleanbreak_options
        )

    def get_context(self, method: str | None = None) -> _Context:
        return _Context(self.stock.get_context(method))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stock, name)

    def __repr__(self) -> str:
        return f"<cleanbreak.multiprocessing context of {self.stock!r}>"


def get_context(method: str | None = None) -> _Context:
    """``multiprocessing.get_context(method)``, whose ``Pool`` is this module's: code that
    writes ``mp.get_context("spawn").Pool(4)`` moves over with ``import multiprocessing as
    mp`` changed to ``from cleanbreak import multiprocessing as mp``."""
    return _Context(multiprocessing.get_context(method))


def __getattr__(name: str) -> Any:
    """The rest of ``multiprocessing``'s own names (``cpu_count``, ``Queue``, ``Manager``,
    ``set_start_method``...) are the stock ones: ``from cleanbreak import multiprocessing as
    mp`` changes the pool and nothing else."""
    if name in multiprocessing.__all__:
        return getattr(multiprocessing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
