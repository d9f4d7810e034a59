"""Measurement 13: notebook cells. By value against by reference, and the peers in a kernel.

A function that a worker cannot import (defined in a notebook cell, the REPL, ``python -c`` or
a script read from stdin; a lambda, a closure) goes to cleanbreak's workers *by value*
(cloudpickle), once per worker; an importable one goes *by reference* (plain pickle). Three
tables:

- **13a, warm**: ``list(pool.map(fn, xs))`` on one ``cleanbreak.Pool``, after an untimed pass,
  with the same function by reference and by value in turn (``notebook_child.py``), so that the
  ratio compares two calls on the same pool, a moment apart. In two kinds of process: a script
  (a main module that workers can import: by value is a nested function), and ``python -c``
  (no main module to import, as in a notebook: by value is a function of ``__main__``; the
  arguments, which name nothing of ``__main__``, still go by plain pickle).
- **13b, one-shot**: ``cleanbreak.map(fn, xs, workers=N)`` as the first call of a fresh process,
  timed whole (workers started and stopped inside it), for each (process kind, function), on
  the jobs of 13a and on a few tiny tasks, where the start is all there is.
- **13c, a real kernel**: the cells a notebook user writes, timed inside the cell with
  ``time.perf_counter()``, in an IPython kernel driven through ``jupyter_client``
  (``notebook_kernel.py``): a cell-defined function over tiny tasks and 10 ms tasks, one-shot
  (the pool made and shut down in the cell, the kernel's first pool) and warm (a pool held in
  a variable, its second call), for cleanbreak, ``multiprocessing.Pool``,
  ``ProcessPoolExecutor`` (default contexts) and joblib (loky). A peer that fails there (a
  default context that cannot load a cell's function) is reported, not fatal.

Every child and every kernel is fresh; repetitions run the variants in an order rotated from
one repetition to the next, and the tables show medians.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import notebook_child
import notebook_kernel
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
from libs import CB, CF, JOBLIB, MP, available, pool_chunksize

# 13a and 13b
TINY, TINY_QUICK = 2_000_000, 200_000
MS, MS_QUICK = 2_000, 600
PASSES = {"inc": (5, 3), "busy_1ms": (3, 2)}  # timed passes per function per child (full, quick)
JOB_LABEL = {"inc": "tiny tasks (x -> x+1)", "busy_1ms": "tasks that busy-wait 1 ms"}
CHILD_TIMEOUT = 180.0
TARGET = 0.02  # the target for by value on tiny tasks, warm

# The kinds of process. "c": ``python -c CODE``, run through Child as its "script" ("-c", then
# the code where Child puts the scenario's name), so it gets Child's session and its cleanup.
CONTEXTS = ("script", "c")
CONTEXT_LABEL = {
    "script": "script (main module importable)",
    "c": "`python -c` (no main module, as in a notebook)",
}
FN_LABEL = {
    ("script", "ref"): "`notebook_tasks.{job}`, by reference",
    ("script", "value"): "the same, nested in a function: by value",
    ("c", "ref"): "`notebook_tasks.{job}`, by reference",
    ("c", "value"): "the same, defined in `__main__`: by value",
}

# 13c
KERNEL_TINY, KERNEL_TINY_QUICK = 200_000, 50_000
KERNEL_10MS, KERNEL_10MS_QUICK = 200, 100
KERNEL_JOBS = {
    "sq": "tiny tasks (`sq`: x * x)",
    "slow_sq": "tasks that busy-wait 10 ms (`slow_sq`)",
}
CELL_TIMEOUT = {"sq": 90.0, "slow_sq": 45.0}
SETUP_TIMEOUT = 60.0
MODE_LABEL = {"oneshot": "one-shot", "warm": "warm"}

CELL_FUNCTIONS = """def sq(x):
    return x * x


def slow_sq(x):
    end = time.perf_counter() + 0.01
    while time.perf_counter() < end:
        pass
    return x * x
"""

TIMED_CELL = """t0 = time.perf_counter()
{call}
seconds = time.perf_counter() - t0
assert len(out) == len(xs) and sum(out) == expected, "wrong results"
seconds
"""


@dataclass(frozen=True)
class Peer:
    """A library's cells: ``{f}`` is the function's name, ``{w}`` the workers, ``{cs}`` the
    executor's chunksize."""

    key: str
    lib: str
    name: str
    imports: str  # the setup cell's import lines
    method: str  # setup lines whose last is an expression: its default start method
    oneshot: str  # the pool made and shut down in the cell
    open: str  # the cell that makes the pool held in a variable ("": none)
    call: str  # a call on the held pool
    close: str  # the cell that shuts it down ("": none)


PEERS: tuple[Peer, ...] = (
    Peer(
        "cb",
        CB,
        "cleanbreak",
        # The pool's modules, which the package imports on first use, taken here as the
        # peers' are imported: not in the timed cells (see the README's "How it works").
        "import cleanbreak\ncleanbreak.map, cleanbreak.Pool",
        "from cleanbreak._manager import default_context\ndefault_context().get_start_method()",
        "out = cleanbreak.map({f}, xs, workers={w})",
        "pool = cleanbreak.Pool({w})",
        "out = list(pool.map({f}, xs))",
        "pool.shutdown()",
    ),
    Peer(
        "mp",
        MP,
        "multiprocessing",
        "import multiprocessing",
        "multiprocessing.get_start_method()",
        "with multiprocessing.Pool({w}) as p:\n    out = p.map({f}, xs)",
        "pool = multiprocessing.Pool({w})",
        "out = pool.map({f}, xs)",
        "pool.close()\npool.join()",
    ),
    Peer(
        "cf",
        CF,
        "concurrent.futures",
        "from concurrent.futures import ProcessPoolExecutor",
        "_ex = ProcessPoolExecutor(1)\n_method = _ex._mp_context.get_start_method()\n"
        "_ex.shutdown()\n_method",
        "with ProcessPoolExecutor({w}) as ex:\n    out = list(ex.map({f}, xs, chunksize={cs}))",
        "ex = ProcessPoolExecutor({w})",
        "out = list(ex.map({f}, xs, chunksize={cs}))",
        "ex.shutdown()",
    ),
    Peer(
        "joblib",
        JOBLIB,
        "joblib",
        "from joblib import Parallel, delayed",
        "'loky (its default backend)'",
        "out = Parallel(n_jobs={w})(delayed({f})(x) for x in xs)",
        "",
        "out = Parallel(n_jobs={w})(delayed({f})(x) for x in xs)",
        "",
    ),
)
PEER = {p.key: p for p in PEERS}


def _one_line(code: str, **fmt: Any) -> str:
    """A cell's code on one line, as inline code."""
    text = ""
    for line in code.format(**fmt).splitlines():
        text += line.strip() if not text else (" " if text.endswith(":") else "; ") + line.strip()
    return f"`{text}`"


# ── 13a and 13b: child processes ─────────────────────────────────────────────────────────────


def _child(context: str, params: dict[str, Any]) -> Child:
    if context == "c":
        return Child(notebook_child.c_code(BENCH_DIR), params, Path("-c"))
    return Child("run", params, BENCH_DIR / "notebook_child.py")


def _run(context: str, params: dict[str, Any], tag: str) -> dict[str, Any] | None:
    with _child(context, params) as child:
        if not child.wait(CHILD_TIMEOUT):
            progress(f"{tag}: FAILED (no result within {CHILD_TIMEOUT:.0f} s)")
            return None
        result = child.result()
        if result is None or child.returncode != 0:
            progress(f"{tag}: FAILED (exit status {child.returncode}: {child.output_tail(4)})")
            return None
        return result


def _spread(pairs: list[float]) -> str:
    """The paired ratios' median, and how widely they spread (the machine's noise)."""
    if len(pairs) < 4:
        spread = "pairs " + ", ".join(f"{v:.3f}" for v in sorted(pairs))
    else:
        q = statistics.quantiles(pairs, n=4)
        spread = f"quartiles {q[0]:.3f} to {q[2]:.3f}, {len(pairs)} pairs"
    return f"{fmt_ratio(median(pairs))} ({spread})"


Passes = dict[str, dict[str, list[float]]]  # "wall"/"cpu" -> "ref"/"value" -> per pass


def _pairs(runs: list[Passes], clock: str) -> list[float]:
    """By value / by reference for each pass of each process: the two calls a moment apart."""
    return [
        v / r
        for run in runs
        for r, v in zip(run[clock]["ref"], run[clock]["value"], strict=True)
        if r > 0
    ]


def _warm(settings: Settings, counts: dict[str, int]) -> Section:
    reps = settings.repetitions(3, 1)
    found: dict[tuple[str, str], list[Passes]] = {}  # (context, job) -> each process's passes
    for rep in range(reps):
        for job, n in counts.items():
            passes = PASSES[job][1 if settings.quick else 0]
            for context in rotated(CONTEXTS, rep):
                params = {
                    "mode": "warm",
                    "job": job,
                    "n": n,
                    "workers": settings.workers,
                    "passes": passes,
                }
                tag = f"  notebook warm {job} rep {rep + 1}/{reps} {context}"
                result = _run(context, params, tag)
                if result is None:
                    continue
                run: Passes = {"wall": result["wall"], "cpu": result["cpu"]}
                found.setdefault((context, job), []).append(run)
                progress(
                    f"{tag}: by reference {median(run['wall']['ref']):.3f} s "
                    f"(CPU {median(run['cpu']['ref']):.3f} s), by value "
                    f"{median(run['wall']['value']):.3f} s (CPU {median(run['cpu']['value']):.3f}"
                    f" s); paired ratio {median(_pairs([run], 'wall')):.3f} (CPU "
                    f"{median(_pairs([run], 'cpu')):.3f})"
                )

    section = Section(
        "notebook-warm",
        "13a. By value against by reference: warm pool",
        f"`list(pool.map(fn, xs))` on one `cleanbreak.Pool({settings.workers})`, after an "
        "untimed pass with each function, then the same function by reference and by value "
        "in turn on the same pool (the order alternating), "
        f"{PASSES['inc'][1 if settings.quick else 0]} passes each on tiny tasks, "
        f"{PASSES['busy_1ms'][1 if settings.quick else 0]} on 1 ms tasks, in each of "
        f"{reps} fresh process(es) per kind. Time: median over every pass; CPU: the CPU time "
        "of the process and of its pool's processes over the call. By value / by reference: "
        "the median of the ratios of the two calls of each pass (lower is better; 1.00x: no "
        "cost), with their quartiles.",
        [
            "job",
            "process",
            "function",
            "time per map",
            "CPU per map",
            "by value / by reference: time",
            "by value / by reference: CPU",
            "time vs the script's by reference",
        ],
    )
    base: dict[str, float] = {}
    for job in counts:
        runs = found.get(("script", job))
        if runs:
            base[job] = median(t for run in runs for t in run["wall"]["ref"])
    for job, n in counts.items():
        for context in CONTEXTS:
            runs = found.get((context, job), [])
            for fn in ("ref", "value"):
                label = [
                    f"{n:,} {JOB_LABEL[job]}",
                    CONTEXT_LABEL[context],
                    FN_LABEL[context, fn].format(job=job),
                ]
                if not runs:
                    section.rows.append([*label, "not measured", "—", "—", "—", "—"])
                    continue
                seconds = median(t for run in runs for t in run["wall"][fn])
                cpu = median(t for run in runs for t in run["cpu"][fn])
                versus = (
                    "(base)"
                    if (context, fn) == ("script", "ref")
                    else fmt_ratio(seconds / base[job])
                    if job in base
                    else "—"
                )
                section.rows.append(
                    [
                        *label,
                        fmt_seconds(seconds),
                        fmt_seconds(cpu),
                        _spread(_pairs(runs, "wall")) if fn == "value" else "—",
                        _spread(_pairs(runs, "cpu")) if fn == "value" else "—",
                        versus,
                    ]
                )
    for context in CONTEXTS:
        runs = found.get((context, "inc"), [])
        if runs:
            wall, cpu = median(_pairs(runs, "wall")), median(_pairs(runs, "cpu"))
            section.notes.append(
                f"Target (issue 18): by value within {TARGET:.0%} of by reference on tiny "
                f"tasks. {CONTEXT_LABEL[context]}: {fmt_ratio(wall)} in time, "
                + ("within" if wall <= 1 + TARGET else "**not within**")
                + f" the target, and {fmt_ratio(cpu)} in CPU time, "
                + ("within" if cpu <= 1 + TARGET else "**not within**")
                + " (medians of the pairs; their quartiles show the noise)."
            )
    section.notes.append(
        "By value: cleanbreak sends the function with cloudpickle once to each worker, "
        "which keeps it; later chunks name it by number, so a warm pass costs the same as by "
        "reference unless the function's own code differs. In a `python -c` process (and a "
        "notebook, the REPL, stdin) what names nothing of `__main__` (the arguments here, an "
        "importable function) goes by plain pickle too, as from a script; the last column "
        "compares each row with the script's by reference (a ratio of medians from different "
        "processes)."
    )
    for (context, job), runs in found.items():
        section.notes.append(
            f"By value / by reference, median of each process's pairs, {context} {job}: "
            + ", ".join(
                f"{median(_pairs([run], 'wall')):.3f} (CPU {median(_pairs([run], 'cpu')):.3f})"
                for run in runs
            )
            + "."
        )
    return section


ONESHOT_FORMS = (("script", "ref"), ("script", "value"), ("c", "ref"), ("c", "value"))


def _oneshot(settings: Settings, counts: dict[str, int]) -> Section:
    reps = settings.repetitions(5, 1)
    # (key, job, n): a few tiny tasks, where the start dominates, then the two jobs of 13a.
    few = 4 * settings.workers
    jobs = [("few", "inc", few), *((job, job, n) for job, n in counts.items())]
    found: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for rep in range(reps):
        for key, job, n in jobs:
            for context, fn in rotated(ONESHOT_FORMS, rep):
                params = {
                    "mode": "oneshot",
                    "job": job,
                    "fn": fn,
                    "n": n,
                    "workers": settings.workers,
                }
                tag = f"  notebook oneshot {key} rep {rep + 1}/{reps} {context} {fn}"
                result = _run(context, params, tag)
                if result is None:
                    continue
                found.setdefault((context, fn, key), []).append(result)
                progress(f"{tag}: {fmt_seconds(result['seconds'])}")

    section = Section(
        "notebook-oneshot",
        "13b. By value against by reference: one-shot `cleanbreak.map`",
        f"`cleanbreak.map(fn, xs, workers={settings.workers})`, the first call of a fresh "
        "process (its list built and cleanbreak imported first), timed whole: workers started, "
        f"the map, workers stopped. Median of {reps} alternating run(s). By value - by "
        "reference: the difference of the medians, in the same kind of process.",
        [
            "job",
            "process",
            "function",
            "time",
            "by value - by reference",
            "vs the script's by reference",
        ],
    )
    for key, job, n in jobs:
        base = found.get(("script", "ref", key))
        base_s = median(r["seconds"] for r in base) if base else None
        for context, fn in ONESHOT_FORMS:
            label = [
                f"{n:,} {JOB_LABEL[job]}",
                CONTEXT_LABEL[context],
                FN_LABEL[context, fn].format(job=job),
            ]
            runs = found.get((context, fn, key))
            if not runs:
                section.rows.append([*label, "not measured", "—", "—"])
                continue
            seconds = median(r["seconds"] for r in runs)
            ref = found.get((context, "ref", key))
            diff = "—"
            if fn == "value" and ref:
                ref_s = median(r["seconds"] for r in ref)
                diff = f"{(seconds - ref_s) * 1000:+.0f} ms ({fmt_ratio(seconds / ref_s)})"
            versus = (
                "(base)"
                if (context, fn) == ("script", "ref")
                else fmt_ratio(seconds / base_s)
                if base_s
                else "—"
            )
            section.rows.append([*label, fmt_seconds(seconds), diff, versus])
    for context, fn in ONESHOT_FORMS:
        runs = [r for (c, f, _), rs in found.items() if (c, f) == (context, fn) for r in rs]
        if runs:
            imported = sum(1 for r in runs if r["cloudpickle_after"])
            section.notes.append(
                f"{CONTEXT_LABEL[context]}, {FN_LABEL[context, fn].format(job='*')}: "
                f"cloudpickle imported by the call in {imported} of {len(runs)} run(s)."
            )
    imports = [
        r["import_cloudpickle"] for rs in found.values() for r in rs if "import_cloudpickle" in r
    ]
    if imports:
        section.notes.append(
            "Importing cloudpickle, timed after the call in the processes that had not: "
            f"{fmt_seconds(median(imports))} (median of {len(imports)}). A process that sends "
            "by value pays it once in the parent, and once in each worker as it loads its "
            "first function (in parallel)."
        )
    for (context, fn, key), runs in found.items():
        section.notes.append(
            f"Every run, {context} {fn} {key}: "
            + ", ".join(f"{r['seconds']:.3f}" for r in runs)
            + " s."
        )
    return section


# ── 13c: a real kernel ───────────────────────────────────────────────────────────────────────


@dataclass
class KernelRun:
    """What one kernel gave for one (peer, job)."""

    method: str = ""
    oneshot: float | None = None
    first: float | None = None  # the held pool's first call
    warm: float | None = None  # its second call
    failure: str = ""  # why a cell failed, if one did
    after: list[str] | None = None  # what ran in the kernel's session after the last cell


def _setup_cell(peer: Peer, job: str, n: int) -> str:
    return (
        f"import time\n{peer.imports}\n\n\n{CELL_FUNCTIONS}\n\n"
        f"xs = list(range({n}))\nexpected = sum(x * x for x in xs)\n{peer.method}\n"
    )


def _kernel_run(peer: Peer, job: str, n: int, workers: int) -> KernelRun:
    """One fresh kernel: the setup cell, the one-shot cell, then the held pool's cells."""
    fmt = {"f": job, "w": workers, "cs": pool_chunksize(n, workers) if job == "sq" else 1}
    timeout = CELL_TIMEOUT[job]
    run = KernelRun()
    cwd = Path(tempfile.mkdtemp(prefix="cb-bench-notebook-"))
    kernel: notebook_kernel.Kernel | None = None
    try:
        kernel = notebook_kernel.Kernel(cwd)
        cell = kernel.run(_setup_cell(peer, job, n), SETUP_TIMEOUT)
        if cell.status != "ok":
            run.failure = f"setup cell: {cell.why()}"
            return run
        run.method = str(cell.value)
        cells: list[tuple[str, str]] = [("oneshot", TIMED_CELL.format(call=peer.oneshot))]
        if peer.open:
            cells.append(("open", peer.open))
        cells += [("first", TIMED_CELL.format(call=peer.call))]
        cells += [("warm", TIMED_CELL.format(call=peer.call))]
        if peer.close:
            cells.append(("close", peer.close))
        for what, code in cells:
            cell = kernel.run(code.format(**fmt), timeout)
            if cell.status != "ok":
                run.failure = f"{what} cell: {cell.why()}"
                if cell.status == "timeout" and kernel.last_output():
                    run.failure += f" (the kernel's last output: {kernel.last_output()})"
                if cell.status == "timeout" or what == "oneshot":
                    return run  # a hung cell holds the kernel; a failed one would fail again
                continue
            if what in ("oneshot", "first", "warm"):
                setattr(run, what, float(cell.value))
        run.after = kernel.processes()
        return run
    except Exception as exc:
        run.failure = f"kernel: {type(exc).__name__}: {exc}"
        return run
    finally:
        if kernel is not None:
            kernel.close()
        shutil.rmtree(cwd, ignore_errors=True)


def _kernel(settings: Settings) -> Section:
    counts = {
        "sq": KERNEL_TINY_QUICK if settings.quick else KERNEL_TINY,
        "slow_sq": KERNEL_10MS_QUICK if settings.quick else KERNEL_10MS,
    }
    w = settings.workers
    reps = settings.repetitions(3, 1)
    section = Section(
        "notebook-kernel",
        "13c. Notebook cells in a real kernel: cleanbreak and the peers",
        "A cell-defined function (`def sq(x)`, `def slow_sq(x)`) run from cells of an IPython "
        "kernel driven through `jupyter_client`, as a notebook front end drives it; a fresh "
        "kernel per (library, job, repetition). Timed inside the cell, "
        "`time.perf_counter()` around the call, results checked after. **One-shot**: the "
        "kernel's first pool, made and shut down in the cell. **Warm**: a pool held in a "
        f"variable (made in a cell of its own), its second call. N = {w} workers, default "
        f"contexts. Median of {reps} alternating run(s). Ratio: time against the fastest peer "
        "(not cleanbreak) on the same job and mode (lower is better).",
        [
            "job",
            "library",
            "start method",
            "one-shot",
            "vs fastest peer",
            "warm (held pool, 2nd call)",
            "vs fastest peer",
        ],
    )
    missing = notebook_kernel.available()
    if missing:
        section.notes.append(f"Not measured: {missing} not installed (pip install {missing}).")
        return section
    keys = [p.key for p in PEERS if available(p.lib)]
    found: dict[tuple[str, str], list[KernelRun]] = {}
    failed: set[tuple[str, str]] = set()
    for rep in range(reps):
        for job, n in counts.items():
            for key in rotated(keys, rep):
                tag = f"  notebook kernel {job} rep {rep + 1}/{reps} {key}"
                if (key, job) in failed:
                    progress(f"{tag}: skipped (failed before)")
                    continue
                t0 = time.monotonic()
                run = _kernel_run(PEER[key], job, n, w)
                found.setdefault((key, job), []).append(run)
                if run.failure:
                    failed.add((key, job))
                progress(
                    f"{tag}: one-shot {_fmt(run.oneshot)}, first {_fmt(run.first)}, warm "
                    f"{_fmt(run.warm)}"
                    + (f", FAILED: {run.failure}" if run.failure else "")
                    + f" ({time.monotonic() - t0:.1f} s with the kernel)"
                )

    def figure(key: str, job: str, what: str) -> float | None:
        values = [getattr(r, what) for r in found.get((key, job), [])]
        values = [v for v in values if v is not None]
        return median(values) if values else None

    for job, n in counts.items():
        fastest: dict[str, tuple[str, float]] = {}
        for what in ("oneshot", "warm"):
            peers = {
                k: v for k in keys if PEER[k].lib != CB and (v := figure(k, job, what)) is not None
            }
            if peers:
                top = min(peers, key=lambda k: peers[k])
                fastest[what] = (top, peers[top])
        for key in keys:
            peer = PEER[key]
            runs = found.get((key, job), [])
            methods = sorted({r.method for r in runs if r.method})
            row = [f"{n:,} {KERNEL_JOBS[job]}", peer.name, ", ".join(methods) or "—"]
            for what in ("oneshot", "warm"):
                value = figure(key, job, what)
                if value is None:
                    broke = any(r.failure for r in runs)
                    row += ["**fails** (see the notes)" if broke else "not measured", "—"]
                    continue
                best = fastest.get(what)
                ratio = (
                    "—"
                    if best is None
                    else "fastest peer"
                    if best[0] == key
                    else fmt_ratio(value / best[1])
                )
                row += [fmt_seconds(value), ratio]
            section.rows.append(row)
            failures = [r.failure for r in runs if r.failure]
            if failures:
                section.notes.append(
                    f"{peer.name}, {KERNEL_JOBS[job]}: failed in {len(failures)} of "
                    f"{len(runs)} kernel(s), not run again after its first failure: "
                    + "; ".join(sorted(set(failures)))
                )
        for what in ("oneshot", "warm"):
            best = fastest.get(what)
            cb = found.get(("cb", job), [])
            if best is None or not cb:
                continue
            section.notes.append(
                f"{KERNEL_JOBS[job]}, {MODE_LABEL[what]}, every run: cleanbreak "
                + ", ".join(_fmt(getattr(r, what)) for r in cb)
                + f"; fastest peer ({PEER[best[0]].name}) "
                + ", ".join(_fmt(getattr(r, what)) for r in found[(best[0], job)])
                + "."
            )
    defaults: dict[str, set[str]] = {}
    for (key, _), runs in found.items():
        if key in ("mp", "cf"):
            defaults.setdefault(PEER[key].name, set()).update(r.method for r in runs if r.method)
    if defaults:
        section.notes.append(
            f"Default start methods on this Python ({platform.python_version()}): "
            + ", ".join(f"{name} {'/'.join(sorted(m)) or '?'}" for name, m in defaults.items())
            + ". A fork worker is a copy of the kernel, the cell's functions included, so the "
            "function is found by name there. A worker that starts a fresh interpreter "
            "(forkserver, the default from Python 3.14 on Linux, or spawn) has no such "
            "function, and multiprocessing and concurrent.futures then fail with a cell's "
            "function; cleanbreak and joblib send it by value (cloudpickle)."
        )
    section.notes.append(
        "The cells, with `{f}` the cell's function and `xs` a list built in the setup cell: "
        + "; ".join(
            f"{p.name}: one-shot {_one_line(p.oneshot, f='{f}', w=w, cs='cs')}, held "
            + (_one_line(p.open, w=w) + " then " if p.open else "")
            + _one_line(p.call, f="{f}", w=w, cs="cs")
            for p in PEERS
            if p.key in keys
        )
        + f". cs: tiny tasks, what Pool.map picks, ceil(n / (4 x N)) = "
        f"{pool_chunksize(counts['sq'], w):,}; 10 ms tasks, 1 (the default)."
    )
    after: dict[str, set[str]] = {}
    for (key, _), runs in found.items():
        for run in runs:
            if run.after is not None:
                counts_after = Counter(run.after)
                after.setdefault(PEER[key].name, set()).add(
                    ", ".join(f"{n} {name}" for name, n in sorted(counts_after.items()))
                    or "nothing"
                )
    if after:
        section.notes.append(
            "What ran in the kernel's session after the last cell (the held pool shut down; "
            "joblib's executor is kept for its next call), in each kernel: "
            + "; ".join(f"{name}: {' or '.join(sorted(seen))}" for name, seen in after.items())
            + "."
        )
    return section


def _fmt(value: float | None) -> str:
    return "—" if value is None else fmt_seconds(value)


def run_notebook(settings: Settings) -> list[Section]:
    counts = {
        "inc": TINY_QUICK if settings.quick else TINY,
        "busy_1ms": MS_QUICK if settings.quick else MS,
    }
    return [_warm(settings, counts), _oneshot(settings, counts), _kernel(settings)]
