"""What runs inside a worker process.

A worker reads units from its task pipe, runs each item, and writes the results back on its
result pipe, in order. It decides nothing about signals: the parent does.

- SIGINT is ignored and the worker leads a process group of its own, so a terminal's Ctrl-C
  reaches the parent alone. The parent stops a worker by signalling that group, which takes
  along any process the task started.
- Between items the worker reads the pool's shared *stop flag*. Once the parent has set it
  (on the first Ctrl-C, before anything else), no further item starts: the worker reports the
  items it finished and the point where it stopped. This is what makes "no task starts after
  the signal" hold for tasks already sitting in the pipe.
- A watchdog thread blocks on the read end of the *lifeline* pipe, whose write end only the
  parent holds. When the parent dies, even by SIGKILL, the kernel closes that end, the read
  returns, and the watchdog kills the worker's process group at once. This needs no polling and
  works with every start method. Linux's parent-death signal (PR_SET_PDEATHSIG) was rejected:
  it fires when the *thread* that forked the worker exits, and under forkserver the worker's
  parent is the fork server, not the pool.
- Once the worker has moved a payload of 32 MiB or more, it keeps the memory its tasks free
  for the next task's large blocks, and gives back what piles up after each unit (``_heap``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol

from ._errors import SerializationError
from ._heap import LARGE, Heap
from ._shm import Packer, Segments, largest, load
from ._wire import (
    CALL_ONE,
    CALL_STAR,
    DONE,
    PARTIAL,
    SKIPPED,
    CapturedError,
    discard,
    dumps,
    recv_frame,
    send_frame,
    split,
)

# A unit that runs long reports what it has every FLUSH_EVERY seconds, so that a crash or an
# interrupt in the middle of a large chunk loses at most that much work.
FLUSH_EVERY = 0.05
# Items run in batches between two reads of the stop flag and the clock. A batch grows while it
# takes under 1 ms and shrinks when it takes over 4 ms, so tiny tasks pay for the checks once
# per batch and a stop request is seen within a few milliseconds.
_FAST = 0.001
_SLOW = 0.004
_MAX_BATCH = 4096

UNREADABLE = 3  # status: the unit's function or items could not be unpickled here

# Where this worker puts large payloads; set by worker_main.
_segments = Segments(None)
_sent = 0  # the largest payload this worker has sent


class _Flag(Protocol):
    value: int


def worker_main(
    tasks: Connection,
    results: Connection,
    lifeline: Connection,
    stop: _Flag,
    initializer: Callable[..., object] | None,
    initargs: Sequence[Any],
    shm_prefix: str | None = None,
    reuse_memory: bool = True,
) -> None:
    global _segments
    _segments = Segments(shm_prefix)
    # Set to reuse freed memory once this worker moves a large payload (see _heap).
    heap: Heap | None = None
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Started from the manager thread, which blocks both (see LocalBackend._run).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    with contextlib.suppress(OSError):  # pragma: no cover - already a group leader
        os.setpgid(0, 0)
    task_fd = _take_fd(tasks)
    result_fd = _take_fd(results)
    _start_watchdog(_take_fd(lifeline))
    for fd in (task_fd, result_fd):
        os.set_inheritable(fd, False)
    # The first frame says the worker is ready: None, or the initializer's error.
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:
            _send_ready(result_fd, CapturedError.capture(exc))
            raise SystemExit(1) from None
    _send_ready(result_fd, None)
    while True:
        if heap is not None:
            wait = heap.due()
            if wait is not None and not select.select([task_fd], [], [], wait)[0]:
                heap.tidy(now=True)  # idle until the count it put off was due
        frame = recv_frame(task_fd)
        if frame is None:
            return
        parts, layouts = split(frame, 3)
        received = max(map(largest, layouts.values()), default=0)
        meta = pickle.loads(parts[0])
        if meta is None:
            return
        uid, kind, each = meta
        # The function and the items are pickled apart, so that a failure says which it was.
        part = "function"
        try:
            fn = load(parts[1], layouts.pop(1, None))
            part = "arguments"
            items = load(parts[2], layouts.pop(2, None))
        except BaseException as exc:
            discard(layouts)
            reason = f"it could not be unpickled in the worker: {type(exc).__name__}: {exc}"
            error = CapturedError(SerializationError(part, reason), "")
            _send(result_fd, (uid, 0, [], {0: error}, UNREADABLE, 0.0))
            continue
        finally:
            del parts, frame
        _run_unit(result_fd, stop, uid, kind, fn, items, 0.0 if each else FLUSH_EVERY)
        del fn, items  # before the next unit's arguments come in, and before tidy() counts
        if heap is None and reuse_memory and max(received, _sent) >= LARGE:
            heap = Heap.reuse()
            reuse_memory = heap is not None
        if heap is not None:
            heap.tidy()


def _take_fd(conn: Connection) -> int:
    fd = os.dup(conn.fileno())
    conn.close()
    return fd


def _start_watchdog(fd: int) -> None:
    def watch() -> None:
        try:
            os.read(fd, 1)
        finally:
            # Nobody will read what is in the pool's segments now (see _shm).
            _segments.purge_for_good()
            if os.getpgid(0) == os.getpid():
                os.killpg(0, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="cleanbreak-watchdog", daemon=True).start()


def _results(kind: int, fn: Callable[..., Any], items: Iterator[Any]) -> Iterator[Any]:
    """The results of ``items``, computed lazily by C-level iterators where the kind allows."""
    if kind == CALL_ONE:
        return map(fn, items)
    if kind == CALL_STAR:
        return itertools.starmap(fn, items)
    return (fn(*args, **kwargs) for args, kwargs in items)


def _run_unit(
    out: int,
    stop: _Flag,
    uid: int,
    kind: int,
    fn: Callable[..., Any],
    items: Sequence[Any],
    flush_every: float,
) -> None:
    """Run the items, reporting every ``flush_every`` seconds (0: after every item, which the
    parent asks for when the task has a timeout, so that it knows when each item started).

    Each batch runs as ``values.extend(map(fn, batch))``: no Python bytecode per item. When an
    item raises, ``extend`` keeps the values before it, the item gets its error, and the batch
    goes on from the next item.
    """
    n = len(items)
    source = iter(items)
    offset = 0  # index of values[0] in the unit
    values: list[Any] = []
    errors: dict[int, CapturedError] | None = None
    batch = 1
    since = time.monotonic()  # when the items in `values` began
    flush_at = since + flush_every
    while (pos := offset + len(values)) < n:
        if stop.value:
            _send(out, (uid, offset, values, errors, SKIPPED, time.monotonic() - since))
            return
        end = min(n, pos + batch)
        started = time.monotonic()
        while (pos := offset + len(values)) < end:
            try:
                values.extend(_results(kind, fn, itertools.islice(source, end - pos)))
            except BaseException as exc:
                if errors is None:
                    errors = {}
                errors[len(values)] = CapturedError.capture(exc)
                values.append(None)
        now = time.monotonic()
        took = now - started
        if took < _FAST and batch < _MAX_BATCH and flush_every:
            batch *= 2
        elif took > _SLOW and batch > 1:
            batch //= 2
        if end < n and now >= flush_at:
            _send(out, (uid, offset, values, errors, PARTIAL, now - since))
            since = now
            offset = end
            values = []
            errors = None
            flush_at = now + flush_every
    _send(out, (uid, offset, values, errors, DONE, time.monotonic() - since))


def _send_ready(out: int, error: CapturedError | None) -> None:
    try:
        payload = dumps(error)
    except Exception:  # pragma: no cover - capture() already made it picklable
        payload = dumps(CapturedError(None, error.tb if error else ""))
    send_frame(out, payload)


def _send(out: int, message: tuple[Any, ...]) -> None:
    uid, offset, values, errors, status, seconds = message
    try:
        payload = Packer(_segments).pack((values, errors))
    except Exception:
        payload = Packer(_segments).pack(_picklable(values, errors))
    send_frame(out, dumps((uid, offset, len(values), status, seconds)), payload)
    global _sent
    _sent = max(_sent, largest(payload.layout))


def _picklable(
    values: list[Any], errors: dict[int, CapturedError] | None
) -> tuple[list[Any], dict[int, CapturedError] | None]:
    """Find the values that would not pickle and replace each with a SerializationError."""
    errors = dict(errors or {})
    clean: list[Any] = []
    for i, value in enumerate(values):
        try:
            dumps(value)
        except Exception as exc:
            reason = f"{type(value).__name__} object: {exc}"
            errors[i] = CapturedError(SerializationError("result", reason), "")
            clean.append(None)
        else:
            clean.append(value)
    return clean, errors or None
