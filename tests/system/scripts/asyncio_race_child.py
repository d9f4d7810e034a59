"""Ctrl-C lands while one of asyncio's callbacks sets a future's result (as the callback that
passes a pool future's result on to its asyncio future does): the callback sends Ctrl-C to
its own process group, as a terminal would, and sets the result right after, when Python has
just run the signal handlers. Exit status 130 after ``Interrupted``; stderr must be empty."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
from tests.tasks import square


async def main() -> None:
    loop = asyncio.get_running_loop()
    with cleanbreak.Pool(1, mp_context=sys.argv[1]) as pool:
        assert await loop.run_in_executor(pool, square, 3) == 9
        waited: asyncio.Future[int] = loop.create_future()

        def set_result() -> None:
            os.killpg(os.getpgrp(), signal.SIGINT)
            waited.set_result(1)

        loop.call_soon(set_result)
        await asyncio.gather(waited, asyncio.sleep(60))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except cleanbreak.Interrupted:
        sys.exit(130)
