"""The child of measurement 12: ``black_client.py FORM WORKERS JOB [DIR]``, one JSON line out.

It imports black at the top, as black's own console script does (so a fork server preloads
it, as it would for ``black`` itself). ``FORM`` is ``stock`` (black as shipped: a
``ProcessPoolExecutor``) or ``cleanbreak`` (``cleanbreak.Pool`` put in the executor's place,
with its default start method). ``JOB`` is ``black`` (``black -q -W WORKERS --no-cache DIR``:
black formats every file in place, through ``loop.run_in_executor``) or ``micro`` (100 tasks
that busy-wait 50 ms, through ``run_in_executor`` under ``asyncio.run``). The time runs from
the call that makes the executor to the end of its shutdown; for ``micro``, also when the
first task started and the median gap between two tasks in one worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import statistics
import sys
import time
from typing import Any

import black
import black.concurrency


def busy_50ms() -> tuple[int, float, float]:
    """Busy-wait 50 ms; the worker's pid, and when the task started and ended (monotonic,
    one clock for every process on Linux)."""
    began = time.monotonic()
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:
        pass
    return os.getpid(), began, time.monotonic()


def _timeline(made: float, tasks: list[tuple[int, float, float]]) -> dict[str, float]:
    """When the first task started, after the executor was made, and the median gap between
    a task's end and the next task's start in the same worker (what a worker waits for)."""
    gaps: list[float] = []
    for pid in {t[0] for t in tasks}:
        mine = sorted((began, ended) for p, began, ended in tasks if p == pid)
        gaps.extend(b - a for (_, a), (b, _) in itertools.pairwise(mine))
    return {
        "first_start": min(began for _, began, _ in tasks) - made,
        "median_gap": statistics.median(gaps) if gaps else 0.0,
    }


def _executor(form: str) -> Any:
    if form == "stock":
        return concurrent.futures.ProcessPoolExecutor
    from cleanbreak import Pool  # imported here, before the clock starts

    def make(max_workers: int | None = None) -> Pool:
        return Pool(max_workers)

    return make


async def _micro(executor: Any) -> list[tuple[int, float, float]]:
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*(loop.run_in_executor(executor, busy_50ms) for _ in range(100)))


def main() -> None:
    form, workers, job = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    make = _executor(form)
    extra: dict[str, float] = {}
    start = time.perf_counter()
    made = time.monotonic()
    if job == "black":
        black.concurrency.ProcessPoolExecutor = make
        try:
            black.main(["-q", "-W", str(workers), "--no-cache", sys.argv[4]])
        except SystemExit as exc:
            if exc.code:
                raise
    else:
        with make(max_workers=workers) as executor:
            tasks = asyncio.run(_micro(executor))
    seconds = time.perf_counter() - start
    if job != "black":
        extra = _timeline(made, tasks)
    print(json.dumps({"seconds": seconds, **extra}), flush=True)


if __name__ == "__main__":
    main()
