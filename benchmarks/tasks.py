"""The functions the benchmarks run in worker processes.

They live in their own module, imported as ``tasks`` (``benchmarks/`` is on ``sys.path`` for the
runner, its child processes and their workers), so that they pickle by reference under every
start method: fork, forkserver, spawn and loky's own. The Dask workers of measurement 9 are
spawned processes too, which inherit ``sys.path`` and so import ``tasks`` the same way.

Tasks that take part in the Ctrl-C, crash and orphan measurements append one line per event to
the file named by ``$CB_BENCH_LOG``: ``<time.monotonic()> <pid> <event> <index>``. On Linux
``CLOCK_MONOTONIC`` is system-wide, so the runner compares these times with its own.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

LOG_ENV = "CB_BENCH_LOG"
SLOW_TASK_SECONDS = 0.5  # the length of one task in the Ctrl-C and orphan measurements
CRASH_TASK_SECONDS = 0.2  # the length of the tasks that survive in the crash measurement
CRASH_INDEX = 3  # the task that SIGKILLs its own worker


def inc(x: int) -> int:
    """The tiny task: all overhead, no work."""
    return x + 1


def busy(seconds: float) -> None:
    """Spin on the CPU (not sleep) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def busy_1ms(x: int) -> int:
    busy(0.001)
    return x


def busy_10ms(x: int) -> int:
    busy(0.010)
    return x


def numpy_ready(x: int) -> int:
    """A warm-up task for the numpy jobs: the worker imports numpy (as a task module that uses
    numpy does when it is imported) and says which worker it is."""
    import numpy  # noqa: F401

    time.sleep(0.02)  # long enough that every worker takes some of the warm-up
    return os.getpid()


def make_bytes(i: int, size: int) -> bytes:
    """A result of ``size`` bytes, built without a transient copy."""
    return bytes((i % 256,)) * size


def make_array(i: int, size: int) -> Any:
    """A numpy array of ``size`` bytes (uint8), built without a transient copy."""
    import numpy as np

    a = np.empty(size, dtype=np.uint8)
    a.fill(i % 256)
    return a


def length(data: Any) -> int:
    return len(data)


def log_event(event: str, i: int) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = f"{time.monotonic():.6f} {os.getpid()} {event} {i}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one short write with O_APPEND: lines never interleave
    finally:
        os.close(fd)


def slow_logged(i: int) -> int:
    """Half a second of CPU work, with its start and end logged."""
    log_event("start", i)
    busy(SLOW_TASK_SECONDS)
    log_event("end", i)
    return i


def die_or_work(i: int) -> int:
    """Task ``CRASH_INDEX`` SIGKILLs its own worker; the others work for a moment."""
    log_event("start", i)
    if i == CRASH_INDEX:
        log_event("kill", i)
        os.kill(os.getpid(), signal.SIGKILL)
    busy(CRASH_TASK_SECONDS)
    log_event("end", i)
    return i
