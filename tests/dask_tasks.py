"""Task functions for the Dask tests: importable by the cluster's worker processes."""

from __future__ import annotations

import mmap
import os
import signal
import time
from typing import Any


def spin_marked(spec: tuple[int, float, str]) -> tuple[int, int]:
    """Leave the ``start`` mark (see ``mark``), spin on the CPU (pure Python, so a stop can
    break in), then leave the ``end`` mark; returns ``(i, 7 * i)``."""
    index, seconds, folder = spec
    mark(folder, "start", index)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    mark(folder, "end", index)
    return index, 7 * index


def stuck_marked(spec: tuple[int, int, str]) -> tuple[int, int]:
    """Leave the ``start`` mark; item ``stuck`` then sleeps in C for a minute (a stop cannot
    break in: only the end of its worker process stops it); the others leave the ``end`` mark
    at once and return ``(i, 7 * i)``."""
    index, stuck, folder = spec
    mark(folder, "start", index)
    if index == stuck:
        time.sleep(60)
    mark(folder, "end", index)
    return index, 7 * index


def gil_marked(spec: tuple[int, int, str]) -> tuple[int, int]:
    """As ``stuck_marked``, but item ``stuck`` runs in C with the GIL held (a sum over a range:
    no bytecode runs, and no other thread of its process, the worker's event loop included,
    until it ends, in hours)."""
    index, stuck, folder = spec
    mark(folder, "start", index)
    if index == stuck:
        sum(range(10**13))
    mark(folder, "end", index)
    return index, 7 * index


KINDS = ("begin", "start", "end")
SLOTS = 4096  # items per kind of mark
_SIZE = len(KINDS) * SLOTS * 8
_MARKS = "marks.bin"
_maps: dict[str, mmap.mmap] = {}


def _slots(folder: str) -> mmap.mmap:
    """The folder's marks: an 8-byte slot per kind and item, shared by the processes."""
    mapped = _maps.get(folder)
    if mapped is None:
        fd = os.open(os.path.join(folder, _MARKS), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)  # the same size from each process: never shrinks
            mapped = _maps[folder] = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
    return mapped


def mark(folder: str, what: str, index: int) -> None:
    """Leave the ``what`` mark of item ``index``: the monotonic clock, now. Stored in shared
    memory, with the GIL held from the clock to the store, so that the store cannot wait
    behind another thread: an item whose ``end`` mark is old has returned, or was about to
    (a Dask worker process has other threads; with a file's ``open``, which lets the GIL go,
    the mark could be made milliseconds before a stop that still met the item running)."""
    memoryview(_slots(folder)).cast("Q")[KINDS.index(what) * SLOTS + index] = time.monotonic_ns()


def marks(folder: str, what: str) -> dict[int, int]:
    """index -> monotonic ns of each ``what`` mark in the folder."""
    try:
        with open(os.path.join(folder, _MARKS), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    base = KINDS.index(what) * SLOTS
    kind = memoryview(data).cast("Q")[base : base + SLOTS]
    return {index: ns for index, ns in enumerate(kind) if ns}


def sleep_then(x: int, seconds: float) -> int:
    time.sleep(seconds)  # in C: a stop breaks in only once it returns
    return x


def die_on(x: int, bad: int) -> int:
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def spin_once(x: int, folder: str) -> int:
    """The first run of each ``x`` spins on the CPU for a minute (a timeout stops it); the
    next one returns ``x * x``."""
    mark = os.path.join(folder, f"spun-{x}")
    if not os.path.exists(mark):
        with open(mark, "w"):
            pass
        end = time.monotonic() + 60.0
        while time.monotonic() < end:
            pass
    return x * x


def fail_once(x: int, folder: str) -> int:
    """The first run of each ``x`` raises OSError; the next one returns ``x * x``."""
    mark = os.path.join(folder, f"failed-{x}")
    if not os.path.exists(mark):
        with open(mark, "w"):
            pass
        raise OSError(f"flaky {x}")
    return x * x


def stress_marked(spec: tuple[int, float, str]) -> tuple[int, int]:
    """``spin_marked``, but the even items sleep instead of spinning (a stop breaks into a
    sleep only once it returns)."""
    index, seconds, folder = spec
    if index % 2:
        return spin_marked(spec)
    mark(folder, "start", index)
    time.sleep(seconds)
    mark(folder, "end", index)
    return index, 7 * index


def cluster_idle(client: Any, guard: float) -> bool:
    """Test side: nothing processing on any worker, and no thread of a worker in one of
    cleanbreak's items (a cancelled task's thread may run on where the scheduler shows
    nothing); waits up to ``guard`` seconds for it."""
    from cleanbreak import _dask

    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        busy = any(client.processing().values())
        if not busy and not any(client.run(_dask.running_here).values()):
            return True
        time.sleep(0.02)
    return False
