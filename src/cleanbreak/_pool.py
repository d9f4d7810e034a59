"""``Pool``, the executor the user holds: its API, its lifecycle, and what Ctrl-C does to it.

Lifecycle::

    open ──shutdown()──▶ closing ──all done──▶ finished
      │  ▲                                       ▲
      │  └─next submit/map (main thread)─┐       │
      └──Ctrl-C / SIGTERM──▶ interrupted ┴───────┘  (drain: running tasks finish first)

Whichever pool call the main thread is in when the ``Interrupted`` arrives (a ``map``
iterator, ``shutdown``, the ``with`` block's exit) waits until every worker is gone, gathers the
results that finished, and raises ``Interrupted`` with them. An interrupted pool that is used
again from the main thread starts new workers (``_rearm``): a pool held across notebook cells
lives on. A ``with`` block ends at the ``Interrupted``, so a script's pool is finished then.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, FINISHED, PENDING, RUNNING
from concurrent.futures._base import LOGGER as _LOGGER
from multiprocessing.context import BaseContext
from types import TracebackType

from . import _signals
from ._errors import BrokenPool, Interrupted
from ._manager import (
    DRAINING,
    KILLING,
    NO_MAIN_GUARD_EXIT,
    STOPPING,
    LocalBackend,
    default_context,
)
from ._map import ItemTimes, MapRun, collect, iterate, positive
from ._units import TaskOptions, Unit
from ._wire import CALL_KW

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any, Literal, ParamSpec, TypeVar

    from ._journal import Journal, Recorder
    from ._map import ProgressFactory
    from ._progress import Progress
    from ._units import Backend

    T = TypeVar("T")
    P = ParamSpec("P")
    OnInterrupt = Literal["terminate", "drain"]
else:
    from ._notyping import T

# The journal, the Dask backend and the progress display are imported when a pool uses them:
# ``import cleanbreak`` (which every worker does) stays as light as the pool alone.

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

    ``initializer(*initargs)`` runs in each worker as it starts; if it raises, the pool fails
    fast with ``BrokenPool``. ``task_timeout`` kills the worker of a task still running after
    that many seconds (``TaskTimeout``). ``retries`` retries a task after ``WorkerDied`` or
    ``TaskTimeout``, and after the exception classes in ``retry_on``. ``max_tasks_per_worker``
    replaces a worker after that many tasks. ``options()`` changes the task options for the
    tasks submitted through it.

    ``journal`` (a path, or a ``Journal`` for its options) records each task's outcome on
    disk: the same tasks run again with the same journal give the recorded results at once,
    without running, and only the rest run. A task is known by its function's qualified name
    and its arguments (``map``'s ``key=`` names it instead). See ``Journal``.

    ``dask`` (a scheduler address such as ``"tcp://host:8786"``, or a ``distributed.Client``)
    runs the tasks on a Dask cluster instead of local processes, with the same API and the
    same Ctrl-C semantics; it needs the ``dask`` extra. ``workers``, ``mp_context``,
    ``initializer`` and ``max_tasks_per_worker`` are for local pools only.

    A function or class that a worker cannot import (defined in a notebook cell, the REPL or
    ``python -c``, a lambda, a closure) goes by value (cloudpickle), once to each worker.

    After an ``Interrupted``, the pool's next ``submit`` or ``map`` from the main thread starts
    new workers, with the same options and journal: a pool held in a notebook's variable lives
    on from cell to cell.

    ``reuse_memory`` (Linux with glibc): a worker that has moved a payload of 32 MiB or more
    keeps the memory its tasks free (up to 128 MiB while idle), and the next task's large blocks
    reuse it instead of taking fresh pages from the kernel. ``False`` leaves the C allocator of
    the workers as it is.
    """

    @_signals.making_a_pool
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
        reuse_memory: bool = True,
        journal: Journal | str | os.PathLike[str] | None = None,
        dask: Any = None,
    ) -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # This process is a worker importing the main module (spawn, forkserver), or the
            # fork server preloading it (Python 3.13.8 and later), and the module starts a pool
            # at import time: it lacks the __main__ guard. Left to go on, it would start
            # workers of its own, or print multiprocessing's traceback. The pool that started
            # this process reports NO_MAIN_GUARD for this exit code instead.
            os._exit(NO_MAIN_GUARD_EXIT)
        if os.name != "posix":  # pragma: no cover - exercised on Windows only
            raise NotImplementedError(
                f"cleanbreak needs a POSIX system (Linux or macOS), not {sys.platform}: it relies "
                "on process groups and POSIX signals"
            )
        _refuse_at_exit()
        if dask is not None:
            local_only = {
                "workers": workers,
                "mp_context": mp_context,
                "initializer": initializer,
                "max_tasks_per_worker": max_tasks_per_worker,
            }
            for name, value in local_only.items():
                if value is not None:
                    raise ValueError(
                        f"{name}= is for a local pool; a Dask pool runs on the cluster's "
                        f"workers: drop {name}= (or dask=)"
                    )
        n = positive("workers", workers) or default_workers()
        if on_interrupt not in _ESCALATION:
            raise ValueError(f"on_interrupt must be 'terminate' or 'drain', got {on_interrupt!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r}")
        _flag("reuse_memory", reuse_memory)
        self._opts = TaskOptions.make(task_timeout, retries, retry_on)
        max_tasks = positive("max_tasks_per_worker", max_tasks_per_worker)
        self._mode: OnInterrupt = on_interrupt
        self._lock = threading.Lock()
        self._closed = False
        self._signal: signal.Signals | None = None
        self._signals_seen = 0
        self._reported = False  # an Interrupted was raised for this pool
        self._raised = False  # ... by the signal handler (perhaps in the caller's own code)
        # The one the handler raised for this pool, until its .completed is filled (raising).
        self._raised_exc: Interrupted | None = None
        self._index = itertools.count()
        self._first_index = 0  # the first submission since the pool last (re)started
        self._futures_ran = False  # some future had not finished when the signal came
        self._working = False  # ... or a map was open: the signal stopped work of this pool's
        self._futures: weakref.WeakValueDictionary[int, Future[Any]] = weakref.WeakValueDictionary()
        self._runs: weakref.WeakSet[MapRun[Any]] = weakref.WeakSet()
        self._last_run: MapRun[Any] | None = None
        self._item_times = ItemTimes()  # for the next map of a function (see _map.ItemTimes)
        self._ahead = _AheadSinks()  # the outcomes of the tasks that may be sent ahead
        ctx = _context(mp_context) if dask is None else None
        self._journal: Journal | None = None
        self._journal_open = False  # this pool opened it (and so closes it)
        self._gathering = False  # stopped, and gathering what finished for the Interrupted
        self._closing = False  # in shutdown(wait=True): the pool handles signals till it ends
        # The futures that were live when the first signal came, held until the Interrupted
        # has their results: the caller may drop a future at the signal (asyncio cancels the
        # future it wraps a pool's future in) before the result it waits for arrives.
        self._held: list[Future[Any]] = []
        self._make_backend: Callable[[], Backend]
        if ctx is None:

            def make_dask() -> Backend:
                from ._dask import DaskBackend

                return DaskBackend(dask)

            self._make_backend = make_dask
        else:
            local_args = (n, ctx, initializer, tuple(initargs), max_tasks, reuse_memory)
            self._make_backend = lambda: LocalBackend(*local_args)
        self._start(journal)

    def _start(self, journal: Journal | str | os.PathLike[str] | None) -> None:
        """Start the backend (the workers) and open the journal: in ``Pool()``, and again in
        the first call after an ``Interrupted`` (see ``_rearm``)."""
        # Our handler goes in first, so that a signal at any moment from here on is ours. Until
        # the backend is made, it only records the signal (see on_signal): raised in the middle
        # of LocalBackend(), an exception could leave a manager thread that nobody stops.
        self._starting = True
        self._pending_level = 0
        # Nor may another live pool's signal raise here (an idle one says "raise now"): the
        # handler puts that raise off while the main thread holds (see _signals.holding), and
        # this pool raises its own Interrupted for the signal once its backend is made.
        main, held = _signals.in_main_thread(), _signals.holding
        early: signal.Signals | None = None  # a signal recorded since Pool() began
        if main:
            _signals.holding = True
        try:
            _signals.attach(self)
            if main:
                early = _signals.end_collecting()
            if early is not None or (main and _signals.a_framework_took_a_ctrl_c()):
                # A signal came while Pool() checked its arguments (see making_a_pool); or a
                # Ctrl-C came as this started, and asyncio's or a notebook kernel's handler
                # took it: it only asked to cancel the coroutine, which ran on into Pool().
                # It is the pool's.
                raise KeyboardInterrupt
            self._backend: Backend = self._make_backend()
        except BaseException as exc:  # no pool, no handler
            _signals.detach(self)
            self._close_journal()
            if isinstance(exc, KeyboardInterrupt):  # a handler of the user's raised it before
                raise _signals.early_interrupt(early or signal.SIGINT) from None
            raise  # out of descriptors, memory, threads
        finally:
            self._starting = False
            if main:
                _signals.holding = held
        try:
            if self._pending_level:
                self._backend.raise_level(self._pending_level)
                stop = Interrupted(self._signal or signal.SIGINT)
                stop._counted = True
                raise stop
            if journal is not None:
                # Opened while the workers start (the backend's thread starts them), so a
                # journal costs the pool's start nothing; a Ctrl-C meanwhile is ours.
                from ._journal import Journal

                opened = Journal.of(journal)
                assert opened is not None
                self._journal = opened
                opened.open()
                self._journal_open = True
            _signals.wait_event(self._backend.started)
        except KeyboardInterrupt as exc:  # a signal while the pool starts
            self._stop(exc)
            raise self._interrupted(exc, {}) from None
        except BaseException:  # the journal cannot be used: stop the workers that started
            self._backend.close(cancel_pending=True)
            self._backend.wait()
            _signals.detach(self)
            raise
        error = self._backend.start_error
        if error is not None:
            self._backend.close(cancel_pending=True)
            self._backend.wait()
            if self._signal is not None:
                # A Ctrl-C to the process group also reaches a fork server that is still
                # starting, which dies of it: the start failed because of the signal, and
                # the signal is what to report. (Under asyncio our handler raises nothing,
                # so this is the first place that sees it.)
                raise self._interrupted(None, {}) from None
            _signals.detach(self)
            self._close_journal()
            raise error

    def raising(self, exc: Interrupted) -> None:
        """The handler is raising ``exc`` for this pool's signal, perhaps in the caller's own
        code (a loop body, a notebook cell's sleep), where no pool call will gather the
        results: it gets them when its ``.completed`` is first read, or when the pool is next
        used or shut down, once every worker is gone (``_gather_raised``). A pool call that
        catches it instead raises an ``Interrupted`` of its own, as before."""
        self._raised = True
        claimed = exc._pending
        # The first live pool gathers for it; but a pool that was working at the signal takes
        # it from one that was idle (a notebook's earlier pool, held, whose futures are all
        # done): what the caller was waiting for is this one's.
        if claimed is None or (self._working and not exc._gatherer_working):
            idle = getattr(claimed, "__self__", None)
            if isinstance(idle, Pool):
                idle._raised_exc = None  # it settles as a pool that raised nothing of its own
            self._raised_exc = exc
            exc._pending = self._gather_raised
            exc._gatherer_working = self._working

    def _gather_raised(self) -> tuple[dict[int, Any], int | None]:
        exc, self._raised_exc = self._raised_exc, None
        if exc is None or self._reported:
            return {}, None  # a pool call reported the stop since, with an Interrupted of its own
        self._stop(exc)
        # Raised outside this pool's calls: if it was idle at the signal, its futures were
        # all done and keep their results; under their numbering, in ``completed``, they would
        # mix with the indices of the map the caller may be about to run or merge.
        completed, total = self._gather(futures=self._working)
        self._reported = True
        self._close_journal(quick=True)
        self._held = []
        _signals.detach(self)
        self._gathering = False
        return completed, total

    def _gather(self, futures: bool = True) -> tuple[dict[int, Any], int | None]:
        """What an ``Interrupted`` raised outside a pool call keeps (every worker is gone): the
        results of the map the caller was iterating, or else (if ``futures``) those of the live
        futures."""
        run = self._last_run
        open_runs = [r for r in list(self._runs) if not r.finished]
        if run is None and len(open_runs) == 1:
            run = open_runs[0]  # its iterator is still referenced, so it was not closed
        if run is None and not open_runs:
            # A map whose results a thread of ours took for the caller, who has not had them
            # (the drop-in's map_async, stopped before the caller was in its get()).
            held = [r for r in list(self._runs) if r.taken_by_thread is not None]
            if len(held) == 1:
                run = held[0]
        if run is not None and not self._futures_ran:
            # Ctrl-C came while the loop body ran, outside the pool: the results of the map
            # it was iterating are the ones to keep (futures the caller still holds from
            # before, all done at the signal, keep their own).
            return run.gather(), run.total
        return (self._completed() if futures else {}), None

    def _owes_interrupt(self) -> signal.Signals | None:
        """The signal that stopped the pool, if no ``Interrupted`` for it has been raised yet
        (the first Ctrl-C of a drain raises none while tasks run): a map that ends then raises
        it, rather than end as if nothing had happened."""
        if self._reported or self._raised:
            return None
        return self._signal

    def settle(self, over: bool = False) -> None:
        """If an ``Interrupted`` was raised outside any pool call (in the caller's own code),
        no call waited for the stop: wait for it now (every worker gone), and commit the
        journal. Called before the pool is used again, and as a notebook cell ends.

        Only once the handler has raised it, or ``over`` (the cell has ended): a signal that
        raised nothing yet (under asyncio, whose main task is being cancelled; the first
        Ctrl-C of a drain) is still on its way to the caller, and a call made meanwhile must
        not restart the pool."""
        if self._raised_exc is not None and not (self._gathering or self._closing):
            self._raised_exc.completed  # noqa: B018 - reading it gathers them, and ends the stop
            return
        if (
            self._signal is None
            or self._reported
            or not (self._raised or over)
            or self._gathering
            or self._closing
        ):
            return
        self._stop(None)
        self._reported = True
        self._close_journal(quick=True)
        self._held = []
        _signals.detach(self)
        self._gathering = False

    def _rearm(self) -> None:
        """After an ``Interrupted``, the next ``submit`` or ``map`` starts the pool again:
        new workers, the same options, the same journal. A pool held in a notebook's variable
        lives on from cell to cell. (A script's ``with`` block ends at the ``Interrupted``
        anyway, unless the script catches it inside the block and goes on.)

        Only the main thread does this, once the stop is over: a call from another thread
        while the pool is stopped is refused, as before.
        """
        if (
            self._signal is None
            or self._closed
            or self._gathering
            or self._closing
            or not _signals.in_main_thread()
        ):
            return
        # Left to come back in a moment, it would be swallowed by settle()'s wait, and the
        # pool would start again.
        _signals.raise_put_off()
        seen = self._signals_seen
        self.settle()
        if not self._reported:
            return  # the Interrupted has not reached the caller yet: _check_open refuses
        if self._signals_seen != seen:
            # A Ctrl-C came while this call waited for the last stop to end, which took it in
            # its stride (see _stop): it is this call's, which starts nothing.
            raise _not_started(self._signal or signal.SIGINT)
        stopped = self._backend
        try:
            journal = self._journal
            if journal is not None:
                from ._journal import Journal

                # A new handle on the same file (its first one may have been fresh=True: what was
                # recorded since must stay).
                journal = Journal(journal.path, skip_failed=journal.skip_failed)
            self._signal = None
            self._signals_seen = 0
            self._reported = False
            self._raised = False
            self._raised_exc = None
            self._last_run = None
            self._runs = weakref.WeakSet()
            self._futures_ran = False
            self._working = False
            self._first_index = next(self._index)  # (that number is never given to a task)
            self._start(journal)
        except KeyboardInterrupt as exc:
            # A Ctrl-C between the last stop's end, which gave the signal handlers back, and
            # this start, which puts ours in place again (Python's own handler raised it, or
            # ours before the new workers existed): nothing started, and the pool stays
            # stopped, for the next call to start it.
            if self._backend is stopped:
                self._signal = exc.signal if isinstance(exc, Interrupted) else signal.SIGINT
                self._reported = True
            if isinstance(exc, Interrupted):
                raise
            raise _not_started(signal.SIGINT) from None

    @property
    def workers(self) -> int:
        """How many worker processes the pool keeps."""
        return self._backend.size

    @property
    def journal(self) -> Journal | None:
        """The pool's journal, if it has one."""
        return self._journal

    def _close_journal(self, quick: bool = False) -> None:
        """Commit what the journal has queued, and release it (every worker is gone). With
        ``quick`` (on Ctrl-C) the file is released by a thread, once all is committed."""
        if self._journal is not None and self._journal_open:
            # Open until the close has returned: a Ctrl-C that cuts a close short (a handler
            # of the user's, or ours when no pool is live) leaves it to the Interrupted's.
            self._journal.close(quick=quick)
            self._journal_open = False

    # ── Executor API ─────────────────────────────────────────────────────────────────────

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` and return a Future for its result."""
        return self._submit(self._opts, fn, args, kwargs)

    def _submit(
        self,
        opts: TaskOptions,
        fn: Callable[..., T],
        args: Any,
        kwargs: Any,
        ahead: bool = False,
    ) -> Future[T]:
        """``ahead``: the task may wait in a busy worker's queue (its future is then running
        once sent, and ``cancel()`` no longer stops it): for the ``multiprocessing.Pool``
        face, whose results cannot be cancelled, and whose stock pool queues every task."""
        self._rearm()
        journal = self._journal
        key = b""
        recorded: dict[bytes, tuple[Any, BaseException | None]] = {}
        if journal is not None:
            from ._journal import Keyer

            if not callable(fn):
                raise TypeError(f"submit() needs a callable, got {fn!r}")
            keyer = Keyer(fn, None, star=False)
            journal.bind(keyer.name)
            key = keyer.call(args, kwargs)
            recorded = journal.lookup([key])
        with self._lock:
            self._check_open()
            fut: _TaskFuture[T] = _TaskFuture()
            fut.owner = weakref.ref(self)
            index = next(self._index)
            self._futures[index] = fut
            if key in recorded:  # the journal has its outcome: it does not run again
                fut.uid = _RECORDED
                fut.set_running_or_notify_cancel()
                _settle(fut, *recorded[key])
                return fut
            sink: _FutureSink | _AheadSinks | Recorder
            if journal is not None:
                from ._journal import Recorder

                sink = Recorder(_AheadSink(fut) if ahead else _FutureSink(fut), journal)
                sink.keys[index] = key
            elif ahead:
                sink = self._ahead
                sink.futures[index] = fut
            else:
                sink = _FutureSink(fut)
            unit = self._backend.new_unit(CALL_KW, fn, ((args, kwargs),), sink, index, opts)
            fut.uid = unit.uid
            try:
                self._backend.put(unit)
            except BaseException as exc:
                del self._futures[index]
                self._ahead.futures.pop(index, None)
                if not isinstance(exc, KeyboardInterrupt):
                    # The backend stopped since the check above, for a signal whose handler
                    # put its Interrupted off (the main thread was where nothing may be
                    # raised): that is what the caller gets, not the backend's "shut down".
                    # (An Interrupted the handler raised in put itself goes as it is.)
                    self._check_open()
                raise
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
        if not isinstance(future, _TaskFuture) or future.uid == _FOREIGN:
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
        return_exceptions: bool = False,
        key: Callable[..., Any] | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        """Like the built-in ``map``, run in the workers; results come in input order.

        Input is read lazily, a bounded window ahead of the results the caller has taken
        (``buffersize`` items; by default a window sized from the measured task time, and for
        a lazy input at most 50 items per worker). Items travel in chunks of ``chunksize``, by
        default sized so that each chunk is about 50 ms of work. Once a result is handed to you,
        the pool keeps no reference to it.

        As in ``concurrent.futures``, a task's exception is raised in its turn and ends the
        iteration. It carries ``.completed``: the finished results you were not given, by
        index. The map's tasks that have not started are dropped; those running finish, and
        their results are discarded. With ``return_exceptions=True``, each failed task's
        exception is yielded in its place instead, and the run goes on.

        With the pool's journal, ``key(*args)`` names each task in it (by default its
        arguments do). ``progress=True`` shows a progress bar on stderr.
        """
        return self._map(
            self._opts,
            fn,
            iterables,
            timeout,
            chunksize,
            buffersize,
            return_exceptions,
            key,
            progress,
        )

    def _map(
        self,
        opts: TaskOptions,
        fn: Callable[..., T],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int | None,
        buffersize: int | None,
        return_exceptions: bool,
        key: Callable[..., Any] | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        _flag("return_exceptions", return_exceptions)
        self._rearm()
        run = MapRun(
            self,
            opts,
            fn,
            iterables,
            ordered=True,
            timeout=timeout,
            chunksize=chunksize,
            buffersize=buffersize,
            journal=self._journal,
            key=key,
            progress=_progress_for(progress, fn),
        )
        return iterate(run, return_exceptions)

    def imap_unordered(
        self,
        fn: Callable[[Any], T],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        buffersize: int | None = None,
        return_exceptions: bool = False,
        key: Callable[[Any], Any] | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        """Like ``map`` over one iterable, but results come as soon as each finishes."""
        return self._imap_unordered(
            self._opts, fn, iterable, chunksize, buffersize, return_exceptions, key, progress
        )

    def _imap_unordered(
        self,
        opts: TaskOptions,
        fn: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None,
        buffersize: int | None,
        return_exceptions: bool,
        key: Callable[[Any], Any] | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        _flag("return_exceptions", return_exceptions)
        self._rearm()
        run = MapRun(
            self,
            opts,
            fn,
            (iterable,),
            ordered=False,
            timeout=None,
            chunksize=chunksize,
            buffersize=buffersize,
            journal=self._journal,
            key=key,
            progress=_progress_for(progress, fn),
        )
        return iterate(run, return_exceptions)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more tasks, and release the workers once the queued ones are done.

        With ``cancel_futures``, tasks that have not started are cancelled. With ``wait``, the
        call returns once every worker has exited; Ctrl-C meanwhile raises ``Interrupted``.
        """
        try:
            with self._lock:
                self._closed = True
            self._backend.close(cancel_pending=cancel_futures)
            if wait:
                # Until our handler goes, a signal is the pool's to handle, not the default
                # action's: also once every worker is gone (the manager thread says so before
                # this thread wakes from its wait), and while the journal's last commit is made.
                self._closing = True
                self._backend.wait()
                if self._raised_exc is not None or self._raised:
                    # The caller has had its Interrupted (raised in its own code): it gets
                    # the results, and no second one comes from here (nor from a pool whose
                    # signal another pool's Interrupted reported: see raising).
                    self._closing = False
                    self.settle()
                    self._closing = True
                self._close_journal()
                if self._signal is not None and not self._reported:
                    # Ctrl-C in drain mode while we waited (the running tasks were let finish),
                    # or while the journal closed.
                    raise self._interrupted(None, self._completed())
            elif self._journal is not None and self._journal_open:
                finished = self._backend.finished

                def close_when_finished() -> None:
                    finished.wait()
                    self._close_journal()

                _signals.start_quiet_thread(close_when_finished, "cleanbreak-journal-close")
            _signals.detach(self)
        except KeyboardInterrupt as exc:  # at any moment in here, our handler's or not
            if isinstance(exc, Interrupted) and exc._filled:
                raise
            self._stop(exc)
            raise self._interrupted(exc, self._completed()) from None
        finally:
            self._closing = False

    def __enter__(self) -> Pool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if isinstance(exc, KeyboardInterrupt) or (self._signal is not None and not self._reported):
            self._stop(exc)
            if isinstance(exc, Interrupted) and exc._filled:
                # A pool call inside the block already gathered its results.
                self._interrupted(exc, {})
                return None
            completed, total = self._gather()
            raise self._interrupted(exc, completed, total) from None
        self.shutdown(wait=True)
        return None

    # ── interrupts ───────────────────────────────────────────────────────────────────────

    def on_signal(self, signum: signal.Signals) -> bool:
        """Called by the signal handler (main thread) or by a pool call that caught Ctrl-C."""
        if self._signal is None:
            self._signal = signum
            self._held = list(self._futures.values())
            self._futures_ran = any(not f.done() for f in self._held)
            self._working = self._futures_ran or any(not r.finished for r in list(self._runs))
        levels = _ESCALATION[self._mode]
        level = levels[min(self._signals_seen, len(levels) - 1)]
        self._signals_seen += 1
        if self._starting:  # Pool() applies it once the backend is made
            self._pending_level = max(self._pending_level, level)
            return False
        finished = self._backend.finished.is_set()
        # Once every worker is gone, the pool call that stopped it is gathering the results
        # for its Interrupted: a further signal must not cut that short.
        raise_now = not finished and (level >= STOPPING or not self._busy())
        self._backend.raise_level(level)
        return raise_now

    def is_live(self) -> bool:
        if self._starting or self._gathering or self._closing:
            return True
        return not self._backend.finished.is_set()

    def _busy(self) -> bool:
        if any(not run.finished for run in list(self._runs)):
            return True
        return any(not f.done() for f in list(self._futures.values()))

    def _stop(self, exc: BaseException | None) -> None:
        """Make sure the pool is stopping, and wait until every worker is gone. Our handler
        stays until ``_interrupted`` has the results (a Ctrl-C meanwhile changes nothing)."""
        self._gathering = True
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

    # ── what a map run needs (see _map.Host) ─────────────────────────────────────────────

    def _track(self, run: MapRun[Any]) -> None:
        self._runs.add(run)
        self._last_run = None  # a map the caller left before this one is not the one to keep

    def _abandoned(self, run: MapRun[Any]) -> None:
        # The caller left the map before its end: if that was the Interrupted going through
        # its loop, this map's results are the ones to keep (see _gather). Leaving it early
        # for any other reason (a break) says nothing of a later stop.
        if self._signal is not None:
            self._last_run = run

    def _stop_for(
        self, exc: KeyboardInterrupt, gather: Callable[[], dict[int, Any]], total: int | None
    ) -> Interrupted:
        self._stop(exc)
        return self._interrupted(exc, gather(), total)

    def _interrupted(
        self, exc: BaseException | None, completed: dict[int, Any], total: int | None = None
    ) -> Interrupted:
        """The Interrupted to raise once the pool has stopped (see ``_stop``), with the results
        that were gathered; our handler goes now."""
        if _signals.in_main_thread():
            # It is raised in place of one the handler put off for this stop, if any: that one
            # is not raised after it (see _signals.take_put_off).
            _signals.take_put_off()
        self._reported = True
        self._raised_exc = None  # a pool call caught it: this one is raised in its place
        self._close_journal(quick=True)  # every worker is gone: what finished is committed now
        self._held = []
        _signals.detach(self)
        self._gathering = False
        if isinstance(exc, Interrupted) and exc._filled:
            return exc
        result = Interrupted(self._signal or signal.SIGINT, completed, total=total)
        result._filled = True
        _signals.interrupted(result.signal)
        return result

    def _completed(self) -> dict[int, Any]:
        """The results of the futures still referenced, submitted since the pool last
        (re)started: an earlier stop's futures were its own."""
        out: dict[int, Any] = {}
        for index, fut in list(self._futures.items()):
            if index < self._first_index:
                continue
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                out[index] = fut.result()
        return out

    def _check_open(self) -> None:
        _refuse_at_exit()
        if self._signal is not None:
            _signals.raise_put_off()
            raise RuntimeError(
                f"cannot schedule new tasks: the pool was interrupted by {self._signal.name}"
            )
        broken = self._backend.broken
        if broken is not None:
            raise BrokenPool(str(broken)) from broken
        if self._closed:
            raise RuntimeError("cannot schedule new tasks after shutdown")


def _not_started(sig: signal.Signals) -> Interrupted:
    """The Interrupted of a call on a stopped pool that a Ctrl-C stopped before it started the
    pool again (see ``_rearm``): nothing started, and it counts as a pool call's own (a ``with``
    block's end does not take it for one more Ctrl-C)."""
    _signals.take_put_off()
    stop = Interrupted(sig)
    stop._filled = True
    _signals.interrupted(sig)
    return stop


def _refuse_at_exit() -> None:
    """As ``concurrent.futures`` does: nothing new starts once the interpreter is exiting (an
    atexit handler that waited for it would hang the exit, since the pools are being shut
    down). Threads that the interpreter still waits for may go on."""
    if _signals.shutting_down and _signals.in_main_thread():
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")


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
        return_exceptions: bool = False,
        key: Callable[..., Any] | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        return self.pool._map(
            self.opts,
            fn,
            iterables,
            timeout,
            chunksize,
            buffersize,
            return_exceptions,
            key,
            progress,
        )

    def imap_unordered(
        self,
        fn: Callable[[Any], T],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        buffersize: int | None = None,
        return_exceptions: bool = False,
        key: Callable[[Any], Any] | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        return self.pool._imap_unordered(
            self.opts, fn, iterable, chunksize, buffersize, return_exceptions, key, progress
        )


def _settle(fut: Future[Any], value: Any, exc: BaseException | None) -> None:
    try:
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)
    except InvalidStateError:  # pragma: no cover - settled twice: keep the first outcome
        pass


_FOREIGN = -1  # a _TaskFuture's uid before the pool sets it
_RECORDED = -2  # ... for a task whose outcome came from the journal


class _TaskFuture(Future[T]):
    """A ``concurrent.futures.Future`` that a running task's stop can cancel.

    ``Future.cancel()`` refuses once a task runs, because the standard library cannot stop it.
    cleanbreak can (it kills the worker), and the future should then read as cancelled, so this
    does what ``cancel()`` does, for the RUNNING state too. It relies on Future's private
    ``_condition``, ``_state`` and ``_invoke_callbacks``, unchanged since Python 3.2.
    """

    uid = _FOREIGN
    owner: weakref.ref[Pool] | None = None  # the pool that made it

    def result(self, timeout: float | None = None) -> T:
        self._wait_done(timeout)
        return super().result(0)  # done, or the timeout has passed

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait_done(timeout)
        return super().exception(0)

    def _wait_done(self, timeout: float | None) -> None:
        """Wait until done, ``CHECK_EVERY`` seconds at a time (see ``_signals``), at most
        ``timeout`` seconds; the base class then reports the outcome, or the timeout.

        A Ctrl-C meanwhile is a pool call's: the pool stops, and the ``Interrupted`` carries
        the results of its futures that finished (as a map's carries the map's)."""
        try:
            with self._condition:
                for part in _signals.sliced(timeout):
                    if self._state not in (PENDING, RUNNING):
                        break
                    self._condition.wait(part)
            if self._state not in (PENDING, RUNNING, FINISHED):
                # Cancelled, perhaps by a stop whose Interrupted a callback dropped (see
                # _signals), or by a drain's that raised none yet: that is what the caller
                # gets, not CancelledError.
                put_off = _signals.take_put_off()
                if put_off is not None:
                    raise put_off.with_traceback(None)
                owner = self.owner() if self.owner is not None else None
                sig = None if owner is None else owner._owes_interrupt()
                if sig is not None:
                    stop = Interrupted(sig)
                    stop._counted = True
                    raise stop
        except KeyboardInterrupt as exc:
            pool = self.owner() if self.owner is not None else None
            if pool is None or (isinstance(exc, Interrupted) and exc._filled):
                raise
            raise pool._stop_for(exc, pool._completed, None) from None

    def _invoke_callbacks(self) -> None:
        # Done-callbacks run in the manager thread. Future's own loop logs an Exception and
        # lets anything else (SystemExit, KeyboardInterrupt) out, which would end that thread:
        # here each callback's failure is logged, and the other callbacks still run.
        for callback in self._done_callbacks:  # type: ignore[attr-defined]
            try:
                callback(self)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt) and _signals.in_main_thread():
                    raise  # a Ctrl-C, where Future.cancel() ran the callback: not the callback's
                _LOGGER.exception("exception calling callback for %r", self)

    def _cancel_running(self) -> None:
        with self._condition:
            if self._state not in (PENDING, RUNNING):
                return
            self._state = CANCELLED
            self._condition.notify_all()
        self._invoke_callbacks()
        self.set_running_or_notify_cancel()  # tells wait() and as_completed()


class _FutureSink:
    """Outcomes of one ``submit``: onto its Future."""

    __slots__ = ("fut",)
    prefetch = False
    merges = False

    def __init__(self, fut: _TaskFuture[Any]) -> None:
        self.fut = fut

    def start(self, unit: Unit) -> bool:
        if self.fut.running():  # sent again, after its worker died or to retry it
            return True
        return self.fut.set_running_or_notify_cancel()

    def deliver(
        self, start: int, values: list[Any], errors: dict[int, BaseException], seconds: float
    ) -> None:
        _settle(self.fut, values[0], errors.get(0))

    def fail(self, start: int, count: int, exc: BaseException) -> None:
        _settle(self.fut, None, exc)

    def cancel(self, start: int, count: int) -> None:
        self.fut._cancel_running()


class _AheadSink(_FutureSink):
    """A ``submit`` whose task may be sent ahead to a busy worker (see ``Pool._submit``), with
    a journal (whose ``Recorder`` wraps each task's sink)."""

    __slots__ = ()
    prefetch = True


class _AheadSinks:
    """The outcomes of every task of a pool that may be sent ahead to a busy worker (see
    ``Pool._submit``), onto their futures, by the tasks' indices. One sink for all of them, so
    that the backend may send waiting tasks of one brief function as one unit: their indices
    follow one another, and a unit's outcomes are told by index (see ``_units.Sink``).
    Every method runs in the backend's thread."""

    __slots__ = ("futures",)
    prefetch = True
    merges = True  # consecutive units of one function may travel as one (_manager)

    def __init__(self) -> None:
        self.futures: dict[int, _TaskFuture[Any]] = {}  # index -> the future, until settled

    def start(self, unit: Unit) -> bool:
        sent = False
        futures = self.futures
        for index in range(unit.current, unit.start + len(unit.items)):
            fut = futures.get(index)
            if fut is not None and (fut.running() or fut.set_running_or_notify_cancel()):
                sent = True  # (running already: sent again, after its worker died or to retry)
        return sent

    def deliver(
        self, start: int, values: list[Any], errors: dict[int, BaseException], seconds: float
    ) -> None:
        pop = self.futures.pop
        for k, value in enumerate(values):
            fut = pop(start + k, None)
            if fut is not None:
                _settle(fut, value, errors.get(k))

    def fail(self, start: int, count: int, exc: BaseException) -> None:
        for fut in self._take(start, count):
            _settle(fut, None, exc)

    def cancel(self, start: int, count: int) -> None:
        for fut in self._take(start, count):
            fut._cancel_running()

    def _take(self, start: int, count: int) -> Iterator[_TaskFuture[Any]]:
        """The futures of items ``start .. start + count`` not settled yet, let go of."""
        pop = self.futures.pop
        for index in range(start, start + count):
            fut = pop(index, None)
            if fut is not None:
                yield fut


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
    return_exceptions: bool = False,
    journal: Journal | str | os.PathLike[str] | None = None,
    key: Callable[[Any], Any] | None = None,
    progress: bool = False,
    dask: Any = None,
) -> list[T]:
    """Run ``fn`` over ``iterable`` in a fresh pool and return the results in input order.

    Every task runs even if some fail. Then the first failure (in input order) is raised, with
    a note saying how many failed and the other results in its ``completed`` attribute
    (``{index: result}``); with ``return_exceptions=True``, each failed task's exception takes
    its place in the list instead. On Ctrl-C, ``Interrupted.completed`` holds every result that
    had finished.

    With ``journal`` (a path or a ``Journal``), each outcome is recorded on disk, and a second
    call with the same journal gives the recorded results at once and runs only the rest.
    ``key(item)`` names each task in the journal (by default the item does). ``progress=True``
    shows a progress bar on stderr. With ``dask`` (a scheduler address or a
    ``distributed.Client``), the tasks run on that Dask cluster, as ``Pool(dask=...)`` does.
    """
    made = _map_pool(
        return_exceptions,
        progress,
        workers,
        on_interrupt=on_interrupt,
        mp_context=mp_context,
        initializer=initializer,
        initargs=initargs,
        task_timeout=task_timeout,
        retries=retries,
        retry_on=retry_on,
        max_tasks_per_worker=max_tasks_per_worker,
        journal=journal,
        dask=dask,
    )
    run: MapRun[T] | None = None
    try:
        with made as pool:
            run = MapRun(
                pool,
                pool._opts,
                fn,
                (iterable,),
                ordered=True,
                timeout=None,
                chunksize=chunksize,
                buffersize=None,
                keep_all=True,
                journal=pool._journal,
                key=key,
                progress=_progress_for(progress, fn),
            )
            return collect(run, return_exceptions)
    except Interrupted as exc:
        if run is not None:
            # The signal may come once every result is in, while the pool shuts down: the
            # list about to be returned is lost then, so its results go in .completed.
            exc.completed = run.gather()
            exc.total = run.total
        raise


@_signals.making_a_pool
def _map_pool(return_exceptions: bool, progress: bool, *args: Any, **kwargs: Any) -> Pool:
    """``map``'s own arguments checked, then its pool made, in the window ``Pool()`` has (a
    signal meanwhile gives ``Interrupted``, nothing started). Only that: a window open for the
    whole map would close after the pool had put the default handlers back."""
    _flag("return_exceptions", return_exceptions)
    _flag("progress", progress)
    return Pool(*args, **kwargs)


def _progress_for(progress: bool, fn: Callable[..., Any]) -> ProgressFactory | None:
    _flag("progress", progress)
    if not progress:
        return None
    from ._progress import Progress

    label = getattr(fn, "__name__", None) or "tasks"

    def make(counts: Any, total: int | None) -> Progress:
        return Progress(counts, total, label=label)

    return make


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
