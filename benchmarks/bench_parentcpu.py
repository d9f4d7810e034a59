"""Measurement 11: the parent's CPU time per task, and the worker count it would saturate at.

Every task passes through the parent: it sends the arguments, receives the result, and runs
the pool's own threads. Here is what that costs the parent in CPU time per task, on a warm pool
of cleanbreak, ``multiprocessing.Pool`` and ``ProcessPoolExecutor``, for two jobs: tiny tasks
``x -> x+1`` (chunksize as measurement 1: ``Pool.map``'s pick, passed to the executor) and
tasks that each return 1 MB of ``bytes`` (default chunking, as measurement 3).

Each (library, job, repetition) runs in a fresh child process. The pool is opened, warmed up
with a few tiny tasks, and the whole ``map`` runs once untimed (as in measurement 3: a pool in
its steady state, on memory freed moments before). Then one ``map`` is timed, in wall time and
in CPU time:

- the parent's: ``getrusage(RUSAGE_SELF)`` (user and system time of every thread of the
  parent, and of nothing else) before and after the call;
- the pool's processes' (workers and helpers such as a fork server): the sum, over every other
  live process of the child's session, of its CPU clock (``clock_gettime`` on the process's CPU
  clock id: every thread, nanosecond resolution) before and after the call.

For the 1 MB job the parent's CPU is also taken after it has read every byte of the results
(``bytes.count``), since a result that lives in shared memory costs its page faults only when
it is first read.
"""

from __future__ import annotations

import functools
import gc
import os
import resource
import time
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
    session_members,
)
from libs import VARIANTS, available, mapper, pool_chunksize
from reporter import Reporter

MB = 1_000_000
TINY, TINY_QUICK = 1_000_000, 200_000
MB_COUNT, MB_COUNT_QUICK = 1_000, 200
SIZE = 1 * MB

LIBS = ("cb", "mp", "cf")
LABELS = {
    "cb": "cleanbreak Pool.map",
    "mp": "multiprocessing.Pool.map",
    "cf": "ProcessPoolExecutor.map",
}
JOBS = {"tiny": "tiny tasks (x -> x+1)", "mb": f"results of {SIZE // MB} MB (bytes)"}


def _variant(lib: str, job: str) -> str:
    """The ``libs.mapper`` variant: the executor gets Pool.map's chunksize for tiny tasks."""
    return "cf-chunk" if lib == "cf" and job == "tiny" else lib


def _parent_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _process_cpu(pid: int) -> float | None:
    """The CPU time of every thread of process ``pid`` so far (Linux: its CPU clock)."""
    clock = ((~pid) << 3) | 2  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    try:
        return time.clock_gettime(clock)
    except OSError:  # it has exited
        return None


def _pool_cpu() -> dict[int, float]:
    """CPU time so far of every other live process of this session: the pool's processes."""
    me = os.getpid()
    out = {}
    for proc in session_members(os.getsid(0), exclude=me):
        cpu = _process_cpu(proc.pid)
        if cpu is not None:
            out[proc.pid] = cpu
    return out


def child_parentcpu(params: dict[str, Any], report: Reporter) -> None:
    job: str = params["job"]
    n: int = params["n"]
    workers: int = params["workers"]
    items = list(range(n))
    fn: Any = tasks.inc if job == "tiny" else functools.partial(tasks.make_bytes, size=SIZE)
    with mapper(_variant(params["lib"], job), workers, pool_chunksize(n, workers)) as run:
        run(tasks.inc, list(range(workers * 4)))  # warm-up
        run(fn, items)  # one untimed pass: the pool in its steady state
        gc.collect()
        pool_before = _pool_cpu()
        user0, sys0 = _parent_cpu()
        start = time.perf_counter()
        out = run(fn, items)
        seconds = time.perf_counter() - start
        user1, sys1 = _parent_cpu()
        pool_after = _pool_cpu()
        if job == "tiny":
            ok = len(out) == n and sum(out) == sum(items) + n
        else:  # reading every byte: a result in shared memory is paged in only now
            ok = len(out) == n and all(
                len(r) == SIZE and r.count(bytes((i % 256,))) == SIZE for i, r in enumerate(out)
            )
        user2, sys2 = _parent_cpu()
    if not ok:
        raise AssertionError(f"{params['lib']}: wrong results")
    # Processes present both before and after (a worker replaced mid-call would be missed).
    pool_cpu = sum(pool_after[p] - pool_before[p] for p in pool_after if p in pool_before)
    report(
        {
            "seconds": seconds,
            "user": user1 - user0,
            "sys": sys1 - sys0,
            "read": (user2 + sys2) - (user1 + sys1),
            "pool": pool_cpu,
            "pool_processes": len(pool_after),
            "lost": len(set(pool_before) ^ set(pool_after)),
        }
    )


def _us(seconds: float, unit: str = " µs") -> str:
    """Seconds as microseconds, to three significant figures (whole ones from 100 up)."""
    us = seconds * 1e6
    return (f"{us:,.0f}" if us >= 100 else f"{us:.3g}") + unit


def run_parentcpu(settings: Settings) -> Section:
    counts = {
        "tiny": TINY_QUICK if settings.quick else TINY,
        "mb": MB_COUNT_QUICK if settings.quick else MB_COUNT,
    }
    reps = settings.repetitions(3, 1)
    libs = [lib for lib in LIBS if available(VARIANTS[lib].lib)]
    found: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rep in range(reps):
        for job, n in counts.items():
            for lib in rotated(libs, rep):
                params = {"lib": lib, "job": job, "n": n, "workers": settings.workers}
                result, why = run_child("parentcpu", params, 180)
                tag = f"  parentcpu {job} rep {rep + 1}/{reps} {lib}"
                if result is None:
                    progress(f"{tag}: FAILED ({why})")
                    continue
                found.setdefault((lib, job), []).append(result)
                parent = (result["user"] + result["sys"]) / n * 1e6
                pool = result["pool"] / n * 1e6
                progress(
                    f"{tag}: {fmt_seconds(result['seconds'])}, parent {parent:.2f} µs/task, "
                    f"pool processes {pool:.2f} µs/task"
                    + (f", {result['lost']:.0f} process(es) came or went" if result["lost"] else "")
                )

    w = settings.workers
    section = Section(
        "parentcpu",
        "11. Parent CPU per task, and where the parent would saturate a core",
        f"A warm pool of {w} workers (one untimed pass of the same `map` first), one timed "
        f"`map`, median of {reps} alternating run(s), a fresh process per run. **Parent CPU**: "
        "user + system time of the parent process alone (all its threads; "
        "`getrusage(RUSAGE_SELF)` around the call, pool start excluded), against the cheaper "
        "of Pool and ProcessPoolExecutor (lower is better). **Pool CPU**: the CPU "
        "time of the pool's processes (workers and helpers) over the same call. c = parent CPU "
        "per task, w = pool CPU per task; a worker kept busy does R = 1 / w tasks/s, so the "
        "parent needs c x R x W of a core for W workers and saturates one core at "
        "**W\\* = 1 / (c x R) = w / c** workers.",
        [
            "job",
            "API",
            "wall time",
            "tasks/s",
            "parent CPU per task (user + sys ²)",
            "vs cheapest of Pool/PPE",
            "pool CPU per task (w)",
            "R = 1 / w per worker",
            "parent saturates one core at W* = w / c",
            "parent CPU per task, incl. reading every byte",
        ],
    )
    for job, n in counts.items():
        label = f"{n:,} {JOBS[job]}"
        med: dict[str, dict[str, float]] = {}
        for lib in libs:
            runs = found.get((lib, job))
            if runs:
                med[lib] = {k: median(r[k] for r in runs) for k in ("seconds", "read")}
                # The user/system split of the run whose parent CPU is the median one.
                middle = sorted(runs, key=lambda r: r["user"] + r["sys"])[(len(runs) - 1) // 2]
                med[lib]["user"], med[lib]["sys"] = middle["user"], middle["sys"]
                med[lib]["parent"] = median((r["user"] + r["sys"]) / n for r in runs)
                med[lib]["pool"] = median(r["pool"] / n for r in runs)
                med[lib]["total"] = median((r["user"] + r["sys"] + r["read"]) / n for r in runs)
        peers: list[str] = [k for k in ("mp", "cf") if k in med]
        cheapest = min(peers, key=lambda k: med[k]["parent"]) if peers else None
        for lib in libs:
            name = LABELS[lib] + (
                " (chunksize as Pool.map)" if _variant(lib, job) == "cf-chunk" else ""
            )
            if lib not in med:
                section.rows.append([label, name, "not measured", *["—"] * 7])
                continue
            m = med[lib]
            c, pool = m["parent"], m["pool"]
            if cheapest is None:
                ratio = "—"
            elif lib == cheapest:
                ratio = "cheapest"
            else:
                ratio = fmt_ratio(c / med[cheapest]["parent"])
            section.rows.append(
                [
                    label,
                    name,
                    fmt_seconds(m["seconds"]),
                    fmt_rate(n / m["seconds"]),
                    f"{_us(c)} ({_us(m['user'] / n, '')} + {_us(m['sys'] / n, '')})",
                    ratio,
                    _us(pool),
                    f"{fmt_rate(1 / pool)}/s" if pool > 0 else "—",
                    f"{pool / c:.1f}" if c > 0 else "—",
                    _us(m["total"]) if job == "mb" else "—",
                ]
            )
        if cheapest is not None and "cb" in med:
            cb = med["cb"]
            section.notes.append(
                f"{label}: cleanbreak's parent spends {_us(cb['parent'])} of CPU per task, "
                f"{fmt_ratio(cb['parent'] / med[cheapest]['parent'])} that of the cheaper of "
                f"Pool/PPE ({LABELS[cheapest]}, {_us(med[cheapest]['parent'])}); its "
                f"parent would saturate one core at about {cb['pool'] / cb['parent']:.1f} "
                f"workers, against {med[cheapest]['pool'] / med[cheapest]['parent']:.1f}."
            )
    section.notes.append(
        "W\\* assumes that neither cost per task changes with the number of workers (no "
        "contention, the parent never idle). Both were measured with "
        f"{w} workers on {len(os.sched_getaffinity(0))} cores, where the parent and the workers "
        "share the CPUs: w includes the workers' own share of the IPC, and time a worker spends "
        "waiting for the parent is not CPU time, so it is not in w."
    )
    section.notes.append(
        "² The split between user and system time is that of the run with the median parent "
        "CPU (for an even number of runs, the lower of the middle two). The kernel apportions a "
        "process's CPU time between the two by sampling, so on a short call the split is rough; "
        "their sum is exact."
    )
    section.notes.append(
        "Pool CPU includes any helper process of the pool (cleanbreak's fork server, "
        "multiprocessing's resource tracker), which stay idle during a `map`."
    )
    return section
