"""Instrumentation for the notebook stress test (``test_notebook_stress.py``), imported by its
cells in a real IPython kernel and, by reference, in the pool's workers.

The task function itself is defined in each run's cell (so it goes to the workers by value, as a
notebook user's does); it calls ``emit`` and ``gate_read_ns`` from here.

Events go to an append-only file, one per run, one line per ``os.write`` of an ``O_APPEND``
descriptor: each line lands whole at the end of the file, whichever process writes it, and
nobody has to read while the cell runs (with a FIFO the test would have to pump the FIFO and
the kernel's messages at once, and a full FIFO would fail a task's write). The moments are the
stamps in the lines (CLOCK_MONOTONIC, one clock for every process), so reading the file once
the cell is over loses nothing. Lines:

- ``begin <ns>``                     just before the job's pool call (or its pool is made)
- ``start <i> <pid> <ns> <read ns>`` a task starts; ``read ns``: just before its worker read
  the gate for it (``time_gate_reads``)
- ``end <i> <ns>``                   the task has computed its result
- ``gate <ns> <tag>``                a pool closed its gate; ``tag`` names the pool (``setup``)
- ``done <ns>``                      the job's pool call returned (the job ended)

A task's value is ``[run, index, 7 * index]``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

import cleanbreak._manager
import cleanbreak._pool
import cleanbreak._signals

MARKER = "NBSTRESS-BEGIN"  # printed by ``begin``: the test waits for it, then picks its moment
REPORT = "NBSTRESS-REPORT"  # the line ``report`` prints, followed by JSON

Spec = tuple[int, int, float, str]

# In the kernel: the run's events file, and the tag given to the gates that pools make now.
_events = ""
_tag = ""
_cell_ended_ns = 0  # post_run_cell: when the last cell ended
_shown_ns = 0  # when IPython last showed an uncaught Interrupted
_raised_ns = 0  # when a pool call first made the Interrupted it raises, in this run

# In a worker: the moment just before it last read the gate.
_gate_read_ns = 0


def emit(path: str, *fields: object) -> None:
    """Append one event line to the file at ``path``."""
    line = " ".join(str(f) for f in fields) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


# ── in the workers ──────────────────────────────────────────────────────────────────────────


class _TimedGateReads:
    """The worker's ``itertools``, with ``compress`` timing each read of the gate (as in
    ``stress_child.py``: the moment before the read, not the task's first instruction, says
    whether a task started after the gate closed)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(itertools, name)

    @staticmethod
    def compress(data: Any, selectors: Any) -> Iterator[Any]:
        return itertools.compress(data, _timed(iter(selectors)))


def _timed(selectors: Iterator[Any]) -> Iterator[Any]:
    global _gate_read_ns
    while True:
        _gate_read_ns = time.monotonic_ns()
        try:
            selector = next(selectors)
        except StopIteration:
            return
        yield selector


def time_gate_reads() -> None:
    """The pool's initializer: test instrumentation, in each worker."""
    import cleanbreak._worker

    vars(cleanbreak._worker)["itertools"] = _TimedGateReads()


def gate_read_ns() -> int:
    """In a task: the moment just before its worker read the gate for it."""
    return _gate_read_ns


# ── in the kernel ───────────────────────────────────────────────────────────────────────────


def setup() -> None:
    """Once per kernel: tag and report each pool's gate, and note when each cell ends."""
    manager: Any = cleanbreak._manager
    real_new, real_close = manager.new_gate, manager.close_gate

    def new_gate() -> Any:
        gate = real_new()
        gate.nb_stress_tag = _tag  # (a block of multiprocessing's heap: it takes attributes)
        return gate

    def close_gate(gate: Any) -> None:
        real_close(gate)
        if _events:
            emit(_events, "gate", time.monotonic_ns(), getattr(gate, "nb_stress_tag", "?"))

    manager.new_gate = new_gate
    manager.close_gate = close_gate

    # When IPython shows an uncaught Interrupted: it asks it for its one line then.
    interrupted: Any = cleanbreak.Interrupted
    render = interrupted._render_traceback_

    def shown(self: Any) -> list[str]:
        global _shown_ns
        _shown_ns = time.monotonic_ns()
        lines: list[str] = render(self)
        return lines

    interrupted._render_traceback_ = shown

    # When a pool call made the Interrupted it raises (with the results it gathered).
    pool: Any = cleanbreak._pool.Pool
    make = pool._interrupted

    def made(self: Any, *args: Any, **kwargs: Any) -> Any:
        global _raised_ns
        exc = make(self, *args, **kwargs)
        _raised_ns = _raised_ns or time.monotonic_ns()
        return exc

    pool._interrupted = made

    def ended(result: object = None) -> None:
        global _cell_ended_ns
        _cell_ended_ns = time.monotonic_ns()

    # After cleanbreak's own (a cell ends once its pool has stopped): registered first.
    follow: Any = vars(cleanbreak._signals)["_follow_ipython_cells"]
    follow()
    from IPython import get_ipython

    shell: Any = get_ipython()
    shell.events.register("post_run_cell", ended)


def tag(name: str) -> None:
    """The gates of the pools made (or started again) from now on belong to ``name``."""
    global _tag
    _tag = name


def specs(run: int, seed: int, tasks: int, events: str) -> list[Spec]:
    """The job: ``tasks`` tasks of 1-40 ms."""
    rng = random.Random(seed)
    return [(run, i, rng.uniform(0.001, 0.040), events) for i in range(tasks)]


def lazy(items: list[Spec]) -> Iterator[Spec]:
    """The job as a generator (for ``imap_unordered``)."""
    yield from items


def new_run(events: str, pool_tag: str) -> None:
    """As a run's cell starts: no error of an earlier cell is taken for this one's, and the
    gates closed from now on are reported to this run's events."""
    global _events, _shown_ns, _raised_ns
    _shown_ns = _raised_ns = 0
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    _events = events
    tag(pool_tag)


def begin() -> None:
    """The job is about to start: report it, and tell the test (the handshake)."""
    emit(_events, "begin", time.monotonic_ns())
    print(MARKER, flush=True)


def done() -> None:
    emit(_events, "done", time.monotonic_ns())


def _value(v: Any) -> Any:
    """A result as JSON: a task's value is a tuple of ints."""
    return list(v) if isinstance(v, tuple) else repr(v)


def report(state: dict[str, Any], futures: Any = None) -> None:
    """Print what the run's cell ended with, as one JSON line: what it yielded, the
    ``Interrupted`` it caught (or the one it left uncaught, from ``sys.last_value``, or
    ``sys.last_exc`` on Python 3.12+), and for ``submit`` the futures' own results."""
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    exc = state.get("caught") or last
    out: dict[str, Any] = {
        "yielded": [_value(v) for v in state["yielded"]],
        "caught_ns": state.get("caught_ns"),
        "cell_ended_ns": _cell_ended_ns,
        "shown_ns": _shown_ns if last is not None else None,
        "raised_ns": _raised_ns,
        "uncaught": None if last is None else type(last).__name__,
        "exception": None if exc is None else type(exc).__name__,
        "completed": None,
        "futures": None,
    }
    if isinstance(exc, cleanbreak.Interrupted):
        out["completed"] = {str(k): _value(v) for k, v in exc.completed.items()}
        out["signal"] = exc.signal.name
    if futures is not None:
        out["futures"] = [
            _value(f.result())
            for f in futures
            if f.done() and not f.cancelled() and f.exception() is None
        ]
    print(REPORT, json.dumps(out), flush=True)
