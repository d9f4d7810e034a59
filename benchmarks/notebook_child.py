"""The child of measurement 13a and 13b: one process, by value against by reference.

Run two ways, so that the main module is what it is for a script or for a notebook:

- as a script, ``notebook_child.py run PARAMS OUT``: a main module that a worker can import.
  By reference: ``notebook_tasks.inc``; by value: the same function nested in a function
  (``notebook_tasks.nested()``), as a closure or a lambda in a script;
- as ``python -c CODE PARAMS OUT`` (see ``c_code``): ``CODE`` defines the same functions in its
  own ``__main__`` and calls ``main`` with them. A ``python -c`` process has no main module that
  a worker could import, as in a notebook, the REPL or a script read from stdin, so
  cleanbreak sends every function of ``__main__`` by value, and pickles everything it sends
  (the arguments too) with cloudpickle's pickler. By reference: ``notebook_tasks.inc`` again.

Modes (``params["mode"]``):

- ``oneshot``: one ``cleanbreak.map(fn, items, workers=N)``, the first thing this process does
  with a pool, timed whole (workers started and stopped inside the call);
- ``warm``: one ``cleanbreak.Pool(N)``, an untimed ``map`` with each function, then ``passes``
  timed ``list(pool.map(fn, items))`` with each, by reference and by value in turn (the order
  alternating), so that both run on the same pool and the same machine state. Each is timed
  in wall time and in CPU time: this process's and the pool's processes' together, from
  their CPU clocks (every thread, to the nanosecond), which other work on the machine
  inflates far less than the wall time.

Each ``map`` is over a list built beforehand, and every result is checked.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import notebook_tasks
from reporter import Reporter

Fn = Callable[[Any], Any]


def c_code(bench_dir: Path) -> str:
    """The program of the ``python -c`` child: the functions defined in its ``__main__``."""
    return (
        "import sys\n"
        f"sys.path.insert(0, {str(bench_dir)!r})\n"
        + notebook_tasks.source()
        + "\n\nimport notebook_child\n\n"
        "notebook_child.main({'inc': inc, 'busy_1ms': busy_1ms})\n"
    )


def _check(job: str, items: list[int], out: list[Any]) -> None:
    expected = sum(items) + (len(items) if job == "inc" else 0)
    if len(out) != len(items) or sum(out) != expected:
        raise AssertionError(f"{job}: wrong results")


def oneshot(fn: Fn, params: dict[str, Any], report: Reporter) -> None:
    from cleanbreak import map as cb_map  # the pool's modules, before the clock, as the peers'

    items = list(range(params["n"]))
    before = "cloudpickle" in sys.modules
    start = time.perf_counter()
    out = cb_map(fn, items, workers=params["workers"])
    seconds = time.perf_counter() - start
    _check(params["job"], items, out)
    result: dict[str, Any] = {
        "seconds": seconds,
        "cloudpickle_before": before,
        "cloudpickle_after": "cloudpickle" in sys.modules,
    }
    if "cloudpickle" not in sys.modules:
        # What importing it costs a process that has not (by value's first step in a parent).
        start = time.perf_counter()
        import cloudpickle  # noqa: F401

        result["import_cloudpickle"] = time.perf_counter() - start
    report(result)


def _cpu_clock(pid: int) -> float:
    """The CPU time of every thread of process ``pid`` so far (Linux: its CPU clock)."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, SCHED)
    except OSError:  # it has exited
        return 0.0


def warm(fns: dict[str, Fn], params: dict[str, Any], report: Reporter) -> None:
    import psutil  # here: a script's workers import this module again

    from cleanbreak import Pool

    job: str = params["job"]
    items = list(range(params["n"]))
    wall: dict[str, list[float]] = {key: [] for key in fns}
    cpu: dict[str, list[float]] = {key: [] for key in fns}
    with Pool(params["workers"]) as pool:
        for fn in fns.values():  # untimed: workers up, each function in each worker
            _check(job, items, list(pool.map(fn, items)))
        # This process and the pool's (its fork server, its workers, a resource tracker).
        pids = [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]
        for i in range(params["passes"]):
            keys = list(fns) if i % 2 == 0 else list(reversed(fns))
            for key in keys:
                cpu0 = sum(_cpu_clock(pid) for pid in pids)
                start = time.perf_counter()
                out = list(pool.map(fns[key], items))
                wall[key].append(time.perf_counter() - start)
                cpu[key].append(sum(_cpu_clock(pid) for pid in pids) - cpu0)
                _check(job, items, out)
            report({"wall": wall, "cpu": cpu})


def main(by_value: dict[str, Fn]) -> None:
    """Run the mode that ``PARAMS`` (the last argument but one) asks for."""
    params: dict[str, Any] = json.loads(sys.argv[-2])
    report = Reporter(Path(sys.argv[-1]))
    job: str = params["job"]
    fns: dict[str, Fn] = {"ref": getattr(notebook_tasks, job), "value": by_value[job]}
    if params["mode"] == "oneshot":
        oneshot(fns[params["fn"]], params, report)
    else:
        warm(fns, params, report)


if __name__ == "__main__":
    main(notebook_tasks.nested())
