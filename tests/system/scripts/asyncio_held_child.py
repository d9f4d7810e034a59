"""A pool held in a variable (no ``with`` block) in ``asyncio.run``'s coroutine, awaited
there (``run_in_executor``): Ctrl-C to the process group, as a terminal sends it, while the
coroutine waits on the pool (a callback of the loop sends it once the task has started). What
the coroutine awaits ends in ``Interrupted`` (not a ``CancelledError``, which asyncio turned
into its plain ``KeyboardInterrupt``): uncaught, it comes out of ``asyncio.run``; caught, the
coroutine goes on, and asyncio does not cancel it afterwards.

``asyncio_held_child.py FOLDER METHOD await|gather|caught``; prints what came out, then the
results the first future kept."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
from tests.tasks import release_after, wait_for_path


async def main(pools: list[cleanbreak.Pool], folder: Path, method: str, shape: str) -> str:
    loop = asyncio.get_running_loop()
    pool = cleanbreak.Pool(2, mp_context=method)  # after asyncio's handler: it chains it
    pools.append(pool)
    started, release = str(folder / "started"), str(folder / "release")
    first = loop.run_in_executor(pool, abs, -1)
    assert await first == 1
    futures = [loop.run_in_executor(pool, release_after, started, release, 2), first]
    while not os.path.exists(started):  # a handshake: the task runs
        await asyncio.sleep(0.002)
    loop.call_soon(os.killpg, os.getpgrp(), signal.SIGINT)  # runs once the coroutine waits
    try:
        if shape == "gather":
            await asyncio.gather(*futures)
        else:
            await futures[0]
    except cleanbreak.Interrupted as exc:
        if shape != "caught":
            raise
        print("caught", exc.signal.name, flush=True)
        await asyncio.sleep(0.1)  # asyncio's own cancel would come here
    return "went on"


if __name__ == "__main__":
    here = Path(sys.argv[1])
    held: list[cleanbreak.Pool] = []
    try:
        print(asyncio.run(main(held, here, sys.argv[2], sys.argv[3])))
    except cleanbreak.Interrupted as exc:
        print("Interrupted", exc.signal.name)
    except BaseException as exc:
        print(type(exc).__name__)
    finally:
        (here / "release").touch()
    print(wait_for_path(here / "started"))
    held[0].shutdown()
