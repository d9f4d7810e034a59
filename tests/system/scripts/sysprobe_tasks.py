"""Task functions for cleanbreak's system tests. They run inside real worker processes.

A task reports what it does on the *events* FIFO, one line per ``os.write`` (shorter than
``PIPE_BUF``, so lines from different processes never interleave), stamped with
``time.monotonic_ns()``: CLOCK_MONOTONIC is one clock for every process on Linux, so the test
can compare a task's stamp with the moment it sent a signal.

A spec is ``(kind, index, events_fifo, release_fifo)``. Kinds:

- ``q`` returns at once.
- ``b`` blocks for ever (SIGTERM kills it).
- ``g`` starts a grandchild (``sleep 1000``), reports its pid, then blocks for ever.
- ``d`` blocks until the test releases it (one byte on the release FIFO), then returns.
- ``s`` survives SIGTERM: reports ``term`` on each one and keeps blocking. Only SIGKILL ends it.
- ``t`` returns normally when SIGTERM arrives (a task that catches it and finishes).
- ``k`` returns at once, and its result sends SIGINT to the pool's parent as it arrives there:
  a Ctrl-C that comes at the very moment a result does (see ``received_with_sigint``).

Every value a task returns is wrapped in a ``Receipt``: unpickling it in the pool's parent writes
``recv <index>``. That line means the parent holds the result, so it is an exact handshake for
"this result finished before the signal".
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from types import FrameType
from typing import Any

Spec = tuple[str, int, str, str]


def emit(path: str, *fields: object) -> None:
    """Write one event line to the FIFO at ``path``."""
    line = " ".join(str(f) for f in fields) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def received(events: str, index: int, value: int) -> int:
    """Called by pickle in the parent when a result arrives there."""
    emit(events, "recv", index, time.monotonic_ns())
    return value


def received_with_sigint(events: str, index: int, value: int) -> int:
    """``received``, and then a Ctrl-C to this process (the pool's parent).

    The kernel hands a process-directed signal to any thread that does not block it. This
    picks the thread that is unpickling the result (the pool's manager thread), so that the
    main thread, blocked waiting for results, does not see the signal until this very result
    wakes it. Should the pool block SIGINT in that thread, the signal goes to the process and
    so, on Linux, to the main thread.
    """
    emit(events, "recv", index, time.monotonic_ns())
    if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        os.kill(os.getpid(), signal.SIGINT)
    else:
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    return value


class Receipt:
    """A result that announces its arrival in the parent (see the module docstring)."""

    def __init__(self, events: str, index: int, value: int, interrupt: bool = False) -> None:
        self.events = events
        self.index = index
        self.value = value
        self.interrupt = interrupt

    def __reduce__(self) -> tuple[Any, ...]:
        arrive = received_with_sigint if self.interrupt else received
        return (arrive, (self.events, self.index, self.value))


def wait_release(release: str) -> None:
    """Wait for one byte on the release FIFO (see ``Child.release``)."""
    fd = os.open(release, os.O_RDONLY)
    try:
        os.read(fd, 1)
    finally:
        os.close(fd)


def hold_orphans(events: str) -> None:
    """A pool initializer (test instrumentation): when this worker finds that its parent is
    gone, it reports which thread found it, and then waits for ever instead of killing its
    process group. So the watchdog thread cannot act for the main thread: what the test sees
    is what the main thread does by itself between items."""
    import cleanbreak._worker

    def orphaned() -> None:
        thread = threading.current_thread()
        emit(
            events,
            "orphaned",
            os.getpid(),
            "main" if thread is threading.main_thread() else "other",
        )
        threading.Event().wait()

    cleanbreak._worker._orphaned = orphaned  # type: ignore[assignment]

    # Nor may a failed write to the dead parent tell it: as if the parent's end of the result
    # pipe were still open (a parent that is still dying, say).
    real_send = cleanbreak._worker.send_frame  # type: ignore[attr-defined]

    def send_frame(fd: int, *parts: Any) -> None:
        with contextlib.suppress(BrokenPipeError):
            real_send(fd, *parts)

    cleanbreak._worker.send_frame = send_frame  # type: ignore[attr-defined]


class _Stopped(Exception):
    pass


def _block() -> None:
    threading.Event().wait()


def _block_for_signals() -> None:
    """Block, but run this process's Python signal handlers as soon as a signal arrives.

    A process-directed signal may be delivered to any thread, for instance the worker's
    watchdog thread, and then a main thread blocked in a lock or ``pause()`` is never woken to
    run the handler. The wakeup fd is written by whichever thread takes the signal, and wakes
    the ``select`` below.
    """
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    while True:
        select.select([r], [], [])
        os.read(r, 512)


def task(spec: Spec) -> Receipt:
    kind, index, events, release = spec
    if kind == "t":
        return _catch_sigterm(index, events)
    pid = os.getpid()
    if kind == "s":

        def on_term(signum: int, frame: FrameType | None) -> None:
            emit(events, "term", index, pid, time.monotonic_ns())

        signal.signal(signal.SIGTERM, on_term)
    emit(events, "start", index, pid, time.monotonic_ns())
    if kind == "q":
        return Receipt(events, index, index * 10)
    if kind == "k":
        return Receipt(events, index, index * 10, interrupt=True)
    if kind == "b":
        _block()
    elif kind == "s":
        _block_for_signals()
    elif kind == "g":
        child = subprocess.Popen(["sleep", "1000"])
        emit(events, "grandchild", index, child.pid)
        _block()
    elif kind == "d":
        wait_release(release)
        return Receipt(events, index, index * 10)
    raise ValueError(f"unknown task kind {kind!r}")


def _catch_sigterm(index: int, events: str) -> Receipt:
    pid = os.getpid()

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stopped

    signal.signal(signal.SIGTERM, stop)
    try:
        # The signal may come as soon as the start line is out, even before it is.
        emit(events, "start", index, pid, time.monotonic_ns())
        _block_for_signals()
    except _Stopped:
        pass
    emit(events, "term", index, pid, time.monotonic_ns())
    return Receipt(events, index, index * 10)


async def through_asyncio(
    pool_args: dict[str, Any],
    fn: Any,
    specs: list[Any],
    yielded: list[Any],
    on_done: Any = None,
    on_begin: Any = None,
) -> None:
    """The stress children's asyncio API: ``fn`` over ``specs`` through ``run_in_executor``.
    The user's view of the results is the asyncio futures: they keep theirs. ``on_done`` is
    called once every result is in, while the pool is still open (after it, and during
    ``asyncio.run``'s teardown, a SIGTERM is the program's own: it ends the process).
    ``on_begin`` is called just before the pool is made (the first touch of
    ``cleanbreak.Pool``): before it, inside ``asyncio.run``'s own start, a Ctrl-C is the
    program's, and asyncio raises ``KeyboardInterrupt`` for it."""
    import asyncio

    import cleanbreak

    loop = asyncio.get_running_loop()
    if on_begin is not None:
        on_begin()
    with cleanbreak.Pool(**pool_args) as pool:
        futures = [loop.run_in_executor(pool, fn, s) for s in specs]
        try:
            await asyncio.gather(*futures)
            if on_done is not None:
                on_done()
        finally:
            yielded.extend(f.result() for f in futures if f.done() and not f.cancelled())
