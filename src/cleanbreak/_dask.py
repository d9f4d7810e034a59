"""The Dask backend: the same ``Pool`` on a ``dask.distributed`` cluster.

``Pool(dask="tcp://scheduler:8786")`` (or a ``distributed.Client``) puts a ``DaskBackend``
behind the pool instead of the local processes. ``Pool``, its signal policy, ``map``'s window
and the journal do not change: they talk to a ``Backend`` (``_units``), which this module
implements a second time.

How it keeps cleanbreak's promises on a cluster, where a thread in a worker cannot be killed:

- *No task starts after the signal.* Each unit runs on a worker as ``run_unit``, which reads a
  per-pool gate before each item. On Ctrl-C the backend broadcasts ``stop_units`` to every
  worker (``Client.run``, outside the task queue, so it is not held up behind tasks): it closes
  the gate there. Units waiting in the scheduler's queue find it closed when they start, and
  return at once.
- *Running tasks stop (terminate)*: ``stop_units`` also raises ``_Stop`` in the threads
  running this pool's items (``PyThreadState_SetAsyncExc``, the thread-level twin of the local
  worker's SIGTERM handler). The unit returns the items it had finished, so they are kept. Code
  stuck in C (a long numpy call, a ``sleep``) sees the exception only once it returns to
  Python: after ``STOP_GRACE`` seconds the backend kills the worker processes still running
  its items (their nanny starts new ones). Workers without a nanny cannot be restarted, so they
  are left to finish the item, whose result is discarded.
- *Drain* closes the gate only: running items finish, their results are kept.
- Only ``2 * threads`` units are submitted at a time, so a stop has little to cancel, and an
  endless input stays bounded (``map``'s window bounds what is read).
- The cluster is left running for its other users; a ``Client`` the pool made is closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import BrokenPool, TaskTimeout, WorkerDied
from ._signals import start_quiet_thread, wait_event
from ._units import Sink, TaskOptions, Unit
from ._wire import CALL_ONE, CALL_STAR, DONE, STOPPED, CapturedError

RUNNING, DRAINING, STOPPING, KILLING = 0, 1, 2, 3  # the same levels as _manager's
STOP_GRACE = 0.5  # seconds from the stop to the kill of workers still running our items
CONNECT_TIMEOUT = 10.0
EXTRA = "pip install 'cleanbreak[dask]'"


def import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ImportError(
            f"Pool(dask=...) needs dask.distributed, which is not installed: {EXTRA}"
        ) from None
    return distributed


# ── on the worker ────────────────────────────────────────────────────────────────────────────


class _Stop(BaseException):
    """Raised in a thread running one of our items, to stop it (see ``stop_units``)."""


_closed: set[str] = set()  # pools whose gate is closed on this worker
_running: dict[int, tuple[str, str]] = {}  # thread id -> (pool token, task key) in task code


def _call(kind: int, fn: Callable[..., Any], item: Any) -> Any:
    if kind == CALL_ONE:
        return fn(item)
    if kind == CALL_STAR:
        return fn(*item)
    args, kwargs = item
    return fn(*args, **kwargs)


def run_unit(
    token: str, kind: int, fn: Callable[..., Any], items: Sequence[Any]
) -> tuple[int, list[Any], dict[int, CapturedError], float, int]:
    """Run a unit's items on a Dask worker: ``(status, values, errors, seconds, pid)``.

    The gate is read before each item; ``STOPPED`` means the items after ``values`` did not
    run (the gate closed, or ``_Stop`` broke off the running one)."""
    import distributed.worker

    key = str(getattr(getattr(distributed.worker, "thread_state", None), "key", ""))
    me = threading.get_ident()
    values: list[Any] = []
    errors: dict[int, CapturedError] = {}
    status = DONE
    began = time.perf_counter()
    try:
        for k, item in enumerate(items):
            if token in _closed:
                status = STOPPED
                break
            _running[me] = (token, key)
            try:
                value = _call(kind, fn, item)
            except _Stop:
                raise
            except BaseException as exc:
                errors[k] = CapturedError.capture(exc)
                value = None
            finally:
                _running.pop(me, None)
            values.append(value)
    except _Stop:
        status = STOPPED
    finally:
        _running.pop(me, None)
    return status, values, errors, time.perf_counter() - began, os.getpid()


def stop_units(token: str, terminate: bool, keys: Sequence[str] | None = None) -> None:
    """Run by ``Client.run`` on each worker, in its event loop: close the pool's gate (unless
    only some ``keys`` are to stop), and with ``terminate`` break off its running items."""
    if keys is None:
        _closed.add(token)
    if not terminate:
        return
    for tid, (owner, key) in list(_running.items()):
        if owner == token and (keys is None or key in keys):
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_Stop))


def exit_worker() -> None:
    """Run by ``Client.run``: end this worker process now (its nanny starts a new one)."""
    os._exit(1)


# ── on the client ────────────────────────────────────────────────────────────────────────────


class _Flight:
    """A unit submitted to the cluster."""

    __slots__ = ("deadline", "future", "key", "since", "stopped_at", "unit")

    def __init__(self, unit: Unit, future: Any, deadline: float | None) -> None:
        self.unit = unit
        self.future = future
        self.key = str(future.key)
        self.since = time.monotonic()
        self.deadline = deadline
        self.stopped_at: float | None = None  # when we asked it to stop (a timeout, a cancel)


class DaskBackend:
    """Units run as tasks on a ``dask.distributed`` cluster, by one thread of the pool's."""

    def __init__(self, target: Any) -> None:
        distributed = import_distributed()
        if isinstance(target, str):
            try:
                self._client = distributed.Client(
                    target, set_as_default=False, timeout=CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError, ValueError) as exc:
                raise BrokenPool(
                    f"cannot reach the Dask scheduler at {target} ({type(exc).__name__}: "
                    f"{exc}); start one with `dask scheduler`, or check the address"
                ) from None
            self._own = True
        elif isinstance(target, distributed.Client):
            self._client = target
            self._own = False
        else:
            raise TypeError(
                f"dask= takes a scheduler address or a distributed.Client, not {target!r}"
            )
        self._killed_worker: type[BaseException] = distributed.KilledWorker
        self._cancelled_error: type[BaseException] = distributed.client.FutureCancelledError
        self.size = max(1, sum(self._client.nthreads().values()))
        self.address = str(self._client.scheduler.address)
        self.pending: deque[Unit] = deque()
        self._commands: deque[int] = deque()
        self._uids = itertools.count()
        self._token = uuid.uuid4().hex
        self.level = RUNNING
        self._closing = False
        self._cancel_pending = False
        self._accepting = True
        self._lock = threading.RLock()
        self._broken: BaseException | None = None
        self._flights: dict[str, _Flight] = {}
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop_sent = False
        self._stop_at = 0.0
        self._killed: set[str] = set()
        self.finished = threading.Event()
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        start_quiet_thread(self._run, "cleanbreak-dask")

    # ── what Pool and MapRun call (the Backend protocol) ──────────────────────────────────

    def new_unit(
        self,
        kind: int,
        fn: Callable[..., Any],
        items: Sequence[Any],
        sink: Sink,
        start: int,
        opts: TaskOptions,
    ) -> Unit:
        return Unit(next(self._uids), kind, fn, items, sink, start, opts)

    def put(self, unit: Unit) -> None:
        with self._lock:
            if not self._accepting:
                raise RuntimeError("cannot schedule new tasks: the pool has shut down")
            self.pending.append(unit)
        self.wake()

    def stop_unit(self, uid: int) -> None:
        self._commands.append(uid)
        self.wake()

    def wake(self) -> None:
        self._done.put(None)  # SimpleQueue.put is reentrant: safe in a signal handler

    def raise_level(self, level: int) -> None:
        if level > self.level:
            self.level = level
            self.wake()

    def close(self, cancel_pending: bool) -> None:
        self._cancel_pending = self._cancel_pending or cancel_pending
        self._closing = True
        self.wake()

    def wait(self, timeout: float | None = None) -> bool:
        return wait_event(self.finished, timeout)

    @property
    def pids(self) -> list[int]:
        return []

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    # ── the backend's thread ──────────────────────────────────────────────────────────────

    def _run(self) -> None:
        self.started.set()
        try:
            while True:
                self._obey_commands()
                level = self.level
                if level >= DRAINING:
                    self._stop(level)
                    if not self._flights:
                        break
                else:
                    if self._cancel_pending:
                        self._cancel_queue()
                    self._submit()
                    if self._closing and not self.pending and not self._flights:
                        break
                self._check_deadlines()
                self._wait()
        except BaseException as exc:  # pragma: no cover - a bug here must not hang the caller
            self._broken = RuntimeError(f"cleanbreak's Dask thread failed: {exc!r}")
            for flight in list(self._flights.values()):
                flight.unit.sink.fail(flight.unit.current, flight.unit.left, self._broken)
            self._flights.clear()
            raise
        finally:
            with self._lock:
                self._accepting = False
            self._cancel_queue()
            if self._flights:
                with contextlib.suppress(Exception):
                    self._client.cancel([f.future for f in self._flights.values()], force=True)
                for flight in self._flights.values():
                    flight.unit.sink.cancel(flight.unit.current, flight.unit.left)
                self._flights.clear()
            if self._own:
                with contextlib.suppress(Exception):
                    self._client.close(timeout=2)
            self.finished.set()

    def _wait(self) -> None:
        timeout = 0.05
        try:
            item = self._done.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._settle(item)
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return

    def _submit(self) -> None:
        while self.pending and len(self._flights) < 2 * self.size:
            unit = self.pending.popleft()
            if not unit.sink.start(unit):
                continue
            timeout = unit.opts.task_timeout
            if timeout is not None and len(unit.items) > 1:
                # Timed items go one by one, so that each one's time is its own.
                for k in range(len(unit.items) - 1, -1, -1):
                    self.pending.appendleft(unit.part(next(self._uids), k, k + 1))
                continue
            future = self._client.submit(
                run_unit,
                self._token,
                unit.kind,
                unit.fn,
                list(unit.items),
                key=f"cleanbreak-{self._token[:8]}-{unit.uid}-{uuid.uuid4().hex[:8]}",
                pure=False,
                retries=0,
            )
            deadline = None if timeout is None else time.monotonic() + timeout
            flight = _Flight(unit, future, deadline)
            self._flights[flight.key] = flight
            future.add_done_callback(self._done.put)

    def _settle(self, future: Any) -> None:
        flight = self._flights.pop(str(future.key), None)
        if flight is None:
            return
        unit = flight.unit
        status = future.status
        if status == "finished":
            try:
                outcome, values, errors, seconds, _pid = future.result()
            except BaseException as exc:  # the result does not unpickle here
                self._fail(flight, exc)
                return
            if values:
                rebuilt = {k: e.rebuild() for k, e in errors.items()}
                unit.sink.deliver(unit.current, values, rebuilt, seconds)
                unit.received += len(values)
            if unit.left:
                if outcome == STOPPED and flight.deadline is not None and self.level < DRAINING:
                    self._timed_out(flight)
                else:
                    unit.sink.cancel(unit.current, unit.left)
            return
        if status == "cancelled" or self.level >= DRAINING:
            unit.sink.cancel(unit.current, unit.left)
            return
        error: BaseException | None
        try:
            error = future.exception()
        except BaseException as err:
            error = err
        self._fail(flight, error)

    def _fail(self, flight: _Flight, exc: BaseException | None) -> None:
        unit = flight.unit
        if flight.stopped_at is not None and flight.deadline is not None:
            self._timed_out(flight)
            return
        if isinstance(exc, self._killed_worker):
            died = WorkerDied(None, 0, unit.current, lost=f"{exc}")
            died.__cause__ = exc
            self._fail_items(unit, died)
            return
        if isinstance(exc, self._cancelled_error) or exc is None:
            unit.sink.cancel(unit.current, unit.left)
            return
        unit.sink.fail(unit.current, unit.left, exc)

    def _timed_out(self, flight: _Flight) -> None:
        unit = flight.unit
        timeout = unit.opts.task_timeout or 0.0
        self._fail_items(unit, TaskTimeout(timeout, 0, unit.current))

    def _fail_items(self, unit: Unit, exc: BaseException) -> None:
        """Items without an outcome failed with ``exc``: each is retried alone while its
        options allow, else reported."""
        for k in range(unit.received, len(unit.items)):
            single = unit.part(next(self._uids), k, k + 1)
            history = [*(unit.history or ()), exc]
            if len(history) <= unit.opts.retries:
                single.history = history
                self.pending.appendleft(single)
                continue
            if history[:-1]:
                with contextlib.suppress(AttributeError):
                    exc.attempts = history  # type: ignore[attr-defined]
            unit.sink.fail(unit.start + k, 1, exc)

    def _obey_commands(self) -> None:
        while self._commands:
            uid = self._commands.popleft()
            for flight in list(self._flights.values()):
                if flight.unit.uid == uid:
                    self._client.cancel([flight.future], force=True)
                    self._stop_keys([flight.key])

    def _cancel_queue(self) -> None:
        while self.pending:
            unit = self.pending.popleft()
            unit.sink.cancel(unit.current, unit.left)

    def _stop(self, level: int) -> None:
        """The stop sequence (see the module docstring), step by step as the level rises."""
        self._cancel_queue()
        if not self._stop_sent:
            self._stop_sent = True
            self._stop_at = time.monotonic()
            with contextlib.suppress(Exception):
                self._client.run(stop_units, self._token, level >= STOPPING, wait=False)
        elif level >= STOPPING and not self._terminate_sent:
            self._terminate_sent = True
            self._stop_at = time.monotonic()
            with contextlib.suppress(Exception):
                self._client.run(stop_units, self._token, True, wait=False)
        if level >= STOPPING:
            self._terminate_sent = True
            late = time.monotonic() - self._stop_at >= STOP_GRACE
            if self._flights and (late or level >= KILLING):
                self._kill_holders(list(self._flights.values()))

    _terminate_sent = False

    def _stop_keys(self, keys: list[str]) -> None:
        with contextlib.suppress(Exception):
            self._client.run(stop_units, self._token, True, keys, wait=False)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for flight in list(self._flights.values()):
            if flight.deadline is None or now < flight.deadline:
                continue
            if flight.stopped_at is None:
                flight.stopped_at = now
                self._stop_keys([flight.key])
            elif now - flight.stopped_at >= STOP_GRACE:
                self._flights.pop(flight.key, None)
                with contextlib.suppress(Exception):
                    self._client.cancel([flight.future], force=True)
                self._kill_holders([flight])
                self._timed_out(flight)

    def _kill_holders(self, flights: list[_Flight]) -> None:
        """End the worker processes running these units (a nanny restarts each), once."""
        try:
            processing = self._client.processing()
            nannies = {
                addr: bool(info.get("nanny"))
                for addr, info in self._client.scheduler_info(n_workers=-1)["workers"].items()
            }
        except Exception:
            return
        keys = {f.key for f in flights}
        holders = [
            addr
            for addr, tasks in processing.items()
            if keys & {str(t) for t in tasks} and nannies.get(addr) and addr not in self._killed
        ]
        if holders:
            self._killed.update(holders)
            with contextlib.suppress(Exception):
                self._client.run(exit_worker, workers=holders, wait=False)
        if self.level >= STOPPING:
            # What still runs is discarded: its results will not be waited for.
            with contextlib.suppress(Exception):
                self._client.cancel([f.future for f in flights], force=True)
            for flight in flights:
                if self._flights.pop(flight.key, None) is not None:
                    flight.unit.sink.cancel(flight.unit.current, flight.unit.left)
