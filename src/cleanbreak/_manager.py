"""The local-process backend: worker processes and the one thread that waits on them.

How a task and its result travel::

    caller thread                 manager thread (this module)              worker process
    ─────────────                 ────────────────────────────              ──────────────
    Pool.submit / map
      │ Unit into `pending` ──▶  wake pipe ─┐
      │                                     ▼
      │                          selector.select([wake pipe,       ◀── one place waits
      │                                           result pipes,
      │                                           worker pidfds,
      │                                           task pipes with bytes to write],
      │                                          timeout = next stop deadline)
      │                           _dispatch: pickle Unit, FrameWriter ── task pipe ──▶ run items
      │                                                                                │
      │                           _on_result: FrameReader ◀──────────── result pipe ──┘
      │                             sink.deliver()  (sets futures, feeds map queues)
      ▼
    Future.result() / map iterator wakes

    Signals: the handler (main thread) sets the shared stop flag, which workers read between
    items, and raises the pool's stop level; the manager, woken through the wake pipe, signals
    the worker process groups and reaps them.

Actors:

- *Caller threads* append ``Unit`` objects to ``pending`` (a deque, safe to append to from any
  thread) and write a byte to the wake pipe. They never touch a worker.
- *The manager thread* owns every worker, pipe and in-flight unit. It pickles units, writes
  them without blocking, reads results as they arrive, notices deaths through the worker's
  pidfd, and runs the stop sequence. Nothing here sleeps to poll: every wake-up is an event or
  a deadline.
- *Workers* run units in order (see ``_worker``). Each worker holds at most ``PREFETCH`` units,
  so a unit the caller cancels has usually not left the parent yet.

Sinks receive outcomes in the manager thread. A sink is whatever the caller-facing layer
attached to the unit: a future for ``submit``, a queue for ``map``. This module knows nothing of
either, which leaves room for a second backend (Dask) behind the same ``Pool``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing
import os
import pickle
import selectors
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any, Protocol

from ._errors import BrokenPool, SerializationError, WorkerDied
from ._wire import DONE, SKIPPED, CapturedError, FrameReader, FrameWriter, dumps, make_pipe
from ._worker import UNREADABLE, worker_main

PREFETCH = 2
# After SIGTERM, a worker (or a process it started) that is still alive this long is killed.
STOP_GRACE = 0.5
# Workers that die this many times in a row before finishing a single item mean something in
# the workers' start-up is broken (an initializer, an import): the pool gives up instead of
# starting a crash loop.
BARREN_DEATHS = 3

# Stop levels, in order of escalation.
RUNNING, DRAINING, STOPPING, KILLING = 0, 1, 2, 3


class Sink(Protocol):
    """Where a unit's outcomes go. Every method is called in the manager thread."""

    def start(self, unit: Unit) -> bool:
        """The unit is about to be sent. False: it was cancelled, drop it."""

    def deliver(
        self, unit: Unit, offset: int, values: list[Any], errors: dict[int, BaseException]
    ) -> None:
        """Items ``offset ..`` finished: ``values[i]``, or ``errors[i]`` where present."""

    def fail(self, unit: Unit, offset: int, exc: BaseException) -> None:
        """Every item from ``offset`` to the end of the unit failed with ``exc``."""

    def cancel(self, unit: Unit, offset: int) -> None:
        """Every item from ``offset`` to the end of the unit will not run."""


class Unit:
    """Items that travel to a worker together, and where their outcomes go."""

    __slots__ = ("fn", "items", "kind", "received", "sink", "start", "uid")

    def __init__(
        self,
        uid: int,
        kind: int,
        fn: Callable[..., Any],
        items: Sequence[Any],
        sink: Sink,
        start: int,
    ) -> None:
        self.uid = uid
        self.kind = kind
        self.fn = fn
        self.items = items
        self.sink = sink
        self.start = start  # index of items[0] in the caller's numbering
        self.received = 0  # how many items have an outcome


# ── file descriptors a forked child must not keep ────────────────────────────────────────────
#
# With the fork start method a worker inherits every descriptor of the parent, including the
# parent's end of other workers' pipes and of the lifeline. A worker that kept the lifeline's
# write end open would stop every worker from noticing the parent's death. So the parent's ends
# are listed here, and any forked child closes them first thing.

_parent_fds: set[int] = set()


def _close_parent_fds() -> None:
    for fd in list(_parent_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _parent_fds.clear()


os.register_at_fork(after_in_child=_close_parent_fds)


def _own(fd: int) -> int:
    os.set_blocking(fd, False)
    _parent_fds.add(fd)
    return fd


def _close(fd: int) -> None:
    _parent_fds.discard(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the worker's process group, or the worker alone if it has not made one yet."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:  # pragma: no cover - the group id was reused by someone else
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class _Worker:
    __slots__ = (
        "deathfd",
        "exitcode",
        "has_pidfd",
        "inflight",
        "pid",
        "proc",
        "reader",
        "ready",
        "retiring",
        "writer",
    )

    def __init__(self, proc: Any, task_fd: int, result_fd: int) -> None:
        self.proc = proc
        self.pid: int = proc.pid
        self.writer = FrameWriter(task_fd)
        self.reader = FrameReader(result_fd)
        self.inflight: deque[Unit] = deque()
        self.retiring = False
        self.ready = False  # has sent its first frame: started, initializer done
        self.exitcode: int | None = None
        # A pidfd becomes readable when the process exits. The multiprocessing sentinel is
        # a pipe that a process forked by the task inherits, so it would not fire while that
        # grandchild lives on.
        try:
            self.deathfd: int = os.pidfd_open(self.pid)
            self.has_pidfd = True
        except (AttributeError, OSError):  # pragma: no cover - not Linux, or Linux < 5.3
            self.deathfd = proc.sentinel
            self.has_pidfd = False


class LocalBackend:
    """Worker processes on this machine, run by one manager thread."""

    def __init__(
        self,
        workers: int,
        ctx: BaseContext,
        initializer: Callable[..., object] | None,
        initargs: Sequence[Any],
    ) -> None:
        self.size = workers
        self._ctx = ctx
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self.pending: deque[Unit] = deque()
        self._uids = itertools.count()
        # Set by the signal handler in the main thread, read by workers between items.
        self.stop_flag: Any = ctx.RawValue("i", 0)
        self.level = RUNNING
        self._level_seen = RUNNING
        self._closing = False
        self._cancel_pending = False
        self._broken: BaseException | None = None
        self._barren_deaths = 0
        self._kill_at: float | None = None
        self.finished = threading.Event()
        # Reentrant: wake() runs in the signal handler, which may interrupt the main thread
        # inside put().
        self._lock = threading.RLock()
        self._accepting = True

        wake_r, wake_w = os.pipe()
        self._wake_r = _own(wake_r)
        self._wake_w = _own(wake_w)
        lifeline_r, lifeline_w = os.pipe()
        self._lifeline_r = lifeline_r  # handed to every worker; the parent's copy stays open
        self._lifeline_w = _own(lifeline_w)
        os.set_blocking(lifeline_r, True)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._workers: dict[int, _Worker] = {}
        for _ in range(workers):
            self._spawn()
        self._thread = threading.Thread(target=self._run, name="cleanbreak-manager", daemon=True)
        self._thread.start()
        _live.add(self)

    # ── called from caller threads ───────────────────────────────────────────────────────

    def new_unit(
        self, kind: int, fn: Callable[..., Any], items: Sequence[Any], sink: Sink, start: int
    ) -> Unit:
        return Unit(next(self._uids), kind, fn, items, sink, start)

    def put(self, unit: Unit) -> None:
        """Queue a unit. Raises RuntimeError once the manager has exited or is exiting."""
        with self._lock:
            if not self._accepting:
                raise RuntimeError("cannot schedule new tasks: the pool has shut down")
            self.pending.append(unit)
        self.wake()

    def wake(self) -> None:
        # Under the lock, so that the fd cannot be closed (and its number reused) between the
        # check and the write.
        with self._lock:
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._wake_w, b"\0")

    def raise_level(self, level: int) -> None:
        """Escalate the stop. Safe to call from a signal handler: it only sets state."""
        if level > self.level:
            if level >= DRAINING:
                self.stop_flag.value = 1
            self.level = level
            self.wake()

    def close(self, cancel_pending: bool) -> None:
        """No more units will come: finish what is queued (or cancel it), then exit."""
        self._cancel_pending = self._cancel_pending or cancel_pending
        self._closing = True
        self.wake()

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in list(self._workers.values())]

    # ── the manager thread ───────────────────────────────────────────────────────────────

    def _spawn(self) -> None:
        task_r, task_w = make_pipe()
        result_r, result_w = make_pipe()
        child_tasks = Connection(task_r, writable=False)
        child_results = Connection(result_w, readable=False)
        lifeline = Connection(os.dup(self._lifeline_r), writable=False)
        _own(task_w)
        _own(result_r)
        proc = self._ctx.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(
                child_tasks,
                child_results,
                lifeline,
                self.stop_flag,
                self._initializer,
                self._initargs,
            ),
            name="cleanbreak-worker",
        )
        try:
            proc.start()
        finally:
            child_tasks.close()
            child_results.close()
            lifeline.close()
        worker = _Worker(proc, task_w, result_r)
        self._workers[result_r] = worker
        self._sel.register(result_r, selectors.EVENT_READ, worker)
        self._sel.register(worker.deathfd, selectors.EVENT_READ, worker)

    def _run(self) -> None:
        try:
            while not self._done():
                self._apply_level()
                self._dispatch()
                for key, mask in self._sel.select(self._timeout()):
                    worker = key.data
                    if worker is None:
                        self._drain_wake()
                    elif key.fd == worker.deathfd:
                        self._on_death(worker)
                    elif mask & selectors.EVENT_WRITE:
                        self._flush(worker)
                    else:
                        self._on_readable(worker)
                self._check_deadlines()
        except BaseException as exc:  # pragma: no cover - a bug here must not hang the caller
            self._broken = RuntimeError(f"cleanbreak's manager thread failed: {exc!r}")
            self._abort()
            raise
        finally:
            with self._lock:
                self._accepting = False
            err = self._broken
            while self.pending:
                unit = self.pending.popleft()
                if err is None:
                    unit.sink.cancel(unit, unit.received)
                else:
                    unit.sink.fail(unit, unit.received, err)
            self._teardown()

    def _done(self) -> bool:
        if self._workers:
            if self.level >= DRAINING or self._broken is not None:
                if not any(w.inflight for w in self._workers.values()):
                    self._retire_all()
                return False
            if self._closing:
                if self._cancel_pending:
                    self._cancel_all_pending()
                if not self.pending and not any(w.inflight for w in self._workers.values()):
                    self._retire_all()
            return False
        if self.level >= DRAINING or self._broken is not None or self._closing:
            self._cancel_all_pending()
            return True
        return False

    def _timeout(self) -> float | None:
        if self._kill_at is None:
            return None
        return max(0.0, self._kill_at - time.monotonic())

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _apply_level(self) -> None:
        level = self.level
        if level == self._level_seen:
            return
        self._level_seen = level
        self.stop_flag.value = 1
        self._cancel_all_pending()
        if level >= KILLING:
            self._kill_at = None
            for w in self._workers.values():
                _signal_group(w.pid, signal.SIGKILL)
        elif level >= STOPPING:
            self._kill_at = time.monotonic() + STOP_GRACE
            for w in self._workers.values():
                _signal_group(w.pid, signal.SIGTERM)

    def _check_deadlines(self) -> None:
        if self._kill_at is not None and time.monotonic() >= self._kill_at:
            self._kill_at = None
            for w in self._workers.values():
                _signal_group(w.pid, signal.SIGKILL)

    def _cancel_all_pending(self) -> None:
        while self.pending:
            unit = self.pending.popleft()
            unit.sink.cancel(unit, unit.received)

    def _retire_all(self) -> None:
        for w in self._workers.values():
            if not w.retiring:
                w.retiring = True
                w.writer.put(dumps(None))
                self._flush(w)

    def _dispatch(self) -> None:
        if self.level or self._broken is not None or not self.pending:
            return
        live = [w for w in self._workers.values() if not w.retiring]
        for depth in range(1, PREFETCH + 1):
            for w in live:
                while len(w.inflight) < depth and self.pending:
                    unit = self.pending.popleft()
                    if not unit.sink.start(unit):
                        continue
                    try:
                        payload = dumps((unit.uid, unit.kind, unit.fn, unit.items))
                    except Exception as exc:
                        unit.sink.fail(unit, 0, _pickling_error(unit, exc))
                        continue
                    w.inflight.append(unit)
                    w.writer.put(payload)
                    self._flush(w)
                if not self.pending:
                    return

    def _flush(self, w: _Worker) -> None:
        try:
            w.writer.flush()
        except OSError:  # the worker is gone; its pidfd will say so
            w.writer = FrameWriter(w.writer.fd)
            return
        key = self._sel.get_map().get(w.writer.fd)
        if w.writer.pending and key is None:
            self._sel.register(w.writer.fd, selectors.EVENT_WRITE, w)
        elif not w.writer.pending and key is not None:
            self._sel.unregister(w.writer.fd)

    def _on_readable(self, w: _Worker) -> None:
        frames, _eof = w.reader.read()
        for frame in frames:
            self._on_result(w, frame)

    def _on_result(self, w: _Worker, frame: bytearray) -> None:
        if not w.ready:
            w.ready = True
            self._barren_deaths = 0
            failure = pickle.loads(frame)
            if failure is not None:
                self._break(
                    BrokenPool("the pool's initializer raised; no task can run"), failure.rebuild()
                )
            return
        unit = w.inflight[0]
        try:
            _uid, offset, values, errors, status = pickle.loads(frame)
        except Exception as exc:
            w.inflight.popleft()
            unit.sink.fail(
                unit, unit.received, SerializationError("result", f"unpickling: {exc!r}")
            )
            return
        if status == UNREADABLE:
            w.inflight.popleft()
            err = errors[0].rebuild()
            unit.sink.fail(unit, unit.received, err)
            return
        if values:
            unit.received = offset + len(values)
            unit.sink.deliver(unit, offset, values, _rebuild(errors))
        if status == DONE:
            w.inflight.popleft()
        elif status == SKIPPED:
            w.inflight.popleft()
            unit.sink.cancel(unit, unit.received)

    def _on_death(self, w: _Worker) -> None:
        self._sel.unregister(w.deathfd)
        # Whatever the worker wrote before it died is still in the pipe.
        while True:
            frames, eof = w.reader.read()
            for frame in frames:
                if w.inflight or not w.ready:
                    self._on_result(w, frame)
            if eof or not frames:
                break
        w.proc.join()
        w.exitcode = w.proc.exitcode
        if self.level >= STOPPING or w.retiring:
            # Sweep up whatever the task started in the worker's group.
            with contextlib.suppress(OSError):
                os.killpg(w.pid, signal.SIGKILL)
        self._forget(w)
        if self.level >= DRAINING or (w.retiring and not w.inflight):
            for unit in w.inflight:
                unit.sink.cancel(unit, unit.received)
            return
        self._recover(w)

    def _recover(self, w: _Worker) -> None:
        """A worker died while it had work: fail what it was running, requeue the rest."""
        if w.inflight and w.ready:
            running = w.inflight.popleft()
            left = len(running.items) - running.received
            if left == 1:
                running.sink.fail(
                    running,
                    running.received,
                    WorkerDied(w.exitcode, w.pid, running.start + running.received),
                )
            elif left > 1:
                # We know the worker died in one of these items, not which. Each is retried alone,
                # so that the one at fault fails by itself and the others keep their results.
                for i in reversed(range(running.received, len(running.items))):
                    single = Unit(
                        next(self._uids),
                        running.kind,
                        running.fn,
                        [running.items[i]],
                        _Offset(running, i),
                        running.start + i,
                    )
                    self.pending.appendleft(single)
        # Units behind the running one never started (nor did any, if the worker never became
        # ready): they go back to the front of the queue.
        for unit in reversed(w.inflight):
            self.pending.appendleft(unit)
        w.inflight.clear()
        if self._broken is not None:
            return
        if not w.ready:
            self._barren_deaths += 1
            if self._barren_deaths >= BARREN_DEATHS:
                self._break(
                    BrokenPool(
                        f"{BARREN_DEATHS} workers in a row died while starting (the last, pid "
                        f"{w.pid}, {_how(w.exitcode)}); check the initializer and that the "
                        "task's module imports in a fresh process"
                    )
                )
                return
        if not self._closing or self.pending:
            self._spawn()

    def _break(self, exc: BrokenPool, cause: BaseException | None = None) -> None:
        """The workers cannot start: fail everything waiting and start no more."""
        if self._broken is not None:
            return
        if cause is not None:
            exc.__cause__ = cause
        self._broken = exc
        for w in self._workers.values():
            for unit in w.inflight:
                unit.sink.fail(unit, unit.received, exc)
            w.inflight.clear()
        self._fail_all_pending(exc)

    def _fail_all_pending(self, exc: BaseException) -> None:
        while self.pending:
            unit = self.pending.popleft()
            unit.sink.fail(unit, unit.received, exc)

    def _forget(self, w: _Worker) -> None:
        for fd in (w.reader.fd, w.writer.fd):
            if fd in self._sel.get_map():
                self._sel.unregister(fd)
            _close(fd)
        if w.has_pidfd:
            _close(w.deathfd)
        del self._workers[w.reader.fd]
        with contextlib.suppress(ValueError):
            w.proc.close()

    def _abort(self) -> None:  # pragma: no cover - only after a bug in the manager
        for w in list(self._workers.values()):
            _signal_group(w.pid, signal.SIGKILL)
            w.proc.join()
            for unit in w.inflight:
                unit.sink.fail(unit, unit.received, self._broken or RuntimeError("aborted"))
            self._forget(w)
        self._fail_all_pending(self._broken or RuntimeError("aborted"))

    def _teardown(self) -> None:
        self._sel.close()
        with self._lock:
            _close(self._wake_r)
            _close(self._wake_w)
            self._wake_w = -1
        _close(self._lifeline_w)
        _close(self._lifeline_r)
        _live.discard(self)
        self.finished.set()

    @property
    def broken(self) -> BaseException | None:
        return self._broken


class _Offset:
    """Sink for a single item split off a unit whose worker died: outcomes go to the original."""

    __slots__ = ("i", "unit")

    def __init__(self, unit: Unit, i: int) -> None:
        self.unit = unit
        self.i = i

    def start(self, unit: Unit) -> bool:
        return True

    def deliver(
        self, unit: Unit, offset: int, values: list[Any], errors: dict[int, BaseException]
    ) -> None:
        self.unit.sink.deliver(self.unit, self.i, values, errors)

    def fail(self, unit: Unit, offset: int, exc: BaseException) -> None:
        self.unit.sink.deliver(self.unit, self.i, [None], {0: exc})

    def cancel(self, unit: Unit, offset: int) -> None:
        self.unit.sink.cancel(self.unit, self.i)


def _rebuild(errors: dict[int, CapturedError] | None) -> dict[int, BaseException]:
    if not errors:
        return {}
    return {i: e.rebuild() for i, e in errors.items()}


def _pickling_error(unit: Unit, exc: Exception) -> SerializationError:
    try:
        dumps(unit.fn)
    except Exception as fn_exc:
        return SerializationError("function", f"{unit.fn!r}: {fn_exc}")
    return SerializationError("arguments", str(exc))


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}"


def default_context() -> BaseContext:
    """forkserver where the platform has it (the default from Python 3.14 on Linux), else spawn.

    fork is available on request, but not the default: forking a process that runs threads
    (the manager thread, and any of the caller's) can copy a lock in its locked state.
    """
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# Backends still running when the interpreter exits are stopped here, so that no worker
# outlives its parent and multiprocessing's own exit handler (which joins children) never
# waits on one. atexit runs handlers last-registered first, so this runs before it.
_live: weakref.WeakSet[LocalBackend] = weakref.WeakSet()


@atexit.register
def _stop_live_backends() -> None:
    for backend in list(_live):
        backend.close(cancel_pending=False)
    for backend in list(_live):
        backend.wait()
