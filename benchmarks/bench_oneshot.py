"""Measurement 10: one-shot calls, from making the pool to the last result, shutdown included.

What a script that calls a pool once waits for: each library's natural one-shot form (a pool in
a ``with`` block, or a call that makes its own workers), timed from making the pool (or the
call) to the last result and, for the forms that close their pool, past its shutdown. Two jobs:
tiny tasks ``x -> x+1`` (the per-task cost, with the chunksize measurement 1 uses: what
``Pool.map`` picks, passed to the executors whose default is 1) and tasks that busy-wait 10 ms
(the start and stop costs beside real work, each library's default chunking, as in
measurement 2).

Each (form, job, repetition) runs in a fresh child process, ``oneshot_child.py``, a short script
as a user's would be: the library is imported and the input list built first (not timed), then
the one-shot form is timed and its results checked. One more form makes cleanbreak's call from
the suite's own ``child.py``, whose main module imports about 70 ms of modules: what a script
with heavy imports costs a pool whose workers run the main module again.
loky's ``get_reusable_executor()`` and joblib's ``Parallel`` (loky's executor underneath) leave
their workers running for the next call, so their time stops at the last result; their workers
are stopped when the interpreter exits. The runner also times, from a pidfd, the child's whole
life (interpreter start to exit) and the time from the checked results to its exit, which
includes what each library does at interpreter exit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import oneshot_child
from common import (
    BENCH_DIR,
    Child,
    Section,
    Settings,
    fmt_ratio,
    fmt_seconds,
    median,
    progress,
    rotated,
)
from libs import CB, CF, JOBLIB, LOKY, MP, MPIRE, PEBBLE, available, pool_chunksize
from reporter import Reporter

TINY, TINY_QUICK = 2_000_000, 200_000
MS10, MS10_QUICK = 200, 100
LINGER = 2.0  # how long the runner waits for processes that outlive a child

LEAN_CHILD = BENCH_DIR / "oneshot_child.py"


@dataclass(frozen=True)
class Form:
    """One library's one-shot call."""

    key: str
    lib: str
    label: str
    reusable: bool = False  # the workers outlive the call (stopped at interpreter exit)
    heavy: bool = False  # called from child.py, whose main module imports the whole suite


FORMS: tuple[Form, ...] = (
    Form("mp", MP, "`with multiprocessing.Pool(N) as p: p.map(f, xs)`"),
    Form("cf", CF, "`with ProcessPoolExecutor(N) as ex: list(ex.map(f, xs, chunksize=cs))`"),
    Form(
        "loky",
        LOKY,
        "`list(loky.get_reusable_executor(max_workers=N).map(f, xs, chunksize=cs))`",
        reusable=True,
    ),
    Form(
        "pebble",
        PEBBLE,
        "`with pebble.ProcessPool(max_workers=N) as p: list(p.map(f, xs, chunksize=cs).result())`",
    ),
    Form("mpire", MPIRE, "`with mpire.WorkerPool(n_jobs=N) as p: p.map(f, xs)`"),
    Form("joblib", JOBLIB, "`joblib.Parallel(n_jobs=N)(delayed(f)(x) for x in xs)`", reusable=True),
    Form("cb-fn", CB, "`cleanbreak.map(f, xs, workers=N)`"),
    Form("cb", CB, "`with cleanbreak.Pool(N) as p: list(p.map(f, xs))`"),
    Form(
        "cb-fn-heavy",
        CB,
        "`cleanbreak.map(f, xs, workers=N)`, main module importing 70 ms of modules ²",
        heavy=True,
    ),
)
FORM = {f.key: f for f in FORMS}
JOBS = {"inc": "tiny tasks (x -> x+1)", "busy_10ms": "tasks that busy-wait 10 ms"}


def _linger(child: Child) -> tuple[int, float]:
    """After the child's exit: how many processes of its session were still alive, and how
    long (up to ``LINGER`` s) until the last of them was gone."""
    assert child.exited_at is not None
    left = len(child.session())
    while left and child.session() and time.monotonic() - child.exited_at < LINGER:
        time.sleep(0.005)
    return left, (time.monotonic() - child.exited_at) if left else 0.0


def _chunksize(task: str, n: int, workers: int) -> int:
    """Tiny tasks: what Pool.map picks (measurement 1's chunked executors); else the default."""
    return pool_chunksize(n, workers) if task == "inc" else 1


def child_oneshot(params: dict[str, Any], report: Reporter) -> None:
    """The ``heavy`` forms: the same call, from ``child.py``, whose main module imports every
    measurement of this suite (about 70 ms of modules, psutil and distributed among them)."""
    oneshot_child.run(params, report)


def run_oneshot(settings: Settings) -> Section:
    counts = {
        "inc": TINY_QUICK if settings.quick else TINY,
        "busy_10ms": MS10_QUICK if settings.quick else MS10,
    }
    reps = settings.repetitions(3, 1)
    keys = [f.key for f in FORMS if available(f.lib)]
    found: dict[tuple[str, str], dict[str, list[float]]] = {}
    leftovers: dict[str, tuple[int, float]] = {}
    for rep in range(reps):
        for task, n in counts.items():
            for key in rotated(keys, rep):
                params = {
                    "form": key,
                    "task": task,
                    "n": n,
                    "workers": settings.workers,
                    "chunksize": _chunksize(task, n, settings.workers),
                }
                tag = f"  oneshot {task} rep {rep + 1}/{reps} {key}"
                script = None if FORM[key].heavy else LEAN_CHILD
                with Child("oneshot", params, script) as child:
                    if not child.wait(120):
                        progress(f"{tag}: FAILED (no result within 120 s)")
                        continue
                    left, gone = _linger(child)
                    result = child.result()
                    if result is None or child.exited_at is None:
                        progress(
                            f"{tag}: FAILED (exit status {child.returncode}: "
                            f"{child.output_tail(4)})"
                        )
                        continue
                    figures = found.setdefault((key, task), {})
                    figures.setdefault("seconds", []).append(result["seconds"])
                    figures.setdefault("exit", []).append(child.exited_at - result["done"])
                    figures.setdefault("life", []).append(child.exited_at - child.started)
                    if left:
                        most, slowest = leftovers.get(key, (0, 0.0))
                        leftovers[key] = (max(most, left), max(slowest, gone))
                    progress(
                        f"{tag}: {fmt_seconds(result['seconds'])}, whole process "
                        f"{fmt_seconds(figures['life'][-1])}"
                        + (
                            f", {left} process(es) outlived it by {fmt_seconds(gone)}"
                            if left
                            else ""
                        )
                    )

    w = settings.workers
    section = Section(
        "oneshot",
        "10. One-shot calls: pool start to last result, shutdown included",
        f"Each library's one-shot form on N = {w} workers, in a fresh process (library imported "
        "and input list built before the clock starts), timed from making the pool (or the "
        "call) to the last result and, for the forms that close their pool, past the close. "
        f"Median of {reps} alternating run(s). Ratio: time against the fastest peer (not "
        "cleanbreak) on the same job (lower is better). Whole process: the child's life, "
        "interpreter start to exit, from a pidfd.",
        [
            "job",
            "API",
            "time (start → last result, incl. shutdown)",
            "vs fastest peer",
            "results checked → process exit",
            "whole process",
        ],
    )
    for task, n in counts.items():
        job = f"{n:,} {JOBS[task]}"
        peers = {
            k: median(found[(k, task)]["seconds"])
            for k in keys
            if FORM[k].lib != CB and (k, task) in found
        }
        fastest = min(peers, key=lambda k: peers[k]) if peers else None
        for key in keys:
            form = FORM[key]
            label = form.label + (" ¹" if form.reusable else "")
            got = found.get((key, task))
            if not got:
                section.rows.append([job, label, "not measured", "—", "—", "—"])
                continue
            seconds = median(got["seconds"])
            if fastest is None:
                ratio = "—"
            elif key == fastest:
                ratio = "fastest peer"
            else:
                ratio = fmt_ratio(seconds / peers[fastest])
            section.rows.append(
                [
                    job,
                    label,
                    fmt_seconds(seconds),
                    ratio,
                    fmt_seconds(median(got["exit"])),
                    fmt_seconds(median(got["life"])),
                ]
            )
        if fastest is None:
            continue
        for key in ("cb-fn", "cb", "cb-fn-heavy"):
            if (key, task) in found:
                seconds = median(found[(key, task)]["seconds"])
                section.notes.append(
                    f"{job}: {FORM[key].label} {fmt_seconds(seconds)} = "
                    f"{fmt_ratio(seconds / peers[fastest])} the time of the fastest peer, "
                    f"{FORM[fastest].label} ({fmt_seconds(peers[fastest])}). Every run: "
                    + ", ".join(f"{x:.3f}" for x in found[(key, task)]["seconds"])
                    + " s against "
                    + ", ".join(f"{x:.3f}" for x in found[(fastest, task)]["seconds"])
                    + " s."
                )
    section.notes.append(
        f"cs: tiny tasks, what Pool.map picks, ceil(n / (4 x N)) = "
        f"{pool_chunksize(counts['inc'], w):,} (measurement 1's chunked executors); 10 ms tasks, "
        "the executors' default, 1 (as in measurement 2). multiprocessing, mpire and cleanbreak "
        "pick their own chunks."
    )
    section.notes.append(
        "¹ Reusable: the workers outlive the call (loky's executor, which joblib uses, waits "
        "for the next call), so the time stops at the last result; they are stopped at "
        "interpreter exit, which the last two columns include."
    )
    section.notes.append(
        "Every form runs in a child whose main module, oneshot_child.py, imports only the "
        "standard library, the library under test and the task module, as a short script does. "
        "² The same call from child.py, the suite's own child, whose main module imports every "
        "measurement (about 70 ms of modules, psutil and distributed among them): a pool that "
        "starts its workers from a fresh interpreter (cleanbreak's fork server, loky) runs the "
        "main module again in each worker before its first task; a pool that forks the parent "
        "does not."
    )
    if leftovers:
        section.notes.append(
            "Helpers and workers that outlived the child (its session scanned as it exited), "
            "most of them and longest until the last was gone, over all runs: "
            + "; ".join(
                f"{FORM[k].label} {n}, {fmt_seconds(t)}" + (" or more" if t >= LINGER else "")
                for k, (n, t) in leftovers.items()
            )
            + ". They stop by themselves (the ones still there after "
            f"{LINGER:.0f} s are killed); the caller does not wait for them."
        )
    return section
