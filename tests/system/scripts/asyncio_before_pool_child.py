"""Ctrl-C lands under ``asyncio.run`` just before the pool is made, and asyncio's own SIGINT
handler takes it: the main task sends Ctrl-C to its own process group, as a terminal would,
and goes on (asyncio only asks to cancel the main task, at its next ``await``) until it sees
that the handler has run, then makes the pool and starts tasks that each leave a file. With
``touched``, the pool's modules were imported before the run (else the first touch of
``cleanbreak.Pool`` is inside it). Prints what came out of ``asyncio.run``, then the files."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
from tests.tasks import GUARD, touch_and_return


async def main(folder: str, method: str) -> None:
    task = asyncio.current_task()
    assert task is not None
    os.killpg(os.getpgrp(), signal.SIGINT)
    deadline = time.monotonic() + GUARD
    while not task.cancelling():  # until asyncio's handler has run (a deadlock guard only)
        assert time.monotonic() < deadline, "asyncio's handler did not run"
    loop = asyncio.get_running_loop()
    with cleanbreak.Pool(2, mp_context=method) as pool:
        paths = [os.path.join(folder, str(i)) for i in range(4)]
        await asyncio.gather(*(loop.run_in_executor(pool, touch_and_return, p, 1) for p in paths))


if __name__ == "__main__":
    folder, method, touched = sys.argv[1], sys.argv[2], sys.argv[3] == "touched"
    if touched:
        cleanbreak.Pool  # noqa: B018 - the first touch, before the run
    try:
        asyncio.run(main(folder, method))
        print("finished")
    except cleanbreak.Interrupted as exc:
        print("Interrupted", exc.signal.name)
    except KeyboardInterrupt:
        print("KeyboardInterrupt")
    print(sorted(os.listdir(folder)))
