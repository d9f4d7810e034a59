"""A client of a Dask cluster, for the Ctrl-C tests: tasks that leave marks in a folder (see
``tests/dask_tasks.py``) through ``Pool(dask=ADDRESS)``; prints one JSON line (``yielded``,
``completed``, ``signal``, ``caught_ns``) and exits with 128 + the signal's number after
``Interrupted``.

By default it runs ``imap_unordered`` over ``--tasks`` items that spin for ``--seconds``.
With ``--seed`` (the stress test, ``test_dask_stress.py``), each item takes 1-40 ms, half of
them spinning and half asleep, through the API ``--api`` names; and it leaves a ``begin`` mark
just before it makes its pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
from tests.dask_tasks import gil_marked, mark, spin_marked, stress_marked, stuck_marked
from tests.system.scripts.sysprobe_tasks import through_asyncio

# The package imports these on first use; loaded now, so that between the ``begin`` mark and
# the pool's own signal handlers there is only the making of the pool, not an import.
_ = (cleanbreak.Pool, cleanbreak.map)

APIS = ["submit", "map", "imap_unordered", "cbmap", "drain", "asyncio"]


def _run(
    api: str,
    fn: Any,
    specs: list[Any],
    pool_args: dict[str, Any],
    yielded: list[Any],
    chunksize: int = 1,
) -> None:
    if api == "cbmap":
        yielded.extend(cleanbreak.map(fn, specs, chunksize=chunksize, **pool_args))
    elif api == "asyncio":
        asyncio.run(through_asyncio(pool_args, stress_marked, specs, yielded))
    else:
        with cleanbreak.Pool(**pool_args) as pool:
            if api == "submit":
                futures = [pool.submit(fn, s) for s in specs]
                for fut in futures:
                    yielded.append(fut.result())
            elif api == "imap_unordered":
                for value in pool.imap_unordered(fn, iter(specs), chunksize=chunksize):
                    yielded.append(value)
            else:  # map, drain
                for value in pool.map(fn, specs, chunksize=chunksize):
                    yielded.append(value)


def _hold_results() -> None:
    """The moment a stop must end workers while the results of units that finished before it
    are still on the cluster, made certain: the backend settles no unit until the stop, and
    then ends the workers still running units at once (``STOP_GRACE`` 0), as it does when a
    task is stuck in C."""
    from cleanbreak import _dask

    _dask.STOP_GRACE = 0.0
    wait = _dask.DaskBackend._wait

    def held(self: Any) -> None:
        if self.level < _dask.DRAINING:
            time.sleep(0.01)
            return
        wait(self)

    _dask.DaskBackend._wait = held  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("folder")
    parser.add_argument("--mode", default="terminate")
    parser.add_argument("--api", default="imap_unordered", choices=APIS)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--journal", default=None)
    parser.add_argument("--hold-results", action="store_true")
    parser.add_argument("--chunksize", type=int, default=1)
    parser.add_argument("--stuck", type=int, default=None, help="item that sleeps in C")
    parser.add_argument("--by-value", action="store_true", help="a lambda: sent by value")
    parser.add_argument("--gil", action="store_true", help="the stuck item holds the GIL")
    args = parser.parse_args()
    if args.hold_results:
        _hold_results()
    fn: Any = spin_marked
    specs = [(i, args.seconds, args.folder) for i in range(args.tasks)]
    if args.seed is not None:
        rng = random.Random(args.seed)
        fn = stress_marked
        specs = [(i, rng.uniform(0.001, 0.040), args.folder) for i in range(args.tasks)]
    if args.stuck is not None:
        fn = gil_marked if args.gil else stuck_marked
        specs = [(i, args.stuck, args.folder) for i in range(args.tasks)]
    if args.by_value:
        inner = fn
        fn = lambda spec: inner(spec)  # noqa: E731, PLW0108 (a lambda goes by value, packed)
    mode = "drain" if args.api == "drain" else args.mode
    pool_args = {"dask": args.address, "on_interrupt": mode, "journal": args.journal}
    yielded: list[Any] = []
    report: dict[str, object] = {"yielded": yielded, "completed": {}, "signal": None}
    status = 0
    if args.seed is not None:
        mark(args.folder, "begin", 0)
    try:
        _run(args.api, fn, specs, pool_args, yielded, args.chunksize)
    except cleanbreak.Interrupted as exc:
        report["caught_ns"] = time.monotonic_ns()
        report["signal"] = exc.signal.name
        report["completed"] = {str(k): list(v) for k, v in exc.completed.items()}
        status = 128 + int(exc.signal)
    report["done_ns"] = time.monotonic_ns()
    report["yielded"] = [list(v) for v in yielded]
    print(json.dumps(report), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
