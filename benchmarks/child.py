"""The child process of every measurement: ``child.py SCENARIO PARAMS_JSON OUT_PATH``.

Run by path, so ``benchmarks/`` is ``sys.path[0]`` here and in the workers the pools start.
A scenario reports its findings through ``Reporter``, which writes JSON to ``OUT_PATH``
atomically; it may report more than once (the last report wins), so that a child the runner
has to kill still leaves what it had seen.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_dask
import bench_failures
import bench_interrupt
import bench_journal
import bench_lazy
import bench_memory
import bench_mpface
import bench_oneshot
import bench_parentcpu
import bench_payload
import bench_throughput
from reporter import Reporter

Scenario = Callable[[dict[str, Any], Reporter], None]

SCENARIOS: dict[str, Scenario] = {
    "map_rate": bench_throughput.child_map_rate,
    "tiny_paired": bench_throughput.child_tiny_paired,
    "payload": bench_payload.child_payload,
    "lazy": bench_lazy.child_lazy,
    "memory": bench_memory.child_memory,
    "mpface_warm": bench_mpface.child_mpface_warm,
    "interrupt": bench_interrupt.child_interrupt,
    "crash": bench_failures.child_crash,
    "journal": bench_journal.child_journal,
    "dask": bench_dask.child_dask,
    "oneshot": bench_oneshot.child_oneshot,
    "parentcpu": bench_parentcpu.child_parentcpu,
}


def main() -> None:
    scenario, params, out = sys.argv[1:4]
    report = Reporter(Path(out))
    SCENARIOS[scenario](json.loads(params), report)
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
