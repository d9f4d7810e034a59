"""Task functions for the Dask tests: importable by the cluster's worker processes."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def spin_marked(spec: tuple[int, float, str]) -> tuple[int, int]:
    """Leave ``start-<i>-<ns>`` in the folder, spin on the CPU (pure Python, so a stop can
    break in), then leave ``end-<i>-<ns>``; returns ``(i, 7 * i)``."""
    index, seconds, folder = spec
    _mark(folder, "start", index)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    _mark(folder, "end", index)
    return index, 7 * index


def _mark(folder: str, what: str, index: int) -> None:
    with open(os.path.join(folder, f"{what}-{index}-{time.monotonic_ns()}"), "w"):
        pass


def marks(folder: str, what: str) -> dict[int, int]:
    """index -> monotonic ns of each ``what`` mark in the folder."""
    out: dict[int, int] = {}
    for name in os.listdir(folder):
        kind, index, ns = name.split("-")
        if kind == what:
            out[int(index)] = int(ns)
    return out


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
    _mark(folder, "start", index)
    time.sleep(seconds)
    _mark(folder, "end", index)
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
