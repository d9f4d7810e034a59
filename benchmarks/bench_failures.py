"""Measurements 6 and 7: a worker killed, and the parent killed.

6. Ten tasks; task ``CRASH_INDEX`` SIGKILLs its own worker (logging the time first), the others
   work 0.2 s. Libraries with futures are used through ``submit`` and ``as_completed`` (a
   failed future does not stop the loop, and an error shows as soon as it is set); map-only
   libraries through a ``for`` loop over their lazy map, which ends at the first exception.
   The child reports after every outcome, so a run that hangs still shows what it had. The
   runner gives it ``DEADLINE`` seconds to exit.

7. The Ctrl-C workload (``bench_interrupt``); when the signal would be sent, the runner
   snapshots the child's descendants and SIGKILLs the child alone. Two seconds later it counts
   the descendants still alive (snapshot plus a scan of the child's session) and the tasks that
   started after the kill, then kills what is left.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import tasks
from bench_interrupt import NATURAL, SIGNAL_DELAY, STARTED_BEFORE_SIGNAL, TASKS
from common import (
    Child,
    Section,
    Settings,
    alive,
    describe_exit,
    describe_processes,
    fmt_seconds,
    progress,
    started_after,
)
from libs import CB, CF, JOBLIB, LIBRARIES, LOKY, MP, MPIRE, PEBBLE, available
from reporter import Reporter

CRASH_TASKS = 10
DEADLINE, DEADLINE_QUICK = 20.0, 5.0
ORPHAN_WAIT = 2.0

# Each yields the outcomes as ("ok", value) or ("error", exception); a map-style API stops at
# its first error.
Outcomes = Iterator[tuple[str, Any]]


def _futures(submit: Callable[[], list[Any]]) -> Outcomes:
    from concurrent.futures import as_completed

    for fut in as_completed(submit()):
        try:
            yield "ok", fut.result()
        except Exception as exc:
            yield "error", exc


def _mp(n: int, workers: int) -> Outcomes:
    import multiprocessing

    with multiprocessing.Pool(workers) as pool:
        for r in pool.imap(tasks.die_or_work, range(n)):
            yield "ok", r


def _cf(n: int, workers: int) -> Outcomes:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as executor:
        yield from _futures(lambda: [executor.submit(tasks.die_or_work, i) for i in range(n)])


def _loky(n: int, workers: int) -> Outcomes:
    from loky import get_reusable_executor

    executor = get_reusable_executor(max_workers=workers)
    yield from _futures(lambda: [executor.submit(tasks.die_or_work, i) for i in range(n)])


def _pebble(n: int, workers: int) -> Outcomes:
    from pebble import ProcessPool

    with ProcessPool(max_workers=workers) as pool:
        yield from _futures(lambda: [pool.schedule(tasks.die_or_work, (i,)) for i in range(n)])


def _mpire(n: int, workers: int) -> Outcomes:
    from mpire.pool import WorkerPool

    with WorkerPool(n_jobs=workers) as pool:
        for r in pool.imap(tasks.die_or_work, range(n)):
            yield "ok", r


def _joblib(n: int, workers: int) -> Outcomes:
    from joblib import Parallel, delayed

    run = Parallel(n_jobs=workers, return_as="generator")
    for r in run(delayed(tasks.die_or_work)(i) for i in range(n)):
        yield "ok", r


def _cleanbreak(n: int, workers: int) -> Outcomes:
    import cleanbreak

    with cleanbreak.Pool(workers) as pool:
        yield from _futures(lambda: [pool.submit(tasks.die_or_work, i) for i in range(n)])


def _cleanbreak_map(n: int, workers: int) -> Outcomes:
    import cleanbreak

    try:
        results = cleanbreak.map(tasks.die_or_work, range(n), workers=workers)
    except Exception as exc:
        # cleanbreak.map runs every task, then raises the first failure with the other
        # results in .completed (where this version of cleanbreak provides it).
        for value in getattr(exc, "completed", {}).values():
            yield "ok", value
        yield "error", exc
        return
    for r in results:
        yield "ok", r


CRASH_APIS: dict[str, tuple[str, Callable[[int, int], Outcomes], str]] = {
    "mp": (MP, _mp, "Pool.imap loop"),
    "cf": (CF, _cf, "submit + as_completed"),
    "loky": (LOKY, _loky, "submit + as_completed"),
    "pebble": (PEBBLE, _pebble, "schedule + as_completed"),
    "mpire": (MPIRE, _mpire, "WorkerPool.imap loop"),
    "joblib": (JOBLIB, _joblib, 'Parallel(return_as="generator") loop'),
    "cb": (CB, _cleanbreak, "Pool.submit + as_completed"),
    "cb-fn": (CB, _cleanbreak_map, "cleanbreak.map; exc.completed"),
}


def child_crash(params: dict[str, Any], report: Reporter) -> None:
    ok = errors = 0
    first_error: dict[str, Any] | None = None
    report({"ok": 0, "errors": 0, "first_error": None})
    try:
        for kind, value in CRASH_APIS[params["key"]][1](CRASH_TASKS, params["workers"]):
            if kind == "ok":
                ok += 1
            else:
                errors += 1
                first_error = first_error or _error(value)
            report({"ok": ok, "errors": errors, "first_error": first_error})
    except Exception as exc:
        errors += 1
        first_error = first_error or _error(exc)
    report({"ok": ok, "errors": errors, "first_error": first_error})


def _error(exc: BaseException) -> dict[str, Any]:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > 80:
        text = text[:79] + "…"
    return {"t": time.monotonic(), "type": type(exc).__name__, "message": text}


def run_crash(settings: Settings) -> Section:
    deadline = DEADLINE_QUICK if settings.quick else DEADLINE
    section = Section(
        "crash",
        "6. A worker is SIGKILLed",
        f"{CRASH_TASKS} tasks on {settings.workers} workers; task {tasks.CRASH_INDEX} SIGKILLs "
        f"its own worker, the other {CRASH_TASKS - 1} work {tasks.CRASH_TASK_SECONDS} s each. "
        f'"Hang": the script had not exited {deadline:.0f} s after the kill.',
        [
            "library: API",
            "outcome",
            f"other results delivered (of {CRASH_TASKS - 1})",
            "error raised",
            "kill → error visible",
        ],
    )
    for key, (lib, _, api) in CRASH_APIS.items():
        label = f"{lib}: {api}"
        if not available(lib):
            section.rows.append([label, "not installed", "—", "—", "—"])
            continue
        row = _crash_one(key, settings.workers, deadline)
        progress(f"  crash {key}: {' | '.join(row)}")
        section.rows.append([label, *row])
    return section


def _crash_one(key: str, workers: int, deadline: float) -> list[str]:
    with Child("crash", {"key": key, "workers": workers}) as child:
        if not child.wait_for_events("kill", 1, timeout=60):
            return [f"the kill never happened: {child.output_tail(1)}", "—", "—", "—"]
        t_kill = next(e.t for e in child.events() if e.what == "kill")
        exited = child.wait(max(0.0, t_kill + deadline - time.monotonic()))
        result = child.result() or {}
    error = result.get("first_error")
    delivered = str(result.get("ok", 0))
    if error is None:
        error_text, delay = "none", "—"
    else:
        error_text = f"{error['type']}: {error['message']}" if error["message"] else error["type"]
        delay = fmt_seconds(error["t"] - t_kill)
    seen = result.get("ok", 0) + result.get("errors", 0)
    if not exited:
        outcome = "**hang** after every outcome" if seen >= CRASH_TASKS else "**hang**"
    elif child.returncode != 0:
        outcome = f"script died ({describe_exit(child.returncode)})"
    else:
        outcome = "script finished"
    return [outcome, delivered, error_text, delay]


def run_orphans(settings: Settings) -> Section:
    section = Section(
        "orphans",
        "7. The parent is SIGKILLed",
        f"{TASKS} tasks of {tasks.SLOW_TASK_SECONDS} s on {settings.workers} workers (the Ctrl-C "
        f"workload); {SIGNAL_DELAY} s after {STARTED_BEFORE_SIGNAL} tasks had started, the "
        "parent alone gets SIGKILL. Orphans: its descendants still alive "
        f"{ORPHAN_WAIT:.0f} s later.",
        [
            "library: API",
            "descendants at the kill",
            f"orphans after {ORPHAN_WAIT:.0f} s",
            "all gone after",
            "tasks started after the kill",
        ],
    )
    for lib in LIBRARIES:
        label = f"{lib}: `{NATURAL[lib][1]}`"
        if not available(lib):
            section.rows.append([label, "not installed", "—", "—", "—"])
            continue
        row = _orphans_one(lib, settings.workers)
        progress(f"  orphans {lib}: {' | '.join(row)}")
        section.rows.append([label, *row])
    section.notes.append(
        "Workers are pids that ran a task; helpers are the fork server, resource tracker and "
        "the like. The runner kills the orphans after counting them."
    )
    return section


def _orphans_one(lib: str, workers: int) -> list[str]:
    params = {"lib": lib, "tasks": TASKS, "workers": workers}
    with Child("interrupt", params) as child:
        if not child.wait_for_events("start", STARTED_BEFORE_SIGNAL, timeout=60):
            return [f"tasks never started: {child.output_tail(1)}", "—", "—", "—"]
        time.sleep(SIGNAL_DELAY)
        before = child.descendants()
        t_kill = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        gone_at: float | None = None
        while time.monotonic() < t_kill + ORPHAN_WAIT:
            if gone_at is None and not any(alive(p) for p in before) and not child.session():
                gone_at = time.monotonic()
            time.sleep(0.01)
        left = {p.pid: p for p in before if alive(p)}
        for p in child.session():
            left.setdefault(p.pid, p)
        events = child.events()
        late = started_after(events, t_kill)
    orphans = describe_processes(list(left.values()), {e.pid for e in events})
    gone = fmt_seconds(gone_at - t_kill) if gone_at is not None else f"> {ORPHAN_WAIT:.0f} s"
    return [str(len(before)), orphans, gone, late]
