"""Measurement 5: what Ctrl-C (and SIGTERM) does to a run.

The child runs ``TASKS`` tasks of 0.5 s of CPU work each on the workers through the library's
most natural API, collecting results as they come (the way that keeps the most a ``map`` can
keep). Each task logs its start and end with ``time.monotonic()`` and its pid. Once three tasks
have started, and a quarter second later (mid-task, away from the moment a worker takes its next
task), the runner snapshots the child's descendants, sends the signal and measures:

- signal to exception: when the child's ``except`` clause ran (the child logs the time);
- signal to exit: from a pidfd, exact; a child still alive after ``HANG`` seconds is "hung" and
  is killed;
- tasks started after the signal: log entries with a later start time;
- results kept: what the child held when the exception reached it, against the tasks that had
  finished before the signal;
- leftover processes: the child's descendants (snapshot plus a scan of its session) still alive
  one second after it exited; worker pids come from the task log.

Signals: SIGINT to the whole process group (what a terminal's Ctrl-C does), SIGINT to the
parent alone, SIGTERM to the parent alone.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import tasks
from common import (
    Child,
    Event,
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

TASKS = 40
STARTED_BEFORE_SIGNAL = 3
# The signal goes this long after the third start: mid-task, away from the moment a worker
# finishes one task and takes the next, so that "started after the signal" measures what the
# library does with queued tasks, not a race of a few milliseconds.
SIGNAL_DELAY = tasks.SLOW_TASK_SECONDS / 2
HANG = 30.0
HANG_QUICK = 15.0
LEFTOVER_AFTER = 1.0

Runner = Callable[[int, int, list[Any]], None]


def _mp(n: int, workers: int, results: list[Any]) -> None:
    import multiprocessing

    with multiprocessing.Pool(workers) as pool:
        for r in pool.imap(tasks.slow_logged, range(n)):
            results.append(r)


def _cf(n: int, workers: int, results: list[Any]) -> None:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as executor:
        for r in executor.map(tasks.slow_logged, range(n)):
            results.append(r)


def _loky(n: int, workers: int, results: list[Any]) -> None:
    from loky import get_reusable_executor

    executor = get_reusable_executor(max_workers=workers)
    for r in executor.map(tasks.slow_logged, range(n)):
        results.append(r)


def _pebble(n: int, workers: int, results: list[Any]) -> None:
    from pebble import ProcessPool

    with ProcessPool(max_workers=workers) as pool:
        for r in pool.map(tasks.slow_logged, range(n)).result():
            results.append(r)


def _mpire(n: int, workers: int, results: list[Any]) -> None:
    from mpire.pool import WorkerPool

    with WorkerPool(n_jobs=workers) as pool:
        for r in pool.imap(tasks.slow_logged, range(n)):
            results.append(r)


def _joblib(n: int, workers: int, results: list[Any]) -> None:
    from joblib import Parallel, delayed

    run = Parallel(n_jobs=workers, return_as="generator")
    for r in run(delayed(tasks.slow_logged)(i) for i in range(n)):
        results.append(r)


def _cleanbreak(n: int, workers: int, results: list[Any]) -> None:
    import cleanbreak

    try:
        results.extend(cleanbreak.map(tasks.slow_logged, range(n), workers=workers))
    except cleanbreak.Interrupted as exc:
        results.extend(exc.completed.values())
        raise


NATURAL: dict[str, tuple[Runner, str]] = {
    MP: (_mp, "with Pool() as p: for r in p.imap(…)"),
    CF: (_cf, "with ProcessPoolExecutor() as ex: for r in ex.map(…)"),
    LOKY: (_loky, "for r in get_reusable_executor().map(…)"),
    PEBBLE: (_pebble, "with ProcessPool() as p: for r in p.map(…).result()"),
    MPIRE: (_mpire, "with WorkerPool() as p: for r in p.imap(…)"),
    JOBLIB: (_joblib, 'for r in Parallel(return_as="generator")(…)'),
    CB: (_cleanbreak, "cleanbreak.map(…); Interrupted.completed"),
}


def child_interrupt(params: dict[str, Any], report: Reporter) -> None:
    """Run the tasks; report what the caller holds when an exception reaches it."""
    results: list[Any] = []
    runner = NATURAL[params["lib"]][0]
    try:
        runner(params["tasks"], params["workers"], results)
    except BaseException as exc:
        report({"t_exc": time.monotonic(), "exc": type(exc).__name__, "kept": len(results)})
        raise
    report({"t_exc": None, "exc": None, "kept": len(results)})


@dataclass(frozen=True)
class Mode:
    key: str
    title: str
    signum: signal.Signals
    group: bool


MODES: tuple[Mode, ...] = (
    Mode("group-int", "SIGINT to the process group (a terminal's Ctrl-C)", signal.SIGINT, True),
    Mode("parent-int", "SIGINT to the parent process only", signal.SIGINT, False),
    Mode("parent-term", "SIGTERM to the parent process only", signal.SIGTERM, False),
)


def run_interrupt(settings: Settings) -> list[Section]:
    modes = MODES[:1] if settings.quick else MODES
    hang = HANG_QUICK if settings.quick else HANG
    sections = []
    for number, mode in enumerate(modes):
        section = Section(
            f"interrupt-{mode.key}",
            f"5{'abc'[number]}. {mode.title}",
            f"{TASKS} tasks of {tasks.SLOW_TASK_SECONDS} s CPU work on {settings.workers} "
            f"workers; the signal is sent {SIGNAL_DELAY} s after {STARTED_BEFORE_SIGNAL} tasks had "
            "started (mid-task). "
            f'"Hung": still alive {hang:.0f} s after the signal (then killed).',
            [
                "library: API",
                "signal → exception",
                "signal → exit",
                "exit",
                "tasks started after signal",
                "results kept / finished before signal",
                f"processes left {LEFTOVER_AFTER:.0f} s after exit",
            ],
        )
        for lib in LIBRARIES:
            label = f"{lib}: `{NATURAL[lib][1]}`"
            if not available(lib):
                section.rows.append([label, "not installed", *["—"] * 5])
                continue
            row = _run_one(lib, mode, settings.workers, hang)
            progress(f"  interrupt {mode.key} {lib}: {' | '.join(row)}")
            section.rows.append([label, *row])
        section.notes.append(
            "A task that ends between the signal and the moment the library reacts can be kept "
            'although it did not finish before the signal; the times in "tasks started after '
            'signal" show how long after the signal those tasks started.'
        )
        section.notes.append(
            "Leftover processes are workers (pids that ran a task) plus helpers (fork server, "
            "resource tracker, …); the runner kills them after counting."
        )
        sections.append(section)
    return sections


def _run_one(lib: str, mode: Mode, workers: int, hang: float) -> list[str]:
    params = {"lib": lib, "tasks": TASKS, "workers": workers}
    with Child("interrupt", params) as child:
        if not child.wait_for_events("start", STARTED_BEFORE_SIGNAL, timeout=60):
            return [f"tasks never started: {child.output_tail(1)}", *["—"] * 5]
        time.sleep(SIGNAL_DELAY)
        before = child.descendants()
        t_sig = time.monotonic()
        if mode.group:
            os.killpg(child.pid, mode.signum)
        else:
            os.kill(child.pid, mode.signum)
        exited = child.wait(hang)
        if exited:
            assert child.exited_at is not None
            to_exit = fmt_seconds(child.exited_at - t_sig)
            exit_status = describe_exit(child.returncode)
        else:
            to_exit = f"hung (> {hang:.0f} s)"
            exit_status = "killed by runner"
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        exit_at = child.exited_at or time.monotonic()
        time.sleep(max(0.0, exit_at + LEFTOVER_AFTER - time.monotonic()))
        left = _leftovers(before, child)
        events = child.events()
        result = child.result()
    return [
        _to_exception(result, t_sig),
        to_exit,
        exit_status,
        started_after(events, t_sig),
        _kept(result, _count(events, "end", before=t_sig)),
        describe_processes(left, {e.pid for e in events}),
    ]


def _leftovers(before: list[psutil.Process], child: Child) -> list[psutil.Process]:
    found = {p.pid: p for p in before if alive(p)}
    for p in child.session():
        found.setdefault(p.pid, p)
    return list(found.values())


def _count(events: list[Event], what: str, *, before: float) -> int:
    return sum(1 for e in events if e.what == what and e.t < before)


def _to_exception(result: dict[str, Any] | None, t_sig: float) -> str:
    if result is None:
        return "none (process died)"
    if result["exc"] is None:
        return "none (ran to the end)"
    return f"{fmt_seconds(result['t_exc'] - t_sig)} ({result['exc']})"


def _kept(result: dict[str, Any] | None, finished: int) -> str:
    kept = 0 if result is None else result["kept"]
    return f"{kept} / {finished}"
