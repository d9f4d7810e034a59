"""Measurement 14: the parent's peak memory while results stream through and are dropped.

``count`` tasks each return ``size`` bytes (1 MB by default), built in the worker. The caller
iterates over the results and drops each one as it arrives, as a streaming loop does: what the
parent holds is what the library holds for it, not what the caller kept. Each (library, API,
chunk size) runs in a fresh child process: the pool is opened and warmed up with a few tasks of
the same size through the same call, then the parent's peak RSS is started afresh
(``/proc/self/clear_refs``), its current RSS is read, the loop runs, and the figure is the peak
(``getrusage``'s ``ru_maxrss``) above that RSS. Each result's bytes are read once (a result
held in shared memory that was never touched would not count in the RSS yet). The chunk
sizes: each library's default, then 1, 10 and 200 (cleanbreak's default sizes chunks from the
task time, about 50 ms each).

The APIs: cleanbreak's ``Pool.map`` (ordered) and ``imap_unordered``;
``ProcessPoolExecutor.map`` (ordered; it has no unordered form); ``multiprocessing.Pool``'s
``imap`` and ``imap_unordered`` (its ``map`` returns a list, which holds every result).
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import tasks
from common import (
    Section,
    Settings,
    current_rss,
    median,
    peak_rss,
    progress,
    reset_peak_rss,
    run_child,
)
from libs import CB, CF, MP, available
from reporter import Reporter

MB = 1_000_000
COUNT, COUNT_QUICK = 1500, 300
SIZE = MB
CHUNKS: tuple[int | None, ...] = (None, 1, 10, 200)
# (library, API): the calls measured, each library's streaming forms.
CALLS = (
    (CB, "map"),
    (CB, "imap_unordered"),
    (CF, "map"),
    (MP, "imap"),
    (MP, "imap_unordered"),
)

Stream = Callable[[Callable[[int], Any], Iterable[int], int | None], Iterator[Any]]


def _streams(lib: str, api: str, workers: int) -> tuple[Any, Stream]:
    """The pool, and a function that streams ``fn`` over the items with a chunk size."""
    if lib == CB:
        import cleanbreak

        pool: Any = cleanbreak.Pool(workers)
        method = getattr(pool, api)
        return pool, lambda fn, items, chunk: method(fn, items, chunksize=chunk)
    if lib == CF:
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("forkserver")
        )
        return pool, lambda fn, items, chunk: pool.map(fn, items, chunksize=chunk or 1)
    pool = multiprocessing.get_context("forkserver").Pool(workers)
    method = getattr(pool, api)
    return pool, lambda fn, items, chunk: method(fn, items, chunksize=chunk or 1)


def child_memory(params: dict[str, Any], report: Reporter) -> None:
    workers: int = params["workers"]
    fn = functools.partial(tasks.make_bytes, size=params["size"])
    pool, stream = _streams(params["lib"], params["api"], workers)
    try:
        for _ in stream(fn, range(workers * 4), params["chunk"]):  # warm-up
            pass
        reset_peak_rss()
        before = current_rss()
        arrived = 0
        for result in stream(fn, range(params["count"]), params["chunk"]):
            # Every byte read: a result in shared memory never touched would not count yet.
            arrived += len(result) + result.count(b"\x00") * 0
            del result
        report({"peak_mb": (peak_rss() - before) / MB, "arrived": arrived})
    finally:
        if params["lib"] == MP:
            pool.terminate()
            pool.join()
        else:
            pool.shutdown()


def run_memory(settings: Settings) -> Section:
    count = COUNT_QUICK if settings.quick else COUNT
    reps = settings.repetitions(3, 1)
    section = Section(
        name="memory",
        title="14. The parent's peak memory: streaming results that the caller drops",
        intro=(
            f"{count:,} results of {SIZE // MB} MB each, dropped as they arrive; the parent's "
            f"peak RSS above its RSS before the loop, in MB (median of {reps}, each in a fresh "
            f"process, warm pool), {settings.workers} workers. `default` is each library's own "
            "chunk size (cleanbreak: sized from the task time; the others: 1)."
        ),
        header=["library, call", *("default" if c is None else str(c) for c in CHUNKS)],
    )
    for lib, api in CALLS:
        if not available(lib):
            continue
        row = [f"{lib} `{api}`"]
        for chunk in CHUNKS:
            progress(f"  memory: {lib} {api} chunksize={chunk}")
            peaks = []
            for _ in range(reps):
                params = {
                    "lib": lib,
                    "api": api,
                    "chunk": chunk,
                    "count": count,
                    "size": SIZE,
                    "workers": settings.workers,
                }
                result, why = run_child("memory", params, timeout=120)
                if result is None or result.get("arrived") != count * SIZE:
                    progress(f"    failed: {why or result}")
                    continue
                peaks.append(float(result["peak_mb"]))
            row.append(f"+{median(peaks):,.0f}" if peaks else "failed")
        section.rows.append(row)
    section.notes.append(
        "cleanbreak's worker sends what it holds once it passes 1 MB (or 50 ms), so "
        "`imap_unordered` holds about one message per worker whatever the chunk size; an "
        "ordered `map` also holds the results that came before their turn."
    )
    return section
