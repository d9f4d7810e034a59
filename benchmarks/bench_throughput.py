"""Measurements 1 and 2: throughput on tiny tasks (per-task overhead) and on 1 ms tasks.

Each (variant, repetition) runs in a fresh child. The child opens the pool, runs a warm-up map
(so workers are started and have imported the task module), then times one ``map`` over a list
that was built beforehand and checks the results. Variants flagged ``fresh`` (``cleanbreak.map``,
mpire's ``WorkerPool.map``) start and stop their workers inside the timed call, since that is what
one call of them does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import tasks
from common import (
    Section,
    Settings,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    median,
    progress,
    rotated,
    run_child,
)
from libs import (
    DEFAULT_VARIANTS,
    MAP_VARIANTS,
    VARIANTS,
    Variant,
    available,
    mapper,
    pool_chunksize,
)
from reporter import Reporter

TINY_CALLS = 2_000_000
TINY_CALLS_QUICK = 200_000
QUICK_DIVISOR = 5  # --quick times the slow variants on a fifth of their usual calls
MS_TASKS = 2_000
MS_TASKS_QUICK = 600


def child_map_rate(params: dict[str, Any], report: Reporter) -> None:
    fn = {"inc": tasks.inc, "busy_1ms": tasks.busy_1ms}[params["task"]]
    n: int = params["n"]
    workers: int = params["workers"]
    items = list(range(n))
    with mapper(params["variant"], workers, pool_chunksize(n, workers)) as run:
        run(fn, list(range(workers * 4)))  # warm-up
        start = time.perf_counter()
        out = run(fn, items)
        seconds = time.perf_counter() - start
    expected = sum(items) + (n if fn is tasks.inc else 0)
    if len(out) != n or sum(out) != expected:
        raise AssertionError(f"{params['variant']}: wrong results")
    report({"seconds": seconds, "calls": n})


def _measure(
    settings: Settings, keys: list[str], task: str, counts: dict[str, int], reps: int, tag: str
) -> dict[str, list[float]]:
    """Tasks per second of each variant, one figure per repetition (alternating variants)."""
    rates: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(reps):
        for key in rotated(keys, rep):
            params = {"variant": key, "task": task, "n": counts[key], "workers": settings.workers}
            timeout = 300.0
            result, why = run_child("map_rate", params, timeout)
            if result is None:
                progress(f"  {tag} rep {rep + 1}/{reps} {key}: FAILED ({why})")
                continue
            rate = result["calls"] / result["seconds"]
            rates[key].append(rate)
            progress(
                f"  {tag} rep {rep + 1}/{reps} {key}: {result['calls']:,} calls in "
                f"{result['seconds']:.2f} s = {rate:,.0f}/s"
            )
    return rates


def _tiny_calls(variant: Variant, n: int, quick: bool) -> int:
    if variant.tiny_calls is None:
        return n
    return min(n, variant.tiny_calls // QUICK_DIVISOR if quick else variant.tiny_calls)


def run_tiny(settings: Settings) -> Section:
    n = TINY_CALLS_QUICK if settings.quick else TINY_CALLS
    reps = settings.repetitions(3, 1)
    keys = [v.key for v in MAP_VARIANTS if available(v.lib)]
    counts = {v.key: _tiny_calls(v, n, settings.quick) for v in MAP_VARIANTS}
    rates = _measure(settings, keys, "inc", counts, reps, "tiny")
    section = Section(
        "tiny",
        f"1. Tiny tasks: {n:,} calls of x -> x+1",
        f"Each library's `map` over a list of {n:,} ints on {settings.workers} workers, warm pool, "
        f"median of {reps} alternating run(s) in fresh processes. Ratio: tasks/s against "
        "multiprocessing.Pool.map (higher is better).",
        ["API", "calls timed", "tasks/s", f"time for {n:,} calls", "vs Pool.map"],
    )
    base = median(rates["mp"]) if rates.get("mp") else None
    for v in MAP_VARIANTS:
        if v.key not in keys or not rates[v.key]:
            section.rows.append([v.label, "—", "not measured", "—", "—"])
            continue
        rate = median(rates[v.key])
        extrapolated = counts[v.key] < n
        total = fmt_seconds(n / rate) + (" (extrapolated)" if extrapolated else "")
        section.rows.append(
            [
                v.label + (" ¹" if v.fresh else ""),
                f"{counts[v.key]:,}",
                fmt_rate(rate),
                total,
                fmt_ratio(rate / base) if base else "—",
            ]
        )
    section.notes.append(
        f'Where "calls timed" is under {n:,}, the variant costs so much per call that it was '
        f"timed on fewer calls and the time for {n:,} extrapolated linearly."
    )
    section.notes.append(
        f'"chunksize as Pool.map" = ceil(n / (4 x workers)) = {n // (4 * settings.workers):,}, '
        "what multiprocessing.Pool.map picks by default; the concurrent.futures docs recommend a "
        "large chunksize for long iterables. cleanbreak is called with chunksize=None: it picks "
        "its own."
    )
    section.notes.append(
        "¹ The timed call starts and stops its workers (one-shot API: cleanbreak.map; mpire "
        "starts workers per map call unless keep_alive=True)."
    )
    return section


def run_ms(settings: Settings) -> Section:
    n = MS_TASKS_QUICK if settings.quick else MS_TASKS
    reps = settings.repetitions(3, 1)
    keys = [k for k in (*DEFAULT_VARIANTS, "cb-imap") if available(VARIANTS[k].lib)]
    rates = _measure(settings, keys, "busy_1ms", dict.fromkeys(keys, n), reps, "1ms")
    ideal = settings.workers / 0.001
    section = Section(
        "ms",
        f"2. 1 ms tasks: {n:,} tasks that busy-wait 1 ms",
        f"Each library's `map` with its default chunking, {settings.workers} workers, warm pool, "
        f"median of {reps} alternating run(s). Ideal = workers / 1 ms = {ideal:,.0f} tasks/s.",
        ["API", "tasks/s", "efficiency vs ideal", "vs Pool.map"],
    )
    base = median(rates["mp"]) if rates.get("mp") else None
    for key in keys:
        v = VARIANTS[key]
        if not rates[key]:
            section.rows.append([v.label, "not measured", "—", "—"])
            continue
        rate = median(rates[key])
        section.rows.append(
            [
                v.label + (" ¹" if v.fresh else ""),
                fmt_rate(rate),
                f"{rate / ideal:.1%}",
                fmt_ratio(rate / base) if base else "—",
            ]
        )
    section.notes.append("¹ The timed call starts and stops its workers.")
    cores = len(os.sched_getaffinity(0))
    if settings.workers >= cores:
        section.notes.append(
            f"With {settings.workers} workers on {cores} cores, the parent and the pool's own "
            "threads compete with the workers for CPU, so 100% is out of reach."
        )
    return section


PAIRS, PAIRS_QUICK = 11, 3


def child_tiny_paired(params: dict[str, Any], report: Reporter) -> None:
    """Both pools open in this one process, their ``map`` over the same list timed in turn
    (which goes first alternates), so that both see the same machine at the same moments."""
    import multiprocessing

    import cleanbreak

    n: int = params["n"]
    workers: int = params["workers"]
    items = list(range(n))
    expected = sum(items) + n
    pairs: list[tuple[float, float]] = []
    with cleanbreak.Pool(workers) as cb, multiprocessing.Pool(workers) as mp:
        runs: dict[str, Callable[[], int]] = {
            "cb": lambda: sum(cb.map(tasks.inc, items)),
            "mp": lambda: sum(mp.map(tasks.inc, items)),
        }
        for run in runs.values():  # warm-up: workers started, the task module imported
            run()
        for i in range(params["pairs"]):
            took: dict[str, float] = {}
            for name in ("cb", "mp") if i % 2 == 0 else ("mp", "cb"):
                start = time.perf_counter()
                if runs[name]() != expected:
                    raise AssertionError(f"{name}: wrong results")
                took[name] = time.perf_counter() - start
            pairs.append((took["cb"], took["mp"]))
    report({"pairs": pairs})


def run_tiny_paired(settings: Settings) -> Section:
    n = TINY_CALLS_QUICK if settings.quick else TINY_CALLS
    count = PAIRS_QUICK if settings.quick else PAIRS
    params = {"n": n, "workers": settings.workers, "pairs": count}
    result, why = run_child("tiny_paired", params, timeout=600)
    section = Section(
        "tiny-paired",
        f"1b. Tiny tasks, paired: cleanbreak's Pool.map and multiprocessing.Pool.map in turn, "
        f"{n:,} calls of x -> x+1",
        f"Both pools open in one process ({settings.workers} workers each, warm; "
        "multiprocessing with its default start method), their `map` over the same list timed "
        f"one after the other, {count} pairs, which one goes first alternating. Ratio: "
        "multiprocessing's time over cleanbreak's in each pair (above 1: cleanbreak is faster).",
        ["", "median", "min", "max"],
    )
    if result is None:
        section.rows.append(["not measured", why, "", ""])
        return section
    cb = [p[0] for p in result["pairs"]]
    mp = [p[1] for p in result["pairs"]]
    ratios = [m / c for c, m in result["pairs"]]
    section.rows.append(
        [
            "speed ratio, per pair",
            fmt_ratio(median(ratios)),
            fmt_ratio(min(ratios)),
            fmt_ratio(max(ratios)),
        ]
    )
    for label, times in (("cleanbreak `Pool.map`", cb), ("`multiprocessing.Pool.map`", mp)):
        section.rows.append(
            [label, fmt_seconds(median(times)), fmt_seconds(min(times)), fmt_seconds(max(times))]
        )
    return section
