"""Stock ``multiprocessing.Pool`` code, with only the import changed, as the classic "Ctrl-C
and multiprocessing.Pool" write-ups have it: ``mp_child.py MODE DIR``.

Items 0 and 1 return at once; items 2 and 3 write ``DIR/started-<i>`` and block. The test waits
for both start files, then sends SIGINT to the group. The child prints one JSON line: the
exception's type, ``completed``, the values that finished ``AsyncResult``s still give, and
when the exception was caught (``time.monotonic_ns()``).

Modes: ``apply_async`` (in a loop, then ``.get()`` each), ``map_async`` (``.get(0xFFFF)``),
``map``, ``starmap``, ``imap`` (a loop), ``imap_unordered``, ``imap_timeout`` (``next(60)``);
``map_async_chunk`` and ``map_chunk``: the four items in one chunk, so one worker runs them in
turn and item 3 never starts (the items of a chunk still running are kept one by one);
``drain``: ``Pool(2, on_interrupt="drain")`` and ``starmap_async`` of eight items, of which 0
and 1 return at once and 2 to 7 wait for ``DIR/release`` (which two of them run first, one on
each worker, is the scheduler's: a later item may start before an earlier one that waits
behind a running item); the child writes ``DIR/draining`` once the pool drains.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from cleanbreak.multiprocessing import Pool
from tests import tasks


def _say_when_draining(pool: Pool, folder: str) -> None:
    """The test's handshake: the pool has acted on the first Ctrl-C (its stop level is 1)."""
    while getattr(pool._pool._backend, "level", 0) < 1:
        time.sleep(0.002)
    tasks.touch(os.path.join(folder, "draining"))


def main() -> None:
    mode, folder = sys.argv[1], sys.argv[2]
    args = [(folder, i) for i in range(4)]
    out: dict[str, object] = {}
    results = []
    seen: list[int] = []
    pool = Pool(2, on_interrupt="drain" if mode == "drain" else "terminate")
    if mode == "drain":
        threading.Thread(target=_say_when_draining, args=(pool, folder), daemon=True).start()
        tasks.touch(os.path.join(folder, "go"))
    try:
        if mode == "apply_async":
            results = [pool.apply_async(tasks.block_from_2, a) for a in args]
            out["values"] = [r.get() for r in results]
        elif mode == "map_async":
            out["values"] = pool.starmap_async(tasks.block_from_2, args, 1).get(0xFFFF)
        elif mode == "map_async_chunk":
            out["values"] = pool.starmap_async(tasks.block_from_2, args, 4).get(0xFFFF)
        elif mode == "drain":
            staged = [
                (
                    os.path.join(folder, f"started-{i}"),
                    os.path.join(folder, "go" if i < 2 else "release"),
                    i * i,
                )
                for i in range(8)
            ]
            out["values"] = pool.starmap_async(tasks.release_after, staged, 1).get(0xFFFF)
        elif mode == "map_chunk":
            out["values"] = pool.map(tasks.block_from_2_star, args, 4)
        elif mode == "map":
            out["values"] = pool.map(tasks.block_from_2_star, args, 1)
        elif mode == "starmap":
            out["values"] = pool.starmap(tasks.block_from_2, args, 1)
        elif mode in ("imap", "imap_unordered"):
            for value in getattr(pool, mode)(tasks.block_from_2_star, args, 1):
                seen.append(value)  # the loop's body has what it was given
        elif mode == "imap_timeout":
            it = pool.imap(tasks.block_from_2_star, args, 1)
            for _ in args:
                seen.append(it.next(60))
    except KeyboardInterrupt as exc:
        out["caught_ns"] = time.monotonic_ns()
        out["exc"] = type(exc).__name__
        out["completed"] = {str(k): v for k, v in getattr(exc, "completed", {}).items()}
        out["seen"] = seen
        out["kept"] = [r.get(0) for r in results if r.ready() and r.successful()]
    finally:
        pool.terminate()
        pool.join()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
