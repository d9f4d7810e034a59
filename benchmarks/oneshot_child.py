"""The child of measurement 10: ``oneshot_child.py oneshot PARAMS OUT``, one library's one-shot
call in a process whose main module is this small script (and of measurement 15's first use).

A script that calls a pool once is usually short: it imports the library and its task module,
builds its input and makes the call. Pools that start their workers from a fresh interpreter
(cleanbreak's fork server, loky, spawn) run the main module again in each worker, so what the
main module imports is part of their start; the pools that fork the parent (``multiprocessing``
and ``ProcessPoolExecutor`` on Linux before Python 3.14, pebble, mpire) pay nothing for it. So
this child imports only the standard library, ``tasks`` and ``reporter``; the ``heavy`` forms of
the measurement make the same call from ``child.py``, whose imports weigh about 70 ms.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tasks
from reporter import Reporter

OneShot = Callable[[Callable[[Any], Any], list[Any]], list[Any]]


def _one_shot(key: str, workers: int, chunksize: int) -> OneShot:
    """Import the library (not timed) and return its one-shot call."""
    if key == "mp":
        import multiprocessing

        def mp_call(fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
            with multiprocessing.Pool(workers) as p:
                return p.map(fn, xs)

        return mp_call
    if key == "cf":
        from concurrent.futures import ProcessPoolExecutor

        def cf_call(fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
            with ProcessPoolExecutor(workers) as ex:
                return list(ex.map(fn, xs, chunksize=chunksize))

        return cf_call
    if key == "loky":
        from loky import get_reusable_executor

        return lambda fn, xs: list(
            get_reusable_executor(max_workers=workers).map(fn, xs, chunksize=chunksize)
        )
    if key == "pebble":
        from pebble import ProcessPool

        def pebble_call(fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
            with ProcessPool(max_workers=workers) as p:
                return list(p.map(fn, xs, chunksize=chunksize).result())

        return pebble_call
    if key == "mpire":
        from mpire.pool import WorkerPool

        def mpire_call(fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
            with WorkerPool(n_jobs=workers) as p:
                return list(p.map(fn, xs))

        return mpire_call
    if key == "joblib":
        from joblib import Parallel, delayed

        return lambda fn, xs: list(Parallel(n_jobs=workers)(delayed(fn)(x) for x in xs))
    # cleanbreak's package imports the pool's modules on first use, as concurrent.futures
    # does ProcessPoolExecutor: taken from it here, as the peers' are, before the clock starts.
    if key in ("cb-fn", "cb-fn-heavy"):
        from cleanbreak import map as cb_map

        return lambda fn, xs: cb_map(fn, xs, workers=workers)
    if key == "cb":
        from cleanbreak import Pool

        def cb_call(fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
            with Pool(workers) as p:
                return list(p.map(fn, xs))

        return cb_call
    raise ValueError(f"unknown one-shot form {key!r}")


def first_use(params: dict[str, Any], report: Reporter) -> None:
    """Measurement 15's first use: ``from ... import Pool``, then ``with Pool(2) as p:
    p.map(f, range(1000))``, timed from the import statement (the drop-in's whole cost is the
    changed import), in this small script as a user's would be."""
    start = time.perf_counter()
    if params["pool"] == "ours":
        from cleanbreak.multiprocessing import Pool
    else:
        from multiprocessing import Pool  # type: ignore[assignment]
    with Pool(2) as pool:
        total = sum(pool.map(tasks.inc, range(1000)))
    seconds = time.perf_counter() - start
    if total != sum(range(1, 1001)):
        raise AssertionError(f"{params['pool']}: wrong results")
    report({"seconds": seconds})


def run(params: dict[str, Any], report: Reporter) -> None:
    """Time the one-shot call ``params["form"]`` on ``params["n"]`` items; check its results."""
    if "pool" in params:
        first_use(params, report)
        return
    task: str = params["task"]
    n: int = params["n"]
    fn = {"inc": tasks.inc, "busy_10ms": tasks.busy_10ms}[task]
    items = list(range(n))
    call = _one_shot(params["form"], params["workers"], params["chunksize"])
    start = time.perf_counter()
    out = call(fn, items)
    seconds = time.perf_counter() - start
    expected = sum(items) + (n if task == "inc" else 0)
    if len(out) != n or sum(out) != expected:
        raise AssertionError(f"{params['form']}: wrong results")
    report({"seconds": seconds, "done": time.monotonic()})


if __name__ == "__main__":
    run(json.loads(sys.argv[2]), Reporter(Path(sys.argv[3])))
