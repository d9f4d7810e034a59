"""Where a fresh pool's first pass over 50 MB payloads spends its time, phase by phase.

``python benchmarks/payload_phases.py [--count 20] [--size-mb 50]`` runs, for each of the four
payload jobs of measurement 3 (``bytes`` and numpy, as results and as arguments), one fresh
``cleanbreak.Pool(2)`` in a fresh process: a warm-up of 8 tiny tasks (for numpy, also numpy's
import in each worker), a pause of 3 s (the host takes back freed memory, as in measurement
3), then the same ``map`` twice, the **first use** and the **warm** pass. It prints, for each
pass, the wall time and the time spent in each phase that handles a payload, per payload
(mean):

- ``build``: the task makes its 50 MB result (results), or reads its argument's length
  (arguments), in the worker;
- ``pack``: ``Packer.pack``, pickling the payload and writing it into a shared-memory
  segment, by the sender (the worker for results, the parent's manager thread for arguments);
- ``load``: ``_shm.load``, opening the segment and unpickling from it, by the receiver (the
  parent's manager thread for results, the worker for arguments). A numpy array received out
  of band is mapped, not copied: its pages are read later, by whoever reads the array.

The wall time per payload is the pass's time over the payloads. The two workers run at once,
so a worker's phases for one payload overlap with the other worker's: they add up to about
twice a payload's share of the wall time where the workers are the bottleneck.

The phases are timed by wrapping ``Packer.pack`` and ``_shm.load`` in every process (the
workers through the pool's initializer) and the task itself; each process appends its timings
to a file of its own. A measurement aid, not part of ``run.py``: the figures go in the README
beside measurement 3's.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MB = 1 << 20
JOBS = [("bytes", "results"), ("bytes", "args"), ("numpy", "results"), ("numpy", "args")]
_log: str | None = None  # this process's timings file


def _record(phase: str, began: float, ended: float, nbytes: int) -> None:
    if _log is not None and nbytes >= MB:
        with open(_log, "a") as f:
            f.write(json.dumps([phase, began, ended, nbytes]) + "\n")


def _instrument(folder: str) -> None:
    """In every process of the pool (the parent, and each worker as its initializer)."""
    global _log
    import cleanbreak._manager
    import cleanbreak._shm
    import cleanbreak._worker

    _log = os.path.join(folder, f"phases-{os.getpid()}.jsonl")
    pack = cleanbreak._shm.Packer.pack
    load = cleanbreak._shm.load

    def timed_pack(self: Any, obj: object, *args: Any) -> Any:
        began = time.monotonic()
        out = pack(self, obj, *args)
        _record("pack", began, time.monotonic(), self.total)
        return out

    def timed_load(data: memoryview, layout: Any) -> Any:
        began = time.monotonic()
        out = load(data, layout)
        _record("load", began, time.monotonic(), cleanbreak._shm.largest(layout))
        return out

    cleanbreak._shm.Packer.pack = timed_pack  # type: ignore[method-assign,assignment]
    vars(cleanbreak._manager)["load"] = timed_load
    vars(cleanbreak._worker)["load"] = timed_load


def make_payload(i: int, size: int, kind: str) -> Any:
    began = time.monotonic()
    if kind == "numpy":
        import numpy as np

        out: Any = np.empty(size, dtype=np.uint8)
        out.fill(i % 256)
    else:
        out = bytes((i % 256,)) * size
    _record("build", began, time.monotonic(), size)
    return out


def numpy_ready(x: int) -> int:
    import numpy  # noqa: F401

    time.sleep(0.02)
    return os.getpid()


def length(data: Any) -> int:
    began = time.monotonic()
    n = len(data)
    _record("build", began, time.monotonic(), n)
    return n


def child(kind: str, way: str, count: int, size: int, folder: str) -> dict[str, Any]:
    """One job in this (fresh) process: the two passes and their phases."""
    from cleanbreak import Pool

    _instrument(folder)
    with Pool(2, initializer=_instrument, initargs=(folder,)) as pool:
        list(pool.map(abs, range(8)))  # warm-up: workers started
        if kind == "numpy":  # ... and numpy imported in each, as measurement 3 does
            for _ in range(10):
                if len(set(pool.map(numpy_ready, range(8), chunksize=1))) >= 2:
                    break
        time.sleep(3.0)  # the host takes back what the last process freed
        if way == "args":
            items: list[Any] = [make_payload(i, size, kind) for i in range(count)]
            fn: Any = length
        else:
            items = list(range(count))
            fn = functools.partial(make_payload, size=size, kind=kind)
        passes = []
        for _ in ("first", "warm"):
            gc.collect()
            began = time.monotonic()
            out = list(pool.map(fn, items))
            passes.append((began, time.monotonic()))
            assert len(out) == count
            del out
    events: list[tuple[str, float, float, int]] = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            events.extend(tuple(json.loads(line)) for line in f)
    result: dict[str, Any] = {}
    for label, (began, ended) in zip(("first", "warm"), passes, strict=True):
        wall = (ended - began) / count
        phases = {
            phase: sum(e - b for p, b, e, _ in events if p == phase and began <= b <= ended) / count
            for phase in ("build", "pack", "load")
        }
        result[label] = {"wall": wall, **phases}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size_mb * MB
    if args.child:
        with tempfile.TemporaryDirectory(prefix="cb-phases-") as folder:
            kind, way = args.child
            print(json.dumps(child(kind, way, args.count, size, folder)))
        return
    print(f"{args.count} payloads of {args.size_mb} MB on 2 workers, a fresh pool per job;")
    print("per payload (mean), in ms: first use / warm")
    print(f"{'job':<18}{'wall':>18}{'build':>18}{'pack':>18}{'load':>18}")
    for kind, way in JOBS:
        done = subprocess.run(
            [sys.executable, __file__, "--count", str(args.count), "--size-mb",
             str(args.size_mb), "--child", kind, way],
            capture_output=True, text=True, check=True, cwd=Path(__file__).parent,
        )  # fmt: skip
        got = json.loads(done.stdout.strip().splitlines()[-1])
        cells = [
            f"{got['first'][p] * 1e3:7.1f} / {got['warm'][p] * 1e3:6.1f}"
            for p in ("wall", "build", "pack", "load")
        ]
        print(f"{kind + ' ' + way:<18}" + "".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
