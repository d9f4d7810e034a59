"""Measurement 4: how far ahead each library reads an endless input.

The input is ``itertools.count()`` behind a generator that counts what was taken from it and
publishes the count in a shared 8-byte memory map, so the runner can read it even while the
child is stuck inside a call that never returns. The child calls each library's lazy API with
the task ``x -> x+1``, takes the first result, records how many items had been pulled, then
waits ``IDLE`` seconds without taking more and records the count and its RSS again: a library
with bounded read-ahead stops pulling once its buffer is full.

The runner stops a child that has not yielded within the deadline, or whose RSS passes the
limit, and reports how many items it had pulled by then.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tasks
from common import Child, Section, Settings, current_rss, progress
from libs import CB, CF, JOBLIB, LOKY, MP, MPIRE, PEBBLE, available
from reporter import Reporter

IDLE = 2.0
DEADLINE, DEADLINE_QUICK = 10.0, 3.0
RSS_LIMIT = 2 * 2**30
COUNTER = struct.Struct("<QQ")  # items pulled, the child's RSS before the lazy call

LazyMap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


@dataclass(frozen=True)
class LazyApi:
    key: str
    lib: str
    label: str


LAZY_APIS: tuple[LazyApi, ...] = (
    LazyApi("mp", MP, "multiprocessing Pool.imap"),
    LazyApi("cf", CF, "ProcessPoolExecutor.map"),
    LazyApi("loky", LOKY, "loky executor.map"),
    LazyApi("pebble", PEBBLE, "pebble ProcessPool.map(…).result()"),
    LazyApi("mpire", MPIRE, "mpire WorkerPool.imap (chunk_size=1) ¹"),
    LazyApi("joblib", JOBLIB, 'joblib Parallel(return_as="generator")'),
    LazyApi("cb", CB, "cleanbreak Pool.map"),
    LazyApi("cb-imap", CB, "cleanbreak Pool.imap_unordered"),
)


@contextmanager
def lazy_mapper(key: str, workers: int) -> Iterator[LazyMap]:
    """An open pool, and the library's lazy ``map(fn, iterable) -> iterator``."""
    if key == "mp":
        import multiprocessing

        with multiprocessing.Pool(workers) as mp_pool:
            yield mp_pool.imap
    elif key == "cf":
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as executor:
            yield executor.map
    elif key == "loky":
        from loky import get_reusable_executor

        yield get_reusable_executor(max_workers=workers).map
    elif key == "pebble":
        from pebble import ProcessPool

        with ProcessPool(max_workers=workers) as pebble_pool:
            yield lambda fn, items: iter(pebble_pool.map(fn, items).result())
    elif key == "mpire":
        from mpire.pool import WorkerPool

        with WorkerPool(n_jobs=workers) as mpire_pool:
            yield lambda fn, items: iter(mpire_pool.imap(fn, items, chunk_size=1))
    elif key == "joblib":
        from joblib import Parallel, delayed

        def joblib_lazy(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
            run = Parallel(n_jobs=workers, return_as="generator")
            return iter(run(delayed(fn)(x) for x in items))

        yield joblib_lazy
    elif key in ("cb", "cb-imap"):
        import cleanbreak

        with cleanbreak.Pool(workers) as cb_pool:
            yield cb_pool.map if key == "cb" else cb_pool.imap_unordered
    else:
        raise ValueError(f"unknown lazy API {key!r}")


def child_lazy(params: dict[str, Any], report: Reporter) -> None:
    fd = os.open(params["counter"], os.O_RDWR)
    shared = mmap.mmap(fd, COUNTER.size)
    pulled = 0
    rss0 = 0

    def counting() -> Iterator[int]:
        nonlocal pulled
        for x in itertools.count():
            pulled += 1
            COUNTER.pack_into(shared, 0, pulled, rss0)
            yield x

    with lazy_mapper(params["key"], params["workers"]) as lazy:
        for _ in lazy(tasks.inc, range(params["workers"] * 2)):  # warm-up: start the workers
            pass
        rss0 = current_rss()
        COUNTER.pack_into(shared, 0, 0, rss0)
        start = time.monotonic()
        results = lazy(tasks.inc, counting())
        first = next(results)
        elapsed = time.monotonic() - start
        at_first = pulled
        time.sleep(IDLE)
        report(
            {
                "first": first,
                "seconds": elapsed,
                "at_first": at_first,
                "after_idle": pulled,
                "rss_growth": current_rss() - rss0,
            }
        )
        # Leave without closing the pool: for some libraries that would wait for an endless
        # input. The runner kills whatever is left in the session.
        os._exit(0)


def read_counter(path: Path) -> tuple[int, int]:
    """Items pulled so far, and the child's RSS before the lazy call (0 until it is known)."""
    data = path.read_bytes()
    if len(data) < COUNTER.size:
        return 0, 0
    pulled, rss0 = COUNTER.unpack(data[: COUNTER.size])
    return pulled, rss0


def run_lazy(settings: Settings) -> Section:
    deadline = DEADLINE_QUICK if settings.quick else DEADLINE
    section = Section(
        "lazy",
        "4. Endless input: items pulled ahead of the first result",
        f"Each library's lazy API over a counting wrapper of `itertools.count()`, task x -> x+1, "
        f'{settings.workers} workers. "Pulled" = items taken from the generator. Stopped '
        f"after {deadline:.0f} s without a result, or at {RSS_LIMIT // 2**30} GiB RSS.",
        [
            "API",
            "first result after",
            "pulled at first result",
            f"pulled {IDLE:.0f} s later (caller idle)",
            "RSS growth by then",
        ],
    )
    for api in LAZY_APIS:
        if not available(api.lib):
            section.rows.append([api.label, "not installed", "—", "—", "—"])
            continue
        row = _run_one(api, settings.workers, deadline)
        progress(f"  lazy {api.key}: {' | '.join(row[1:])}")
        section.rows.append([api.label, *row[1:]])
    section.notes.append(
        "¹ Without chunk_size (or iterable_len) mpire refuses an input that has no len(): "
        '"Either iterable_len or an iterable with a len() function should be provided".'
    )
    section.notes.append(
        "ProcessPoolExecutor.map and loky's map submit the whole input before returning "
        "(Python 3.14 adds a buffersize argument); pebble's map does the same."
    )
    return section


def _run_one(api: LazyApi, workers: int, deadline: float) -> list[str]:
    counter = Path(os.environ.get("TMPDIR", "/tmp")) / f"cb-bench-counter-{os.getpid()}"
    counter.write_bytes(bytes(COUNTER.size))
    try:
        with Child("lazy", {"key": api.key, "workers": workers, "counter": str(counter)}) as child:
            limit = time.monotonic() + deadline + IDLE + 10  # start-up and warm-up, then deadline
            first_by: float | None = None
            peak = 0
            while True:
                if child.wait(0.05):
                    break
                with contextlib.suppress(psutil.Error):
                    peak = max(peak, psutil.Process(child.pid).memory_info().rss)
                pulled, _ = read_counter(counter)
                if pulled and first_by is None:
                    first_by = time.monotonic() + deadline  # the clock starts at the first pull
                if peak > RSS_LIMIT or (first_by and time.monotonic() > first_by):
                    break
                if time.monotonic() > limit:
                    break
            result = child.result()
            pulled, rss0 = read_counter(counter)
            if result is not None:
                return [
                    api.label,
                    f"{result['seconds'] * 1000:,.0f} ms",
                    f"{result['at_first']:,}",
                    f"{result['after_idle']:,}",
                    f"{result['rss_growth'] / 2**20:,.0f} MiB",
                ]
            if child.proc.poll() is not None:
                return [api.label, f"failed: {child.output_tail(1)}", f"{pulled:,}", "—", "—"]
            why = "RSS limit" if peak > RSS_LIMIT else f"{deadline:.0f} s deadline"
            return [
                api.label,
                f"no result ({why})",
                f"> {pulled:,} (still pulling)",
                "—",
                f"{(peak - rss0) / 2**20:,.0f} MiB when stopped",
            ]
    finally:
        counter.unlink(missing_ok=True)
