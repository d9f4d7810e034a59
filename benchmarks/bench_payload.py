"""Measurement 3: large payloads, both ways, on first use and warm, with the parent's peak memory.

Results: ``count`` tasks each return ``size`` bytes, built in the worker. Arguments: ``count``
distinct ``size``-byte objects, built in the parent after the pool is open (so forked workers do
not inherit them), are mapped to a task that returns their length. Each is done with ``bytes``
and with numpy arrays (``uint8``), when numpy is installed.

Each (variant, direction, repetition) runs in a fresh child process, which times the same
``map`` twice. The pool is opened and warmed up with a few tiny tasks (so that the workers of
libraries that start them lazily are up, and have imported the task module), then, after a
pause (full runs only, see below), the first payload ``map`` is timed: the **first use** of a
pool just made. Its results' lengths are checked, but their bytes are not read.

The second, **warm** ``map`` follows at once. On a virtual machine whose host takes back the
memory its guest frees (virtio-balloon free page reporting, as on this development machine,
about 2 s after it is freed), the first pass over a gigabyte of fresh memory pays a host page
fault per page, which made one library's figure vary by up to 5x from run to run; the warm pass
runs on memory the kernel freed moments before, as in a long job. The pause before the first
pass lets the host take back what the previous child freed, so that every library's first use
starts from the same state (a script started on an idle machine) rather than from whatever the
last child left. Before the warm pass the parent's peak RSS is started afresh
(``/proc/self/clear_refs``), its current RSS is read (``/proc/self/statm``), the ``map`` is
timed, every byte of the results is read (a result held in shared memory that was never touched
would not count in the RSS yet), and the peak RSS comes from ``getrusage(RUSAGE_SELF).ru_maxrss``,
which the kernel keeps exactly. A fresh process per measurement makes that peak belong to this
measurement alone.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import time
from typing import Any

import tasks
from common import (
    Section,
    Settings,
    current_rss,
    fmt_rate,
    fmt_ratio,
    median,
    peak_rss,
    progress,
    reset_peak_rss,
    rotated,
    run_child,
)
from libs import CB, DEFAULT_VARIANTS, VARIANTS, available, mapper
from reporter import Reporter

MB = 1_000_000
COUNT, COUNT_QUICK = 20, 5
SIZE = 50 * MB
SETTLE_SECONDS = 3.0  # before the first-use pass (not with --quick); see run_payload


def child_payload(params: dict[str, Any], report: Reporter) -> None:
    count: int = params["count"]
    size: int = params["size"]
    workers: int = params["workers"]
    make = tasks.make_array if params["kind"] == "numpy" else tasks.make_bytes
    with mapper(params["variant"], workers, 1) as run:
        run(tasks.inc, list(range(workers * 4)))  # warm-up: workers started, task module imported
        if params["kind"] == "numpy":
            # ... and numpy, which a task module that uses it imports at its top. Left to the
            # first payload, its import (about 0.2 s in each worker) was most of the numpy
            # rows' first use, for every library alike.
            for _ in range(10):
                if len(set(run(tasks.numpy_ready, list(range(workers * 4))))) >= workers:
                    break
        time.sleep(params["settle"])  # the host takes back what the last child freed (see top)
        fn: Any
        if params["direction"] == "args":
            items: list[Any] = [make(i, size) for i in range(count)]
            fn = tasks.length
        else:
            items = list(range(count))
            fn = functools.partial(make, size=size)
        # First use: the pool's first payload, timed (the pass that warms the pool below).
        gc.collect()
        start = time.perf_counter()
        first = run(fn, items)
        first_seconds = time.perf_counter() - start
        first_ok = _lengths_ok(first, params["direction"], count, size)
        del first
        gc.collect()
        reset_peak_rss()  # Linux; elsewhere the peak below may be the first pass's
        start_rss = current_rss()
        peak_before = peak_rss()
        start = time.perf_counter()
        out = run(fn, items)
        seconds = time.perf_counter() - start
        # Every byte is read before the peak is taken: a result in shared memory that nobody
        # touched would not be in the RSS yet.
        if params["direction"] == "args":
            ok = out == [size] * count
        else:
            ok = [len(r) for r in out] == [size] * count and all(
                _every_byte_is(r, i % 256) for i, r in enumerate(out)
            )
        peak = peak_rss()
    if not (ok and first_ok):
        raise AssertionError(f"{params['variant']}: wrong results")
    report(
        {
            "first_seconds": first_seconds,
            "seconds": seconds,
            "bytes": count * size,
            "peak_over_start": peak - start_rss,
            "peak_set_before": peak == peak_before,
        }
    )


def _lengths_ok(out: list[Any], direction: str, count: int, size: int) -> bool:
    """The first pass's results, checked without reading their bytes (which would map a result
    held in shared memory into the parent, and change what the timed warm pass starts from)."""
    if direction == "args":
        return out == [size] * count
    return [len(r) for r in out] == [size] * count


def _every_byte_is(data: Any, value: int) -> bool:
    """Read all of ``data`` without allocating a copy of it."""
    if isinstance(data, bytes):
        return data.count(bytes((value,))) == len(data)
    return bool(data.min() == value == data.max())


def run_payload(settings: Settings) -> Section:
    count = COUNT_QUICK if settings.quick else COUNT
    reps = settings.repetitions(3, 1)
    settle = 0.0 if settings.quick else SETTLE_SECONDS
    # cleanbreak.map moves data exactly as Pool.map does; leaving it out saves a sixth of the time.
    keys = [k for k in DEFAULT_VARIANTS if k != "cb-fn" and available(VARIANTS[k].lib)]
    kinds = ("bytes", "numpy") if importlib.util.find_spec("numpy") else ("bytes",)
    directions = [(kind, d) for kind in kinds for d in ("results", "args")]
    firsts: dict[tuple[str, tuple[str, str]], list[float]] = {}
    rates: dict[tuple[str, tuple[str, str]], list[float]] = {}
    peaks: dict[tuple[str, tuple[str, str]], list[float]] = {}
    for rep in range(reps):
        for direction in directions:
            for key in rotated(keys, rep):
                params = {
                    "variant": key,
                    "kind": direction[0],
                    "direction": direction[1],
                    "count": count,
                    "size": SIZE,
                    "workers": settings.workers,
                    "settle": settle,
                }
                result, why = run_child("payload", params, 180)
                tag = f"  payload {' '.join(direction)} rep {rep + 1}/{reps} {key}"
                if result is None:
                    progress(f"{tag}: FAILED ({why})")
                    continue
                first = result["bytes"] / MB / result["first_seconds"]
                rate = result["bytes"] / MB / result["seconds"]
                peak = result["peak_over_start"] / MB
                firsts.setdefault((key, direction), []).append(first)
                rates.setdefault((key, direction), []).append(rate)
                peaks.setdefault((key, direction), []).append(peak)
                progress(
                    f"{tag}: first use {first:,.0f} MB/s, warm {rate:,.0f} MB/s, "
                    f"peak RSS +{peak:,.0f} MB"
                )

    total = count * SIZE // MB
    pause = f"a {settle:.0f} s pause, then " if settle else ""
    section = Section(
        "payload",
        f"3. Large payloads: {count} x {SIZE // MB} MB, first use and warm",
        f"`bytes` and numpy `uint8` arrays of {SIZE // MB} MB each ({total:,} MB in all), each "
        f"library's `map` with its default chunking, {settings.workers} workers, median of "
        f"{reps} alternating run(s), a fresh process per run, both figures from the same "
        "process. **First use**: the pool's first payload `map`, on a pool just made (its start "
        f"and a warm-up of {settings.workers * 4} tiny tasks not timed; {pause}no payload moved "
        "before). **Warm**: the same `map` again right after it (the first-use pass is the "
        "untimed pass of earlier runs; see benchmarks/README.md). Peak RSS (warm pass): the "
        "parent's peak (`ru_maxrss`) minus its RSS just before the `map`.",
        [
            "API",
            "payload",
            "direction",
            "first use: MB/s",
            "first use: vs best peer",
            "warm: MB/s",
            "warm: vs best peer",
            "warm: parent peak RSS above start",
        ],
    )
    for direction in directions:
        kind, way = direction
        way = "results returned" if way == "results" else "arguments sent"
        best_first, first_peers = _best_peer(firsts, keys, direction)
        best, peer_rates = _best_peer(rates, keys, direction)
        for key in keys:
            v = VARIANTS[key]
            got = rates.get((key, direction))
            if not got:
                section.rows.append([v.label, kind, way, "not measured", *["—"] * 4])
                continue
            first = median(firsts[(key, direction)])
            rate = median(got)
            section.rows.append(
                [
                    v.label,
                    kind,
                    way,
                    fmt_rate(first),
                    _vs(key, first, best_first, first_peers),
                    fmt_rate(rate),
                    _vs(key, rate, best, peer_rates),
                    f"{median(peaks[(key, direction)]):,.0f} MB",
                ]
            )
        if best is None or best_first is None or not rates.get(("cb", direction)):
            continue
        cb_first = median(firsts[("cb", direction)])
        cb_rate = median(rates[("cb", direction)])
        section.notes.append(
            f"{kind} {way}: cleanbreak Pool.map **first use** {fmt_rate(cb_first)} MB/s = "
            f"{fmt_ratio(cb_first / first_peers[best_first])} of the best peer's first use "
            f"({VARIANTS[best_first].label}, {fmt_rate(first_peers[best_first])} MB/s); "
            f"**warm** {fmt_rate(cb_rate)} MB/s = {fmt_ratio(cb_rate / peer_rates[best])} of "
            f"the best warm peer ({VARIANTS[best].label}, {fmt_rate(peer_rates[best])} MB/s). "
            f"cleanbreak's first use is {fmt_ratio(cb_first / cb_rate)} of its warm figure. "
            "Every run, first use: cleanbreak "
            + ", ".join(f"{x:,.0f}" for x in firsts[("cb", direction)])
            + f" MB/s; {VARIANTS[best_first].label} "
            + ", ".join(f"{x:,.0f}" for x in firsts[(best_first, direction)])
            + " MB/s."
        )
    section.notes.append(
        f"Results returned: the parent ends up holding all {total:,} MB of results, so that is "
        "the floor for its peak; anything above it is the library's transient copies."
    )
    if settle:
        section.notes.append(
            f"First use: the {settle:.0f} s pause before it lets this virtual machine's host take "
            "back the memory the previous run freed (free page reporting, about 2 s after it is "
            "freed), so that every library's first pass starts from the same state, that of a "
            "script started on an idle machine: its fresh pages cost a host page fault each. The "
            "warm pass runs on memory the first pass freed moments before."
        )
    return section


def _best_peer(
    figures: dict[tuple[str, tuple[str, str]], list[float]],
    keys: list[str],
    direction: tuple[str, str],
) -> tuple[str | None, dict[str, float]]:
    """The fastest peer (not cleanbreak) by median, and every peer's median."""
    peers = {
        k: median(figures[(k, direction)])
        for k in keys
        if VARIANTS[k].lib != CB and figures.get((k, direction))
    }
    return (max(peers, key=lambda k: peers[k]) if peers else None), peers


def _vs(key: str, value: float, best: str | None, peers: dict[str, float]) -> str:
    if best is None:
        return "—"
    if key == best:
        return "best peer"
    return fmt_ratio(value / peers[best])
