"""The child of measurement 12: ``black_client.py FORM WORKERS JOB [DIR]``, one JSON line out.

It imports black at the top, as black's own console script does (so a fork server preloads
it, as it would for ``black`` itself). ``FORM`` is ``stock`` (black as shipped: a
``ProcessPoolExecutor``) or ``cleanbreak`` (``cleanbreak.Pool`` put in the executor's place,
with its default start method). ``JOB`` is ``black`` (``black -q -W WORKERS --no-cache DIR``:
black formats every file in place, through ``loop.run_in_executor``) or ``micro`` (100 tasks
that busy-wait 50 ms, through ``run_in_executor`` under ``asyncio.run``). The time runs from
the call that makes the executor to the end of its shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
import time
from typing import Any

import black
import black.concurrency


def busy_50ms() -> None:
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:
        pass


def _executor(form: str) -> Any:
    if form == "stock":
        return concurrent.futures.ProcessPoolExecutor
    from cleanbreak import Pool  # imported here, before the clock starts

    def make(max_workers: int | None = None) -> Pool:
        return Pool(max_workers)

    return make


async def _micro(executor: Any) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(executor, busy_50ms) for _ in range(100)))


def main() -> None:
    form, workers, job = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    make = _executor(form)
    start = time.perf_counter()
    if job == "black":
        black.concurrency.ProcessPoolExecutor = make
        try:
            black.main(["-q", "-W", str(workers), "--no-cache", sys.argv[4]])
        except SystemExit as exc:
            if exc.code:
                raise
    else:
        with make(max_workers=workers) as executor:
            asyncio.run(_micro(executor))
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
