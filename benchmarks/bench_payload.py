"""Measurement 3: large payloads, both ways, with the parent's peak memory.

Results: ``count`` tasks each return ``size`` bytes, built in the worker. Arguments: ``count``
distinct ``size``-byte objects, built in the parent after the pool is open (so forked workers do
not inherit them), are mapped to a task that returns their length. Each is done with ``bytes``
and with numpy arrays (``uint8``), when numpy is installed.

Each (variant, direction, repetition) runs in a fresh child process. The pool is opened and
warmed up first, and on Linux the whole ``map`` runs once untimed: on a virtual machine whose
host takes back the memory its guest frees (virtio-balloon free page reporting, as on this
development machine), the first pass over a gigabyte of fresh memory pays a host page fault per
page, which made one library's figure vary by up to 5x from run to run; the untimed pass leaves
every library's timed pass on memory the kernel freed moments before, as in a long job. Then
the parent's peak RSS is started afresh (``/proc/self/clear_refs``), its current RSS is read
(``/proc/self/statm``), the ``map`` is timed, every byte of the results is read (a result held
in shared memory that was never touched would not count in the RSS yet), and the peak RSS comes
from ``getrusage(RUSAGE_SELF).ru_maxrss``, which the kernel keeps exactly. A fresh process per
measurement makes that peak belong to this measurement alone.
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


def child_payload(params: dict[str, Any], report: Reporter) -> None:
    count: int = params["count"]
    size: int = params["size"]
    workers: int = params["workers"]
    make = tasks.make_array if params["kind"] == "numpy" else tasks.make_bytes
    with mapper(params["variant"], workers, 1) as run:
        run(tasks.inc, list(range(workers * 4)))  # warm-up
        fn: Any
        if params["direction"] == "args":
            items: list[Any] = [make(i, size) for i in range(count)]
            fn = tasks.length
        else:
            items = list(range(count))
            fn = functools.partial(make, size=size)
        if reset_peak_rss():  # where the peak can be started afresh after it (Linux):
            run(fn, items)  # one untimed pass first (see the top of this module)
            gc.collect()
            reset_peak_rss()
        gc.collect()
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
    if not ok:
        raise AssertionError(f"{params['variant']}: wrong results")
    report(
        {
            "seconds": seconds,
            "bytes": count * size,
            "peak_over_start": peak - start_rss,
            "peak_set_before": peak == peak_before,
        }
    )


def _every_byte_is(data: Any, value: int) -> bool:
    """Read all of ``data`` without allocating a copy of it."""
    if isinstance(data, bytes):
        return data.count(bytes((value,))) == len(data)
    return bool(data.min() == value == data.max())


def run_payload(settings: Settings) -> Section:
    count = COUNT_QUICK if settings.quick else COUNT
    reps = settings.repetitions(3, 1)
    # cleanbreak.map moves data exactly as Pool.map does; leaving it out saves a sixth of the time.
    keys = [k for k in DEFAULT_VARIANTS if k != "cb-fn" and available(VARIANTS[k].lib)]
    kinds = ("bytes", "numpy") if importlib.util.find_spec("numpy") else ("bytes",)
    directions = [(kind, d) for kind in kinds for d in ("results", "args")]
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
                }
                result, why = run_child("payload", params, 180)
                tag = f"  payload {' '.join(direction)} rep {rep + 1}/{reps} {key}"
                if result is None:
                    progress(f"{tag}: FAILED ({why})")
                    continue
                rate = result["bytes"] / MB / result["seconds"]
                peak = result["peak_over_start"] / MB
                rates.setdefault((key, direction), []).append(rate)
                peaks.setdefault((key, direction), []).append(peak)
                progress(f"{tag}: {rate:,.0f} MB/s, peak RSS +{peak:,.0f} MB")

    total = count * SIZE // MB
    section = Section(
        "payload",
        f"3. Large payloads: {count} x {SIZE // MB} MB",
        f"`bytes` and numpy `uint8` arrays of {SIZE // MB} MB each ({total:,} MB in all), each "
        "library's `map` with its "
        f"default chunking, {settings.workers} workers, warm pool (and one untimed pass first, "
        f"see benchmarks/README.md), median of {reps} alternating "
        "run(s), a fresh process per run. Peak RSS: the parent's peak (`ru_maxrss`) minus its "
        "RSS just before the `map`.",
        ["API", "payload", "direction", "MB/s", "vs best peer", "parent peak RSS above start"],
    )
    for direction in directions:
        peer_rates = {
            k: median(rates[(k, direction)])
            for k in keys
            if VARIANTS[k].lib != CB and rates.get((k, direction))
        }
        best = max(peer_rates, key=lambda k: peer_rates[k]) if peer_rates else None
        kind, way = direction
        way = "results returned" if way == "results" else "arguments sent"
        label = f"{kind} {way}"
        for key in keys:
            v = VARIANTS[key]
            got = rates.get((key, direction))
            if not got:
                section.rows.append([v.label, kind, way, "not measured", "—", "—"])
                continue
            rate = median(got)
            ratio = fmt_ratio(rate / peer_rates[best]) if best else "—"
            if key == best:
                ratio = "best peer"
            section.rows.append(
                [
                    v.label,
                    kind,
                    way,
                    fmt_rate(rate),
                    ratio,
                    f"{median(peaks[(key, direction)]):,.0f} MB",
                ]
            )
        if best is not None and rates.get(("cb", direction)):
            cb_rate = median(rates[("cb", direction)])
            section.notes.append(
                f"{label}: best peer {VARIANTS[best].label} at {fmt_rate(peer_rates[best])} MB/s; "
                f"cleanbreak Pool.map {fmt_rate(cb_rate)} MB/s = "
                f"{fmt_ratio(cb_rate / peer_rates[best])} of it."
            )
    section.notes.append(
        f"Results returned: the parent ends up holding all {total:,} MB of results, so that is "
        "the floor for its peak; anything above it is the library's transient copies."
    )
    return section
