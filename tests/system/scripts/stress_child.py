"""One job for the stress test (``test_stress.py``): tasks of 1-40 ms through one API, to be
signalled, or killed, at a random moment.

Events written to the FIFO:

- ``begin <ns>``          just before the pool is made
- ``start <i> <pid> <ns> <read ns>``   a task starts; ``read ns``: the moment just before its
  worker read the gate for it (``_time_gate_reads``)
- ``end <i> <ns>``        the task has computed its result
- ``gate <ns>``           the pool closed its gate: from now on no task may start
- ``done <ns>``           the pool is gone (the with block, or ``cleanbreak.map``, returned)

Then one JSON line on stdout: ``yielded`` ([index, value] pairs the caller got before any
signal), ``completed`` (``Interrupted.completed``, by index), ``signal``. A task's value is
``[index, 7 * index]``. Exit status: 130 after ``Interrupted``, 0 when the job finished. With
``--journal``, the pool records every outcome there.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import importlib.abc
import importlib.util
import itertools
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
from tests.system.scripts.sysprobe_tasks import emit, through_asyncio

# The package imports the pool's modules on the first touch of ``cleanbreak.Pool`` or
# ``cleanbreak.map``: that import is inside the signal window (after the ``begin`` mark), as it
# is in a user's program. So nothing here imports them before; the instrumentation of the
# pool's gate goes in as ``_manager`` is imported (``_watch_gate``).

APIS = ["submit", "map", "imap_unordered", "cbmap", "drain", "asyncio"]
Spec = tuple[int, float, str]


_gate_read_ns = 0  # in a worker: the moment just before it last read the gate


class _TimedGateReads:
    """The worker's ``itertools``, with ``compress`` timing each read of the gate.

    A worker reads the gate's byte for an item just before it runs the item, in C; the task's
    own first instruction comes a little later, and on a busy machine the worker may be
    preempted in between. A task that reads the gate while it is open, and is preempted
    until after the pool has closed it, did not start late: the moment before the read
    says so, where the task's own start time does not.
    """

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


def _time_gate_reads() -> None:
    """The pool's initializer: test instrumentation, in each worker."""
    import cleanbreak._worker

    vars(cleanbreak._worker)["itertools"] = _TimedGateReads()


def stress_task(spec: Spec) -> tuple[int, int]:
    """Half the tasks sleep, half spin on the CPU."""
    index, seconds, events = spec
    emit(events, "start", index, os.getpid(), time.monotonic_ns(), _gate_read_ns)
    if index % 2:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
    else:
        time.sleep(seconds)
    emit(events, "end", index, time.monotonic_ns())
    return index, 7 * index


def _watch_gate(events: str) -> None:
    """Test instrumentation: report when the pool closes its gate. Put in ``_manager`` as
    that module is imported (by the first touch of ``cleanbreak.Pool`` or ``cleanbreak.map``),
    without importing it earlier."""

    def instrument(manager: Any) -> None:
        real = manager.close_gate

        def close_gate(gate: Any) -> None:
            real(gate)
            emit(events, "gate", time.monotonic_ns())

        manager.close_gate = close_gate

    sys.meta_path.insert(0, _AfterImport("cleanbreak._manager", instrument))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then(module)`` once the module ``name`` has been imported, by whoever."""

    def __init__(self, name: str, then: Callable[[Any], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        assert spec is not None and spec.loader is not None
        load = spec.loader.exec_module
        then = self.then

        def exec_module(module: Any) -> None:
            load(module)
            then(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _lazy(specs: list[Spec]) -> Iterator[Spec]:
    yield from specs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api", required=True, choices=APIS)
    parser.add_argument("--method", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--events", required=True)
    parser.add_argument("--release", required=True)
    parser.add_argument("--journal", default=None, help="record the outcomes in this journal")
    args = parser.parse_args()
    # A hung child's stacks, for the test's report (it sends SIGUSR1 to a child that hangs).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    rng = random.Random(args.seed)
    specs = [(i, rng.uniform(0.001, 0.040), args.events) for i in range(args.tasks)]
    _watch_gate(args.events)
    mode = "drain" if args.api == "drain" else "terminate"
    pool_args: dict[str, Any] = {
        "workers": 2,
        "on_interrupt": mode,
        "mp_context": args.method,
        "initializer": _time_gate_reads,
        # A relative journal path is in the run's own folder, where the events FIFO is.
        "journal": args.journal and os.path.join(os.path.dirname(args.events), args.journal),
    }
    yielded: list[Any] = []
    report: dict[str, Any] = {"yielded": yielded, "completed": {}, "signal": None}
    status = 0

    def begin() -> None:
        """Just before the pool is made (under asyncio, once ``asyncio.run`` has started)."""
        emit(args.events, "begin", time.monotonic_ns())

    if args.api != "asyncio":
        begin()

    def done() -> None:
        """The job's end, stamped while the pool is still open: once it is closed, a SIGTERM
        is the program's own (it ends the process, with every result already given)."""
        emit(args.events, "done", time.monotonic_ns())

    try:
        if args.api == "cbmap":
            yielded.extend(cleanbreak.map(stress_task, specs, **pool_args))
        elif args.api == "asyncio":
            asyncio.run(through_asyncio(pool_args, stress_task, specs, yielded, done, begin))
        else:
            with cleanbreak.Pool(**pool_args) as pool:
                if args.api == "submit":
                    futures = [pool.submit(stress_task, s) for s in specs]
                    for fut in futures:
                        yielded.append(fut.result())
                elif args.api == "imap_unordered":
                    for result in pool.imap_unordered(stress_task, _lazy(specs)):
                        yielded.append(result)
                else:  # map, drain
                    for result in pool.map(stress_task, specs):
                        yielded.append(result)
                done()
    except cleanbreak.Interrupted as exc:
        report["signal"] = exc.signal.name
        report["completed"] = {str(k): v for k, v in exc.completed.items()}
        report["caught_ns"] = time.monotonic_ns()
        status = 130
    done()  # the first "done" is the one the test reads
    print(json.dumps(report), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
