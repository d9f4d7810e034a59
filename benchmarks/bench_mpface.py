"""Measurement 15: ``cleanbreak.multiprocessing.Pool`` (the drop-in) beside the stock
``multiprocessing.Pool``, on the calls stock code makes.

Warm calls: both pools open in one child process (2 workers each, the stock pool with its
default start method), each call timed on one pool then the other, the order alternating,
``PAIRS`` pairs; the figure is the median of the pairs' ratios (stock time over the drop-in's:
above 1, the drop-in is faster). The calls: ``map`` of 2,000,000 tiny tasks (``x -> x+1``);
``imap_unordered`` with ``chunksize=1`` over 20,000 tiny tasks (the usual progress-bar loop);
2,000 ``apply_async(...).get()`` round trips, one after the other; 2,000 ``apply_async``
calls, then a ``get()`` of each (the classic loop); ``map`` of 2,000 tiny tasks with an
explicit ``chunksize=1``; 200 small maps, ``map`` of 100 tiny tasks each, one after the other
(a program that maps small lists in a loop).

First use: in a fresh child process per (pool, repetition), ``with Pool(2) as p:
p.map(f, range(1000))``, timed from before ``Pool()`` to the end of the block.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import tasks
from bench_oneshot import LEAN_CHILD
from common import (
    Section,
    Settings,
    fmt_ratio,
    fmt_seconds,
    median,
    progress,
    run_child,
)
from reporter import Reporter

PAIRS, PAIRS_QUICK = 7, 2
CALLS: dict[str, str] = {
    "map": "`map`, 2,000,000 tiny tasks",
    "imap_unordered": "`imap_unordered(chunksize=1)`, 20,000 tiny tasks",
    "apply_async": "2,000 `apply_async(...).get()` round trips",
    "apply_async batch": "2,000 `apply_async` calls, then each `.get()`",
    "map chunksize=1": "`map(..., chunksize=1)`, 2,000 tiny tasks",
    "small maps": "200 small maps: `map` of 100 tiny tasks each",
}


def _calls(pool: Any) -> dict[str, Callable[[], int]]:
    items = list(range(2_000_000))
    few = list(range(20_000))
    return {
        "map": lambda: sum(pool.map(tasks.inc, items)),
        "imap_unordered": lambda: sum(pool.imap_unordered(tasks.inc, few, 1)),
        "apply_async": lambda: sum(pool.apply_async(tasks.inc, (i,)).get() for i in range(2000)),
        "apply_async batch": lambda: sum(
            r.get() for r in [pool.apply_async(tasks.inc, (i,)) for i in range(2000)]
        ),
        "map chunksize=1": lambda: sum(pool.map(tasks.inc, range(2000), 1)),
        "small maps": lambda: sum(sum(pool.map(tasks.inc, range(100))) for _ in range(200)),
    }


def child_mpface_warm(params: dict[str, Any], report: Reporter) -> None:
    import cleanbreak.multiprocessing

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in CALLS}
    with cleanbreak.multiprocessing.Pool(2) as ours, multiprocessing.Pool(2) as stock:
        runs = {"ours": _calls(ours), "stock": _calls(stock)}
        for name in CALLS:
            for pool in ("ours", "stock"):  # warm-up
                runs[pool][name]()
            for i in range(params["pairs"]):
                took: dict[str, float] = {}
                for pool in ("ours", "stock") if i % 2 == 0 else ("stock", "ours"):
                    start = time.perf_counter()
                    runs[pool][name]()
                    took[pool] = time.perf_counter() - start
                times[name].append((took["ours"], took["stock"]))
    report({"times": times})


def run_mpface(settings: Settings) -> Section:
    pairs = PAIRS_QUICK if settings.quick else PAIRS
    reps = settings.repetitions(5, 2)
    section = Section(
        "mpface",
        "15. The multiprocessing.Pool drop-in beside the stock pool",
        "`cleanbreak.multiprocessing.Pool` against `multiprocessing.Pool`, 2 workers each. "
        f"Warm: both pools in one process, each call timed in turn, {pairs} pairs, the order "
        "alternating; ratio = the stock pool's time over the drop-in's, median of the pairs "
        "(above 1: the drop-in is faster). First use: `with Pool(2) as p: p.map(f, "
        f"range(1000))` in a fresh process whose main module is a small script, timed from "
        f"`from ... import Pool` (the drop-in's whole change), median of {reps}.",
        ["call", "drop-in", "stock", "ratio"],
    )
    progress("  mpface: warm calls")
    result, why = run_child("mpface_warm", {"pairs": pairs}, timeout=900)
    for name, label in CALLS.items():
        if result is None:
            section.rows.append([label, "not measured", why, ""])
            continue
        pairs_of = result["times"][name]
        ours = median(p[0] for p in pairs_of)
        stock = median(p[1] for p in pairs_of)
        ratio = median(p[1] / p[0] for p in pairs_of)
        section.rows.append([label, fmt_seconds(ours), fmt_seconds(stock), fmt_ratio(ratio)])
    first: dict[str, list[float]] = {"ours": [], "stock": []}
    for rep in range(reps):
        for pool in ("ours", "stock") if rep % 2 == 0 else ("stock", "ours"):
            progress(f"  mpface: first use, {pool}, rep {rep + 1}/{reps}")
            # In the small script of measurement 10, as a user's script would be: a child
            # with the whole suite imported has most of either pool's modules already.
            got, _why = run_child("oneshot", {"pool": pool}, 120, LEAN_CHILD)
            if got is not None:
                first[pool].append(got["seconds"])
    if first["ours"] and first["stock"]:
        ours, stock = median(first["ours"]), median(first["stock"])
        section.rows.append(
            [
                "first use: `with Pool(2) as p: p.map(f, range(1000))`",
                fmt_seconds(ours),
                fmt_seconds(stock),
                fmt_ratio(stock / ours),
            ]
        )
    return section
