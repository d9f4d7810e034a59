"""One run of the drop-in stress test: ``mp_stress_child.py MODE FOLDER SEED``.

It imports the drop-in's module (the user's import line), prints ``begin`` just before its
first call, ``Pool(2)``, which imports the pool itself (the signal may land from then on), then
runs 24 tasks of 5 to 40 ms through MODE on a ``cleanbreak.multiprocessing.Pool(2)``
(``apply_round_trips``: 1,000 tasks that do not sleep, each ``apply_async(...).get()`` in turn,
so that the main thread is often inside a send of its own: see ``_manager``, "Sending from the
caller's thread"; ``apply_tiny``: 2,000 such tasks, ``apply_async`` in batches of 100, then a
``get()`` of each, and ``map_tiny``: 2,000 through ``map(..., chunksize=1)``, so that they travel
together: see ``_manager``, "Tasks that travel together"). Each task appends ``start I NS``
and ``done I NS`` to ``FOLDER/log`` (``time.monotonic_ns()``). At the end, or at the
``Interrupted``, it prints one JSON line: ``kept`` (index -> result: what the caller was given,
what the finished ``AsyncResult``s hold, and ``Interrupted.completed``), and ``how`` ("done" or
the exception's type), then exits 0, or 130 (SIGINT) / 143 (SIGTERM) after the interrupt.
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from cleanbreak.multiprocessing import Pool
from tests import tasks

# How many tasks a mode runs: 24 unless named here.
TASKS: dict[str, int] = defaultdict(
    lambda: 24, apply_round_trips=1000, apply_tiny=2000, map_tiny=2000
)
# The modes whose tasks do not sleep (tiny tasks: those travel together, see _manager).
TINY = ("apply_round_trips", "apply_tiny", "map_tiny")


def main() -> None:
    mode, folder, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    if mode in TINY:
        args = [(folder, i, 0.0) for i in range(TASKS[mode])]
    else:
        args = [(folder, i, rng.uniform(0.005, 0.04)) for i in range(TASKS[mode])]
    kept: dict[int, int] = {}
    results: list[object] = []
    status = 0
    how = "done"
    try:
        print("begin", flush=True)
        with Pool(2) as pool:
            if mode == "apply_async":
                results = [pool.apply_async(tasks.logged_sleep, a) for a in args]
                for i, r in enumerate(results):
                    kept[i] = r.get()  # type: ignore[attr-defined]
            elif mode == "apply_round_trips":
                for a in args:
                    results.append(pool.apply_async(tasks.logged_sleep, a))
                    kept[a[1]] = results[-1].get()  # type: ignore[attr-defined]
            elif mode == "apply_tiny":  # the classic loop: a batch of apply_async, then get()s
                for at in range(0, len(args), 100):
                    batch = [pool.apply_async(tasks.logged_sleep, a) for a in args[at : at + 100]]
                    results += batch
                    for i in range(at, len(results)):
                        kept[i] = results[i].get()  # type: ignore[attr-defined]
            elif mode == "map_tiny":  # one task to a chunk, as the caller asks
                kept.update(enumerate(pool.map(tasks.logged_sleep_star, args, 1)))
            elif mode == "map_async":
                kept.update(enumerate(pool.starmap_async(tasks.logged_sleep, args, 1).get()))
            elif mode == "map_async_chunks":  # chunks of 6: items finish inside running chunks
                kept.update(enumerate(pool.starmap_async(tasks.logged_sleep, args, 6).get()))
            elif mode == "map":
                kept.update(enumerate(pool.map(tasks.logged_sleep_star, args)))
            elif mode == "starmap":
                kept.update(enumerate(pool.starmap(tasks.logged_sleep, args)))
            elif mode == "imap":
                for i, value in enumerate(pool.imap(tasks.logged_sleep_star, args)):
                    kept[i] = value
            elif mode == "imap_unordered":
                for value in pool.imap_unordered(tasks.logged_sleep_star, args):
                    kept[value[0]] = value
            elif mode == "imap_timeout":
                it = pool.imap(tasks.logged_sleep_star, args)
                for i in range(len(args)):
                    kept[i] = it.next(60)
    except KeyboardInterrupt as exc:
        how = type(exc).__name__
        kept.update(getattr(exc, "completed", {}))
        for i, r in enumerate(results):
            if r.ready() and r.successful():  # type: ignore[attr-defined]
                kept[i] = r.get(0)  # type: ignore[attr-defined]
        status = 143 if getattr(exc, "signal", 2) == 15 else 130
    report = {"how": how, "kept": {str(k): v for k, v in kept.items()}}
    print(json.dumps(report, separators=(",", ":")), flush=True)  # one write: under 64 KiB
    sys.exit(status)


if __name__ == "__main__":
    main()
