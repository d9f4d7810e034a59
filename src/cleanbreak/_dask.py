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
import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import BrokenPool, TaskTimeout, WorkerDied
from ._signals import start_quiet_thread
from ._units import Intake, Unit, record_attempts
from ._wire import CALL_ONE, CALL_STAR, DONE, STOPPED, CapturedError

RUNNING, DRAINING, STOPPING, KILLING = 0, 1, 2, 3  # the same levels as _manager's
STOP_GRACE = 0.5  # seconds from the stop to the kill of workers still running our items
CONNECT_TIMEOUT = 10.0
FETCH_TIMEOUT = 30.0  # seconds to fetch a finished unit's result from its worker
MAX_RESUBMITS = 3  # a unit whose result is lost this often fails with WorkerDied
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
_running: dict[int, tuple[str, str, int]] = {}  # thread id -> (pool token, task key, item)
_expired: set[tuple[int, str, int]] = set()  # (thread id, task key, item) past their timeout
TIMED_OUT = 99  # run_unit's status: the item after ``values`` ran past its timeout


def _call(kind: int, fn: Callable[..., Any], item: Any) -> Any:
    if kind == CALL_ONE:
        return fn(item)
    if kind == CALL_STAR:
        return fn(*item)
    args, kwargs = item
    return fn(*args, **kwargs)


def run_unit(
    token: str,
    kind: int,
    fn: Callable[..., Any],
    items: Sequence[Any],
    timeout: float | None = None,
) -> tuple[int, list[Any], dict[int, CapturedError], float, int]:
    """Run a unit's items on a Dask worker: ``(status, values, errors, seconds, pid)``.

    The gate is read before each item; ``STOPPED`` means the items after ``values`` did not
    run (the gate closed, or ``_Stop`` broke off the running one), ``TIMED_OUT`` that the item
    after ``values`` ran past ``timeout`` and was broken off. An item still running
    ``STOP_GRACE`` seconds after its timeout (stuck in C) ends the worker process; its nanny
    starts a new one."""
    import distributed
    import distributed.worker

    key = str(getattr(getattr(distributed.worker, "thread_state", None), "key", ""))
    me = threading.get_ident()
    worker: Any = None
    values: list[Any] = []
    errors: dict[int, CapturedError] = {}
    status = DONE
    began = time.perf_counter()
    k = 0
    try:
        for k, item in enumerate(items):
            if token in _closed:
                status = STOPPED
                break
            timer = None
            if timeout is not None:
                if worker is None:
                    worker = distributed.get_worker()  # in this thread, not the timer's
                timer = threading.Timer(timeout, _expire, (me, token, key, k, worker))
                timer.daemon = True
                timer.start()
            _running[me] = (token, key, k)
            try:
                value = _call(kind, fn, item)
            except _Stop:
                raise
            except BaseException as exc:
                errors[k] = CapturedError.capture(exc)
                value = None
            finally:
                _running.pop(me, None)
                if timer is not None:
                    timer.cancel()
            values.append(value)
    except _Stop:
        status = TIMED_OUT if (me, key, k) in _expired else STOPPED
        _expired.discard((me, key, k))
    finally:
        _running.pop(me, None)
    return status, values, errors, time.perf_counter() - began, os.getpid()


def _expire(tid: int, token: str, key: str, k: int, worker: Any) -> None:
    """A timed item's deadline, in a timer thread of the worker: break it off, tell the
    client (which cancels the task, so that Dask does not run it again elsewhere), and end
    the worker process if the item is still running ``STOP_GRACE`` seconds later."""
    if _running.get(tid) != (token, key, k):
        return
    _expired.add((tid, key, k))
    _raise_in(tid)
    with contextlib.suppress(Exception):
        message = {"key": key, "item": k, "worker": worker.address, "pid": os.getpid()}
        worker.loop.add_callback(worker.log_event, _topic(token), message)
    time.sleep(STOP_GRACE)
    if _running.get(tid) == (token, key, k):
        os._exit(1)


def _topic(token: str) -> str:
    return f"cleanbreak-timeout-{token}"


def _raise_in(tid: int) -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_Stop))


async def stop_units(token: str, terminate: bool, keys: Sequence[str] | None = None) -> None:
    """Run by ``Client.run`` on each worker, in its event loop (a coroutine, which is what
    ``Client.run(wait=False)`` takes): close the pool's gate (unless only some ``keys`` are to
    stop), and with ``terminate`` break off its running items."""
    if keys is None:
        _closed.add(token)
    if not terminate:
        return
    for tid, (owner, key, _k) in list(_running.items()):
        if owner == token and (keys is None or key in keys):
            _raise_in(tid)


async def exit_worker() -> None:
    """Run by ``Client.run``: end this worker process now (its nanny starts a new one)."""
    os._exit(1)


def running_here() -> list[str]:
    """Run by ``Client.run``: the keys of the units whose items run in this worker now (for
    tests: a thread that no ``Client.processing()`` shows any more may still run)."""
    return [key for _token, key, _k in list(_running.values())]


# ── on the client ────────────────────────────────────────────────────────────────────────────


class _Flight:
    """A unit submitted to the cluster."""

    __slots__ = ("future", "key", "outcome", "unit")

    def __init__(self, unit: Unit, future: Any) -> None:
        self.unit = unit
        self.future = future
        self.key = str(future.key)
        self.outcome: tuple[int, list[Any], dict[int, CapturedError], float, int] = (
            DONE,
            [],
            {},
            0.0,
            0,
        )


class DaskBackend(Intake):
    """Units run as tasks on a ``dask.distributed`` cluster, by one thread of the pool's."""

    def __init__(self, target: Any) -> None:
        import uuid

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
        self._sent_level = RUNNING  # the stop level broadcast to the workers
        self._stop_at = 0.0
        self._killed: set[str] = set()
        self._cancelled: set[int] = set()  # units Pool.cancel stopped
        self._resubmits: dict[int, int] = {}  # units run again after their result was lost
        # Items that Dask gave up on (KilledWorker) once, run again each alone (see _fail),
        # and the key of the one that runs now, while nothing else of ours does.
        self._suspects: set[int] = set()
        self._alone: str | None = None
        self.finished = threading.Event()
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        # Timed items that ran out, as the workers report them (see _expire).
        self._client.subscribe_topic(_topic(self._token), self._on_timeout)
        start_quiet_thread(self._run, "cleanbreak-dask")

    def _on_timeout(self, event: Any) -> None:
        _when, message = event
        self._done.put(("timeout", message))

    # ── what Pool and MapRun call (the Backend protocol) ──────────────────────────────────

    def wake(self) -> None:
        self._done.put(None)  # SimpleQueue.put is reentrant: safe in a signal handler

    def raise_level(self, level: int) -> None:
        if level > self.level:
            self.level = level
            self.wake()

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
            with contextlib.suppress(Exception):
                self._client.unsubscribe_topic(_topic(self._token))
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
            if isinstance(item, tuple):
                self._on_expired(item[1])
            elif item is not None:
                self._settle(item)
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return

    def _on_expired(self, message: dict[str, Any]) -> None:
        """A worker says a timed item ran out: cancel its task, so that Dask does not run it
        again if the worker has to end, and fail it (or retry it)."""
        flight = self._land(str(message.get("key")))
        if flight is None:  # its result came first
            return
        with contextlib.suppress(Exception):
            self._client.cancel([flight.future], force=True)
        self._timed_out(flight, message)

    def _submit(self) -> None:
        import uuid

        while self.pending and len(self._flights) < 2 * self.size and self._alone is None:
            suspect = self.pending[0].uid in self._suspects
            if suspect and self._flights:
                return  # it waits until nothing else of ours runs
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
                timeout,
                key=f"cleanbreak-{self._token[:8]}-{unit.uid}-{uuid.uuid4().hex[:8]}",
                pure=False,
                retries=0,
            )
            flight = _Flight(unit, future)
            self._flights[flight.key] = flight
            if suspect:
                self._alone = flight.key
            future.add_done_callback(self._done.put)

    def _land(self, key: str) -> _Flight | None:
        """The flight of ``key`` is over (None: it was already)."""
        if key == self._alone:
            self._alone = None
        return self._flights.pop(key, None)

    def _settle(self, future: Any) -> None:
        flight = self._land(str(future.key))
        if flight is None:
            return
        unit = flight.unit
        status = future.status
        if status == "finished" and not self._fetch(flight):
            status = "lost"
        ours = self.level >= DRAINING or unit.uid in self._cancelled
        if status in ("cancelled", "lost") and not ours:
            # Not our doing: the worker that held the result died before we fetched it (the
            # scheduler then runs the task again, or gives up on it). Run the unit again.
            self._resubmit(unit)
            return
        if status == "finished":
            outcome, values, errors, seconds, pid = flight.outcome
            if values:
                rebuilt = {k: e.rebuild() for k, e in errors.items()}
                if rebuilt and unit.opts.retries:
                    self._deliver(unit, values, rebuilt, seconds)
                else:
                    unit.sink.deliver(unit.current, values, rebuilt, seconds)
                    unit.received += len(values)
            if unit.left:
                if outcome == TIMED_OUT and self.level < DRAINING:
                    self._timed_out(flight, {"pid": pid})
                else:
                    unit.sink.cancel(unit.current, unit.left)
            return
        if status in ("cancelled", "lost") or self.level >= DRAINING:
            unit.sink.cancel(unit.current, unit.left)
            return
        error: BaseException | None
        try:
            error = future.exception()
        except BaseException as err:
            error = err
        self._fail(flight, error)

    def _fetch(self, flight: _Flight) -> bool:
        """Fetch a finished unit's outcome into ``flight.outcome``; False if it is gone."""
        try:
            flight.outcome = flight.future.result(timeout=FETCH_TIMEOUT)
        except Exception as exc:
            if isinstance(exc, self._cancelled_error | TimeoutError | OSError):
                return False
            # It does not unpickle here: the unit's items fail with that error.
            flight.outcome = (DONE, [], {}, 0.0, 0)
            self._fail(flight, exc)
            flight.unit.received = len(flight.unit.items)
        return True

    def _resubmit(self, unit: Unit) -> None:
        tries = self._resubmits.get(unit.uid, 0) + 1
        if tries > MAX_RESUBMITS:
            died = WorkerDied(None, 0, unit.current, lost="its result was lost again and again")
            self._fail_items(unit, died)
            return
        again = unit.part(next(self._uids), unit.received)
        self._resubmits[again.uid] = tries
        self.pending.appendleft(again)

    def _fail(self, flight: _Flight, exc: BaseException | None) -> None:
        unit = flight.unit
        if isinstance(exc, self._killed_worker):
            if unit.uid not in self._suspects:
                # Dask gives up on every task that was on a worker as it died for the n-th
                # time, the one that killed it and those queued beside it. Each item runs
                # again alone: the one at fault kills its worker again and fails alone.
                for k in range(len(unit.items) - 1, unit.received - 1, -1):
                    single = unit.part(next(self._uids), k, k + 1)
                    self._suspects.add(single.uid)
                    self.pending.appendleft(single)
                return
            self._suspects.discard(unit.uid)
            died = WorkerDied(None, 0, unit.current, lost=f"{exc}")
            died.__cause__ = exc
            self._fail_items(unit, died)
            return
        if isinstance(exc, self._cancelled_error) or exc is None:
            unit.sink.cancel(unit.current, unit.left)
            return
        unit.sink.fail(unit.current, unit.left, exc)

    def _timed_out(self, flight: _Flight, message: dict[str, Any]) -> None:
        """The unit's next item ran out of time: it fails (or is retried), and the items
        after it, which did not run, go back to the queue."""
        unit = flight.unit
        timeout = unit.opts.task_timeout or 0.0
        where = str(message.get("worker") or "(address unknown)")
        exc = TaskTimeout(timeout, int(message.get("pid") or 0), unit.current, dask_worker=where)
        if unit.left > 1:
            self.pending.appendleft(unit.part(next(self._uids), unit.received + 1))
        self._fail_items(unit.part(next(self._uids), unit.received, unit.received + 1), exc)

    def _fail_items(self, unit: Unit, exc: BaseException) -> None:
        """Items without an outcome failed with ``exc``: each is retried alone while its
        options allow, else reported."""
        for k in range(unit.received, len(unit.items)):
            if not self._retried(unit, k, exc):
                if unit.history:
                    record_attempts(exc, [*unit.history, exc])
                unit.sink.fail(unit.start + k, 1, exc)

    def _retried(self, unit: Unit, k: int, exc: BaseException) -> bool:
        """Run item ``k`` again, alone, if its options say so after ``exc``."""
        if not unit.opts.retry(unit.history, exc):
            return False
        single = unit.part(next(self._uids), k, k + 1)
        single.history = [*(unit.history or ()), exc]
        self.pending.appendleft(single)
        return True

    def _deliver(
        self, unit: Unit, values: list[Any], errors: dict[int, BaseException], seconds: float
    ) -> None:
        """The unit's next items finished: hand them on, except the failures that its
        options retry (``retry_on``), which run again alone."""
        begin = 0
        first = unit.received
        each = seconds / len(values)
        for k in sorted(errors):
            if not self._retried(unit, first + k, errors[k]):
                if unit.history:
                    record_attempts(errors[k], [*unit.history, errors[k]])
                continue
            part = {j - begin: e for j, e in errors.items() if begin <= j < k}
            if k > begin:
                unit.sink.deliver(
                    unit.start + first + begin, values[begin:k], part, each * (k - begin)
                )
            begin = k + 1
        if begin < len(values):
            part = {j - begin: e for j, e in errors.items() if j >= begin}
            unit.sink.deliver(
                unit.start + first + begin, values[begin:], part, each * (len(values) - begin)
            )
        unit.received += len(values)

    def _obey_commands(self) -> None:
        while self._commands:
            uid = self._commands.popleft()
            self._cancelled.add(uid)
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
        terminate = level >= STOPPING
        wanted = min(level, STOPPING)  # what the workers must do: drain, or stop their items
        if self._sent_level < wanted:
            self._sent_level = wanted
            self._stop_at = time.monotonic()
            with contextlib.suppress(Exception):
                self._client.run(stop_units, self._token, terminate, wait=False)
        if terminate:
            late = time.monotonic() - self._stop_at >= STOP_GRACE
            if self._flights and (late or level >= KILLING):
                self._kill_holders(list(self._flights.values()))

    def _stop_keys(self, keys: list[str]) -> None:
        with contextlib.suppress(Exception):
            self._client.run(stop_units, self._token, True, keys, wait=False)

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
                if self._land(flight.key) is not None:
                    flight.unit.sink.cancel(flight.unit.current, flight.unit.left)
