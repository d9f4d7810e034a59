"""A client of a Dask cluster, for the Ctrl-C tests: ``map`` of spinning tasks through
``Pool(dask=ADDRESS)``; prints one JSON line (``yielded``, ``completed``, ``signal``,
``caught_ns``) and exits with 128 + the signal's number after ``Interrupted``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
from tests.dask_tasks import spin_marked


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("folder")
    parser.add_argument("--mode", default="terminate")
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--journal", default=None)
    args = parser.parse_args()
    specs = [(i, args.seconds, args.folder) for i in range(args.tasks)]
    yielded: list[list[int]] = []
    report: dict[str, object] = {"yielded": yielded, "completed": {}, "signal": None}
    status = 0
    try:
        with cleanbreak.Pool(
            dask=args.address, on_interrupt=args.mode, journal=args.journal
        ) as pool:
            for value in pool.imap_unordered(spin_marked, specs, chunksize=1):
                yielded.append(list(value))
    except cleanbreak.Interrupted as exc:
        report["caught_ns"] = time.monotonic_ns()
        report["signal"] = exc.signal.name
        report["completed"] = {str(k): list(v) for k, v in exc.completed.items()}
        status = 128 + int(exc.signal)
    print(json.dumps(report), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
