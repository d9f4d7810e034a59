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

Every value a task returns is wrapped in a ``Receipt``: unpickling it in the pool's parent writes
``recv <index>``. That line means the parent holds the result, so it is an exact handshake for
"this result finished before the signal".
"""

from __future__ import annotations

import os
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


class Receipt:
    """A result that announces its arrival in the parent (see the module docstring)."""

    def __init__(self, events: str, index: int, value: int) -> None:
        self.events = events
        self.index = index
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (received, (self.events, self.index, self.value))


class _Stopped(Exception):
    pass


def _block() -> None:
    threading.Event().wait()


def task(spec: Spec) -> Receipt:
    kind, index, events, release = spec
    value = index * 10
    pid = os.getpid()
    if kind == "s":

        def on_term(signum: int, frame: FrameType | None) -> None:
            emit(events, "term", index, pid, time.monotonic_ns())

        signal.signal(signal.SIGTERM, on_term)
    elif kind == "t":

        def stop(signum: int, frame: FrameType | None) -> None:
            raise _Stopped

        signal.signal(signal.SIGTERM, stop)
    emit(events, "start", index, pid, time.monotonic_ns())
    if kind == "q":
        return Receipt(events, index, value)
    if kind == "b" or kind == "s":
        _block()
    elif kind == "g":
        child = subprocess.Popen(["sleep", "1000"])
        emit(events, "grandchild", index, child.pid)
        _block()
    elif kind == "d":
        fd = os.open(release, os.O_RDONLY)
        try:
            os.read(fd, 1)
        finally:
            os.close(fd)
        return Receipt(events, index, value)
    elif kind == "t":
        try:
            _block()
        except _Stopped:
            emit(events, "term", index, pid, time.monotonic_ns())
            return Receipt(events, index, value)
    raise ValueError(f"unknown task kind {kind!r}")
