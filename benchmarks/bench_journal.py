"""Measurement 8: what the on-disk journal costs, side by side with joblib's ``Memory``.

The same job runs with and without the library's on-disk record of results: cleanbreak's
``Pool(workers, journal=PATH)`` (one SQLite file, written by a thread of the parent) against a
plain ``Pool``, and joblib's ``Parallel(n_jobs)(delayed(Memory(DIR).cache(f))(x) ...)`` (one
folder per call, written by the workers) against a plain ``Parallel``. Two jobs: 1 ms tasks
(the overhead per task) and tasks that each return a 50 MB numpy array (the cost per byte).

Each (library, job, with or without the record, repetition) runs in a fresh child process, in
a fresh temporary folder under ``/tmp`` that the child deletes at the end. The child times:

1. *one-shot*: the whole job in one call that starts the workers itself, in the fresh
   process: ``cleanbreak.map(f, xs, workers=N[, journal=PATH])``, or joblib's first
   ``Parallel`` call (which starts loky's executor). With the record, this creates it (the
   journal file, or the cache folder), and for cleanbreak it includes the last commit (the
   pool's exit commits what is queued): all a user waits for. The size of the record on disk
   is read after it.
2. *warm*: a pool already started and warmed up (each worker ran tasks of the same function,
   on other items), with a record of its own, new: one ``list(pool.map(f, xs))`` (joblib: one
   ``Parallel`` call on the executor left by the one-shot call). For the 50 MB job, one untimed
   pass over other items comes first, as in measurement 3 (see its module). For cleanbreak, the
   time until the journal has committed every result (``pool.journal.flush()``) is taken too:
   ``map`` returns when the results are in, while the journal's writer may still be busy.
3. *resume* (with the record only): the same job again over the warm record; every result
   comes from it. cleanbreak opens a new ``Pool`` on the journal (not timed) and times its
   ``map``; joblib runs ``Parallel`` again on its warm executor. The parent's peak RSS above
   its RSS before the call is taken here (``ru_maxrss``, started afresh on Linux), after every
   byte of the results was read.

Repetitions run every variant once, in an order rotated from one repetition to the next; the
tables show medians. The figures with and without the record come from different processes, so
their ratio is a ratio of medians.
"""

from __future__ import annotations

import functools
import gc
import importlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tasks
from common import (
    Section,
    Settings,
    current_rss,
    fmt_ratio,
    fmt_seconds,
    median,
    peak_rss,
    progress,
    reset_peak_rss,
    rotated,
    run_child,
)
from libs import CB, JOBLIB, available
from reporter import Reporter

MB = 1_000_000
MS_TASKS, MS_TASKS_QUICK = 2_000, 600
MB_COUNT, MB_COUNT_QUICK = 8, 4
SIZE = 50 * MB
TMP_ROOT = "/tmp"  # the records go to a real disk here, not to a tmpfs
JOURNAL_TARGET = 0.05  # the overhead the journal should stay within on 1 ms tasks

MapFn = Callable[[Callable[[Any], Any], list[Any]], list[Any]]
Flush = Callable[[], None]


@dataclass(frozen=True)
class Store:
    """One way of running the job: a library, with or without its on-disk record."""

    key: str
    lib: str
    cached: bool
    warm_label: str
    cold_label: str


STORES: tuple[Store, ...] = (
    Store("cb", CB, False, "cleanbreak Pool.map", "cleanbreak.map(f, xs)"),
    Store(
        "cb-journal",
        CB,
        True,
        "cleanbreak Pool(journal=).map",
        "cleanbreak.map(f, xs, journal=)",
    ),
    Store(
        "joblib",
        JOBLIB,
        False,
        "joblib Parallel(n_jobs)(delayed(f)(x) …)",
        "joblib Parallel(n_jobs)(delayed(f)(x) …), fresh process",
    ),
    Store(
        "joblib-memory",
        JOBLIB,
        True,
        "joblib Parallel(n_jobs)(delayed(Memory.cache(f))(x) …)",
        "joblib Parallel(n_jobs)(delayed(Memory.cache(f))(x) …), fresh process",
    ),
)
STORE = {s.key: s for s in STORES}
PAIRS = (("cb", "cb-journal"), ("joblib", "joblib-memory"))


# ── the child ────────────────────────────────────────────────────────────────────────────────


def _task(job: str, size: int) -> Callable[[Any], Any]:
    if job == "ms":
        return tasks.busy_1ms
    make = tasks.make_array if importlib.util.find_spec("numpy") else tasks.make_bytes
    return functools.partial(make, size=size)


@contextmanager
def _opened(lib: str, workers: int, record: Path | None) -> Iterator[tuple[MapFn, Flush]]:
    """A started pool (cleanbreak) or executor (joblib's loky), with ``record`` as its journal
    or ``Memory`` folder: a ``map(fn, items) -> list``, and a ``flush()`` that returns once the
    record holds every result (joblib's workers write it before they return a result)."""
    if lib == CB:
        import cleanbreak

        with cleanbreak.Pool(workers, journal=record) as pool:
            journal = pool.journal

            def flush() -> None:
                if journal is not None:
                    journal.flush()

            yield (lambda fn, items: list(pool.map(fn, items))), flush
    else:
        from joblib import Memory, Parallel, delayed

        memory = Memory(str(record), verbose=0) if record is not None else None

        def joblib_map(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
            f = memory.cache(fn) if memory is not None else fn
            return list(Parallel(n_jobs=workers, backend="loky")(delayed(f)(x) for x in items))

        yield joblib_map, lambda: None


def _cold_run(lib: str, workers: int, record: Path | None, fn: Any, items: list[Any]) -> Any:
    """The whole job in one call that starts (and, for cleanbreak, stops) the workers."""
    if lib == CB:
        import cleanbreak

        return cleanbreak.map(fn, items, workers=workers, journal=record)
    with _opened(lib, workers, record) as (run, _):  # loky's executor starts in the first call
        return run(fn, items)


def _check(out: list[Any], job: str, items: list[Any], size: int) -> None:
    """Every result is there and right; for payloads every byte is read (see measurement 3)."""
    if job == "ms":
        ok = out == items
    else:
        ok = len(out) == len(items) and all(
            len(r) == size and _every_byte_is(r, i % 256) for i, r in zip(items, out, strict=True)
        )
    if not ok:
        raise AssertionError("wrong results")


def _every_byte_is(data: Any, value: int) -> bool:
    if isinstance(data, bytes):
        return data.count(bytes((value,))) == len(data)
    return bool(data.min() == value == data.max())


def _disk_usage(record: Path) -> tuple[int, int, int]:
    """Bytes, bytes allocated on disk and files of a journal (the file, ``-wal`` and ``-shm``,
    and the folder of its large results) or of a joblib cache folder."""
    if record.is_dir():
        paths = [Path(d, f) for d, _, files in os.walk(record) for f in files]
    else:
        paths = [p for p in (Path(f"{record}{s}") for s in ("", "-wal", "-shm")) if p.exists()]
        folder = Path(f"{record}.d")
        paths += [Path(d, f) for d, _, files in os.walk(folder) for f in files]
    stats = [p.stat() for p in paths]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats), len(stats)


def child_journal(params: dict[str, Any], report: Reporter) -> None:
    store = STORE[params["store"]]
    job: str = params["job"]
    n: int = params["n"]
    size: int = params["size"]
    workers: int = params["workers"]
    fn = _task(job, size)
    items = list(range(n))
    warmup = list(range(-2 * workers, 0))  # other items: the record does not hold them yet
    lib = importlib.import_module(store.lib)  # imported before any clock starts
    if store.lib == CB:  # with the pool's modules, which the package imports on first use
        _ = (lib.Pool, lib.map)
    tmp = Path(tempfile.mkdtemp(prefix="cb-bench-journal-", dir=TMP_ROOT))
    found: dict[str, Any] = {}
    try:
        name = "journal.sqlite" if store.lib == CB else "memory"
        cold_record = tmp / f"cold-{name}" if store.cached else None
        warm_record = tmp / f"warm-{name}" if store.cached else None

        start = time.perf_counter()
        out = _cold_run(store.lib, workers, cold_record, fn, items)
        found["cold"] = time.perf_counter() - start
        _check(out, job, items, size)
        del out
        if cold_record is not None:
            found["disk"] = _disk_usage(cold_record)
        gc.collect()

        with _opened(store.lib, workers, warm_record) as (run, flush):
            run(fn, warmup)
            if job == "mb":  # one untimed pass over other items (see measurement 3)
                run(fn, list(range(n, 2 * n)))
            flush()  # the journal's writer is idle when the clock starts
            gc.collect()
            start = time.perf_counter()
            out = run(fn, items)
            found["warm"] = time.perf_counter() - start
            flush()
            found["committed"] = time.perf_counter() - start
            _check(out, job, items, size)
            del out
            gc.collect()

        if warm_record is not None:
            with _opened(store.lib, workers, warm_record) as (run, _):
                gc.collect()
                reset_peak_rss()
                start_rss = current_rss()
                start = time.perf_counter()
                out = run(fn, items)
                found["resume"] = time.perf_counter() - start
                _check(out, job, items, size)
                found["resume_peak"] = peak_rss() - start_rss
                del out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(found)


# ── the runner ───────────────────────────────────────────────────────────────────────────────

Figures = dict[str, list[Any]]


def _measure(settings: Settings, job: str, n: int, size: int, reps: int) -> dict[str, Figures]:
    keys = [s.key for s in STORES if available(s.lib)]
    found: dict[str, Figures] = {k: {} for k in keys}
    for rep in range(reps):
        for key in rotated(keys, rep):
            params = {"store": key, "job": job, "n": n, "size": size, "workers": settings.workers}
            result, why = run_child("journal", params, 300)
            tag = f"  journal {job} rep {rep + 1}/{reps} {key}"
            if result is None:
                progress(f"{tag}: FAILED ({why})")
                continue
            for name, value in result.items():
                found[key].setdefault(name, []).append(value)
            line = f"one-shot {result['cold']:.2f} s, warm {result['warm']:.3f} s"
            if key == "cb-journal":
                line += f" (all committed {result['committed']:.3f} s)"
            if "resume" in result:
                line += f", resume {result['resume']:.3f} s"
            progress(f"{tag}: {line}")
    return found


def _mount_of(path: str) -> str:
    """The filesystem ``path`` is on, as ``type (device)``, from ``/proc/mounts``."""
    best = ("", "unknown filesystem")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, point, kind = line.split()[:3]
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best[0]):
                    best = (point, f"{kind} ({device})")
    except OSError:
        pass
    return best[1]


def _size(value: float) -> str:
    if value >= 10 * MB:
        return f"{value / MB:,.0f} MB"
    if value >= 10_000:
        return f"{value / 1000:,.0f} kB"
    return f"{value:,.0f} B"


def run_journal(settings: Settings) -> list[Section]:
    sections = []
    for job in ("ms", "mb"):
        if job == "ms":
            n, size = (MS_TASKS_QUICK if settings.quick else MS_TASKS), 0
            reps = settings.repetitions(5, 2)
        else:
            n, size = (MB_COUNT_QUICK if settings.quick else MB_COUNT), SIZE
            reps = settings.repetitions(3, 1)
        found = _measure(settings, job, n, size, reps)
        sections.append(_section(settings, job, n, size, reps, found))
    return sections


def _section(
    settings: Settings, job: str, n: int, size: int, reps: int, found: dict[str, Figures]
) -> Section:
    payload = job == "mb"
    kind = "numpy arrays" if importlib.util.find_spec("numpy") else "bytes"
    if payload:
        title = f"8b. Journal overhead: {n} results of {size // MB} MB"
        what = f"{n} tasks that each return a {size // MB} MB {kind[:-1]} ({n * size // MB:,} MB)"
    else:
        title = f"8a. Journal overhead: {n:,} tasks that busy-wait 1 ms"
        what = f"{n:,} tasks that busy-wait 1 ms"

    def med(key: str, name: str) -> float | None:
        values = found.get(key, {}).get(name)
        return median(values) if values else None

    def timing(seconds: float | None) -> str:
        if seconds is None:
            return "—"
        rate = n * size / MB / seconds if payload else n / seconds
        unit = " MB/s" if payload else "/s"
        return f"{fmt_seconds(seconds)} ({rate:,.0f}{unit})"

    section = Section(
        f"journal-{job}",
        title,
        f"{what} on {settings.workers} workers, each library with and without its on-disk "
        "record of results: cleanbreak's `journal=` (one SQLite file, written by a thread of the "
        "parent) and joblib's `Memory` (a folder per call, written by the workers). Median of "
        f"{reps} alternating run(s), a fresh process and a fresh temporary folder on "
        f"{_mount_of(TMP_ROOT)} per run. **warm**: the pool (joblib: loky's executor) was "
        "started and warmed up before the timed call, and the record is new; **one-shot**: the "
        "timed call starts the workers and creates the record (what a script's single call "
        "costs). Resume: the same job again, every result from the record (warm). Overhead: "
        "first run with the record against the same call without (lower is better); resume: "
        "speed-up over the run without a record.",
        [
            "API",
            "timing",
            "without record",
            "with record, first run",
            "overhead",
            "first run, until all committed",
            "resume",
            "resume vs without",
            "parent peak RSS above start, resume",
        ],
    )
    for plain, cached in PAIRS:
        store = STORE[cached]
        if plain not in found or cached not in found:
            section.rows.append([store.warm_label, "—", "not measured", *["—"] * 6])
            continue
        pool = "pool" if store.lib == CB else "executor"
        for mode in ("warm", "cold"):
            without = med(plain, mode)
            with_ = med(cached, mode)
            overhead = "—"
            if without and with_:
                overhead = f"{with_ / without - 1:+.1%} ({fmt_ratio(with_ / without)})"
            if mode == "warm":
                committed = timing(med(cached, "committed")) if store.lib == CB else "same ¹"
                resume = med(cached, "resume")
                speedup = fmt_ratio(without / resume) if without and resume else "—"
                peak = med(cached, "resume_peak")
                section.rows.append(
                    [
                        store.warm_label,
                        f"warm {pool}",
                        timing(without),
                        timing(with_),
                        overhead,
                        committed,
                        timing(resume),
                        speedup,
                        f"{max(peak, 0) / MB:,.0f} MB" if peak is not None else "—",
                    ]
                )
            else:
                section.rows.append(
                    [
                        store.cold_label,
                        "one-shot: incl. worker start" + (" and exit" if store.lib == CB else ""),
                        timing(without),
                        timing(with_),
                        overhead,
                        "included ²" if store.lib == CB else "same ¹",
                        "—",
                        "—",
                        "—",
                    ]
                )
    _notes(section, job, n, size, found)
    return section


def _notes(section: Section, job: str, n: int, size: int, found: dict[str, Figures]) -> None:
    notes = section.notes
    cb_plain = found.get("cb", {}).get("warm")
    cb_journal = found.get("cb-journal", {}).get("warm")
    if job == "ms" and cb_plain and cb_journal:
        overhead = median(cb_journal) / median(cb_plain) - 1
        verdict = "within" if overhead <= JOURNAL_TARGET else "**over**"
        notes.append(
            f"cleanbreak journal on 1 ms tasks, warm pool: {overhead:+.1%}, {verdict} the "
            f"{JOURNAL_TARGET:.0%} target."
        )
    for plain, cached in PAIRS:
        a, b = found.get(plain, {}).get("warm"), found.get(cached, {}).get("warm")
        if a and b:
            notes.append(
                f"Every run, warm, {STORE[plain].warm_label}: without "
                f"{', '.join(f'{x:.3f}' for x in a)} s; with "
                f"{', '.join(f'{x:.3f}' for x in b)} s (the spread is the noise)."
            )
    for cached in ("cb-journal", "joblib-memory"):
        disk = found.get(cached, {}).get("disk")
        if not disk:
            continue
        nbytes, allocated, files = (median(d[i] for d in disk) for i in range(3))
        what = "journal" if cached == "cb-journal" else "joblib Memory cache"
        notes.append(
            f"On disk after the one-shot job, {what}: {_size(nbytes)} in {files:.0f} file(s) "
            f"({_size(allocated)} allocated), {_size(nbytes / n)} per result"
            + (f" of {size // MB} MB" if size else "")
            + "."
        )
    notes.append(
        "¹ joblib's workers write each result to the cache before they return it: the first "
        "run is over when the record is complete."
    )
    notes.append(
        "² cleanbreak.map closes its pool, which commits what the journal has queued. In the "
        "warm row, `pool.journal.flush()` after `map` returns times the last commit (the "
        "journal's writer commits whatever is queued as soon as it is free)."
    )
    if job == "mb":
        notes.append(
            f"Peak RSS: the parent ends up holding all {n * size // MB:,} MB of results, so that "
            "is the floor; anything above it is transient copies."
        )
