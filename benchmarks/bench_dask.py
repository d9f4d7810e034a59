"""Measurement 9: the Dask backend's overhead per task, against plain ``Client.map``.

cleanbreak's ``Pool(dask=...)`` runs its tasks on a ``dask.distributed`` cluster: it cuts a
``map`` into units (chunks sized to about 50 ms of work once it has timed the task, at most
``2 x threads`` of them submitted at a time), and each unit runs as one Dask task that reads a
stop gate before each item. This compares it with what a Dask user writes without it,
``client.gather(client.map(f, xs))`` (one Dask task per item), on the same kind of cluster.

Each (API, repetition) runs in a fresh child process that starts its own
``distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
dashboard_address=None)`` (not timed; its scratch folder is a temporary one, deleted at the
end). The cluster's workers are spawned processes: they inherit the child's ``sys.path``, whose
first entry is ``benchmarks/``, so they import ``tasks`` by reference like every other pool's
workers. The child times, in this order:

1. *one-shot* (the first thing on the fresh cluster): connecting and a first ``map`` of a few
   tiny tasks, ``with Client(address) as c: c.gather(c.map(f, xs))`` or ``with
   Pool(dask=address) as pool: list(pool.map(f, xs))``: what a user waits for first. The
   workers import the task module (and cleanbreak's unit runner) in this call. The exit of the
   ``with`` block (closing the client) is timed on its own.
2. *warm*: a ``Client(address)``, and for cleanbreak a ``Pool(dask=client)`` on it, warmed up
   by one untimed ``map`` of a few tiny tasks; then one ``map`` of tiny tasks (``x -> x+1``)
   and one ``map`` of tasks that busy-wait 10 ms, each over a list built beforehand, each
   result checked.

The child reports after every step, with the step it is in, so that a child that hangs (in a
``map``, or closing the pool, the client or the cluster) still says where. The runner keeps the
lines the child printed that look like warnings or errors (``distributed`` logs to stderr), to
show in the notes.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import tasks
from common import (
    Child,
    Section,
    Settings,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    median,
    progress,
    rotated,
)
from reporter import Reporter

TINY_TASKS, TINY_TASKS_QUICK = 2_000, 1_000
MS_TASKS, MS_TASKS_QUICK = 200, 100
TASK_SECONDS = 0.010  # tasks.busy_10ms
FIRST_PER_THREAD = 4  # the one-shot map and the warm-up: this many tiny tasks per thread
CHILD_TIMEOUT, CHILD_TIMEOUT_QUICK = 180.0, 90.0
# Dask's timings on a 2-core machine (scheduler, two nannies, two workers and the client on two
# cores) are noisy, and a run takes a few seconds: more repetitions than the other measurements.
REPS, REPS_QUICK = 7, 2
SLOW_CLOSE = 2.0  # a close that takes longer than this is called out in the notes

MapFn = Callable[[Callable[[Any], Any], list[Any]], list[Any]]


@dataclass(frozen=True)
class DaskApi:
    key: str
    short: str
    warm_label: str
    cold_label: str


APIS: tuple[DaskApi, ...] = (
    DaskApi(
        "client",
        "Client.map",
        "distributed `client.gather(client.map(f, xs))`",
        "`with Client(address) as c: c.gather(c.map(f, xs))`",
    ),
    DaskApi(
        "cb",
        "cleanbreak",
        "cleanbreak `list(Pool(dask=client).map(f, xs))`",
        "`with Pool(dask=address) as p: list(p.map(f, xs))`",
    ),
)
API = {a.key: a for a in APIS}
BASE = "client"


# ── the child ────────────────────────────────────────────────────────────────────────────────


def _step(found: dict[str, Any], report: Reporter, name: str) -> None:
    found["step"] = name
    report(found)


def _distributed() -> Any:
    """``dask.distributed``, untyped (its annotations are partial)."""
    return importlib.import_module("distributed")


@contextlib.contextmanager
def _one_shot(key: str, address: str) -> Iterator[MapFn]:
    """What a user writes first: connect to the scheduler at ``address``, ``map``, close."""
    if key == "client":
        with _distributed().Client(address) as client:
            yield lambda fn, items: list(client.gather(client.map(fn, items)))
    else:
        import cleanbreak

        with cleanbreak.Pool(dask=address) as pool:
            yield lambda fn, items: list(pool.map(fn, items))


@contextlib.contextmanager
def _warm(key: str, client: Any, found: dict[str, Any], report: Reporter) -> Iterator[MapFn]:
    """A ``map`` on ``client``: its own, or a cleanbreak ``Pool(dask=client)`` (whose exit is
    timed as ``pool_close``)."""
    if key == "client":
        yield lambda fn, items: list(client.gather(client.map(fn, items)))
        return
    import cleanbreak

    pool = cleanbreak.Pool(dask=client)
    found["pool_workers"] = pool.workers
    try:
        yield lambda fn, items: list(pool.map(fn, items))
    except BaseException as exc:
        pool.__exit__(type(exc), exc, exc.__traceback__)
        raise
    _step(found, report, "closing the pool")
    start = time.perf_counter()
    pool.__exit__(None, None, None)
    found["pool_close"] = time.perf_counter() - start


def _check(out: list[Any], expected: list[Any], what: str) -> None:
    if out != expected:
        raise AssertionError(f"{what}: wrong results")


def child_dask(params: dict[str, Any], report: Reporter) -> None:
    key: str = params["api"]
    workers: int = params["workers"]
    tiny = list(range(params["tiny"]))
    ms = list(range(params["ms"]))
    first = list(range(-FIRST_PER_THREAD * workers, 0))  # other items than the timed ones
    warmup = list(range(-2 * FIRST_PER_THREAD * workers, -FIRST_PER_THREAD * workers))
    distributed = _distributed()
    if key == "cb":
        import cleanbreak  # noqa: F401  (imported before any clock starts)

    found: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="cb-bench-dask-")
    try:
        _step(found, report, "starting the cluster")
        start = time.perf_counter()
        cluster = distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            local_directory=tmp,
        )
        found["cluster_start"] = time.perf_counter() - start
        try:
            address = str(cluster.scheduler_address)

            _step(found, report, "one-shot: connecting")
            gc.collect()
            start = time.perf_counter()
            with _one_shot(key, address) as run:
                found["connect"] = time.perf_counter() - start
                _step(found, report, "one-shot: first map")
                out = run(tasks.inc, first)
                found["first"] = time.perf_counter() - start
                _check(out, [x + 1 for x in first], "one-shot map")
                _step(found, report, "one-shot: closing")
                closing = time.perf_counter()
            found["oneshot_close"] = time.perf_counter() - closing

            _step(found, report, "warm: connecting")
            with distributed.Client(address, set_as_default=False) as client:
                found["threads"] = sum(client.nthreads().values())
                with _warm(key, client, found, report) as run:
                    _step(found, report, "warm: warm-up map")
                    run(tasks.inc, warmup)
                    gc.collect()
                    _step(found, report, f"warm: map of {len(tiny):,} tiny tasks")
                    start = time.perf_counter()
                    out = run(tasks.inc, tiny)
                    found["tiny"] = time.perf_counter() - start
                    _check(out, [x + 1 for x in tiny], "tiny tasks")
                    del out
                    gc.collect()
                    _step(found, report, f"warm: map of {len(ms):,} tasks of 10 ms")
                    start = time.perf_counter()
                    out = run(tasks.busy_10ms, ms)
                    found["ms"] = time.perf_counter() - start
                    _check(out, ms, "10 ms tasks")
                    del out
                _step(found, report, "closing the client")
                closing = time.perf_counter()
            found["client_close"] = time.perf_counter() - closing
        finally:
            _step(found, report, "closing the cluster")
            start = time.perf_counter()
            cluster.close()
            found["cluster_close"] = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _step(found, report, "done")


# ── the runner ───────────────────────────────────────────────────────────────────────────────

Figures = dict[str, list[float]]

_ODD = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|Warning\b|Error\b|Exception\b")
_NOISE = re.compile(r"tcp://[\d.]+:\d+|0x[0-9a-f]+|\b[0-9a-f]{8,}\b|\d+(\.\d+)?")
_STAMP = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ - ")


def _odd_lines(text: str) -> dict[str, str]:
    """The lines of a child's output that look like warnings or errors: a key with addresses,
    ids and numbers blanked out (the same message from another run) -> the first such line."""
    found: dict[str, str] = {}
    for raw in text.splitlines():
        if _ODD.search(raw):
            line = _STAMP.sub("", raw.strip())
            found.setdefault(_NOISE.sub("#", line), line)
    return found


@dataclass
class Outcome:
    figures: Figures
    problems: list[str]  # runs that failed or hung, and where
    odd: dict[str, tuple[str, int]]  # message key -> (first line seen, in how many runs)
    runs: int = 0


def _run_one(key: str, params: dict[str, Any], timeout: float, tag: str, outcome: Outcome) -> None:
    with Child("dask", params) as child:
        exited = child.wait(timeout)
        result = child.result() or {}
        text = ""
        with contextlib.suppress(OSError):
            text = child.output.read_text(errors="replace")
        outcome.runs += 1
        for msg_key, line in _odd_lines(text).items():
            first, count = outcome.odd.get(msg_key, (line, 0))
            outcome.odd[msg_key] = (first, count + 1)
        step = result.get("step", "starting")
        if not exited:
            why = f"hung: no exit within {timeout:.0f} s, in step '{step}'"
        elif child.returncode != 0 or step != "done":
            tail = child.output_tail(6).replace("\n", " / ")
            why = f"exit {child.returncode} in step '{step}': {tail}"
        else:
            why = ""
        if why:
            outcome.problems.append(f"{API[key].warm_label}, {tag}: {why}")
    for name, value in result.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            outcome.figures.setdefault(f"{key}:{name}", []).append(float(value))
    if why:
        progress(f"  dask {tag} {key}: FAILED ({why})")
        return
    progress(
        f"  dask {tag} {key}: one-shot {result['first']:.3f} s (connect {result['connect']:.3f} "
        f"s), tiny {result['tiny']:.3f} s, 10 ms {result['ms']:.3f} s; cluster start "
        f"{result['cluster_start']:.2f} s, close {result['cluster_close']:.2f} s"
    )


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_dask(settings: Settings) -> list[Section]:
    tiny = TINY_TASKS_QUICK if settings.quick else TINY_TASKS
    ms = MS_TASKS_QUICK if settings.quick else MS_TASKS
    reps = settings.repetitions(REPS, REPS_QUICK)
    outcome = Outcome({}, [], {})
    if importlib.util.find_spec("distributed") is None:
        outcome.problems.append(
            "distributed is not installed: pip install -e '.[bench]' (or '.[dask]')"
        )
    else:
        keys = [a.key for a in APIS]
        timeout = CHILD_TIMEOUT_QUICK if settings.quick else CHILD_TIMEOUT
        for rep in range(reps):
            for key in rotated(keys, rep):
                params = {"api": key, "workers": settings.workers, "tiny": tiny, "ms": ms}
                _run_one(key, params, timeout, f"rep {rep + 1}/{reps}", outcome)
    return [
        _warm_section(settings, tiny, ms, reps, outcome),
        _cold_section(settings, reps, outcome),
    ]


def _cluster(settings: Settings) -> str:
    return (
        f"distributed {_version('distributed')}, `LocalCluster(n_workers={settings.workers}, "
        "threads_per_worker=1, processes=True)`"
    )


def _med(outcome: Outcome, key: str, name: str) -> float | None:
    values = outcome.figures.get(f"{key}:{name}")
    return median(values) if values else None


def _warm_section(settings: Settings, tiny: int, ms: int, reps: int, outcome: Outcome) -> Section:
    threads_seen = outcome.figures.get("client:threads") or outcome.figures.get("cb:threads")
    threads = round(median(threads_seen)) if threads_seen else settings.workers
    section = Section(
        "dask",
        "9a. Dask backend: overhead per task against Client.map",
        f"cleanbreak's `Pool(dask=client)` against plain `Client.map` on the same kind of "
        f"cluster ({_cluster(settings)}: {threads} threads), **warm**: the client (and the "
        "pool) made and one small `map` run before the timed call. Median of "
        f"{reps} alternating run(s), a fresh process and a fresh cluster per run. Overhead per "
        "task: (time - ideal) / tasks, where ideal = tasks x task time / threads (0 for the "
        "tiny tasks). Ratio: tasks/s against Client.map (higher is better).",
        ["job", "API", "tasks/s", "time", "overhead per task", "vs Client.map"],
    )
    jobs = (
        ("tiny", f"{tiny:,} tiny tasks (x -> x+1)", tiny, 0.0),
        ("ms", f"{ms:,} tasks that busy-wait 10 ms", ms, ms * TASK_SECONDS / threads),
    )
    for name, label, n, ideal in jobs:
        base = _med(outcome, BASE, name)
        for api in APIS:
            seconds = _med(outcome, api.key, name)
            if seconds is None:
                section.rows.append([label, api.warm_label, "not measured", "—", "—", "—"])
                continue
            section.rows.append(
                [
                    label,
                    api.warm_label,
                    fmt_rate(n / seconds),
                    fmt_seconds(seconds),
                    f"{(seconds - ideal) / n * 1000:.2f} ms",
                    fmt_ratio(base / seconds) if base else "—",
                ]
            )
    notes = section.notes
    sizes = outcome.figures.get("cb:pool_workers", [])
    if any(size != threads for size in sizes):
        notes.append(f"**`pool.workers` was not the cluster's {threads} threads**: {sizes}.")
    notes.append(
        f"Ideal for the 10 ms tasks: {ms:,} x 10 ms / {threads} threads = "
        f"{fmt_seconds(ms * TASK_SECONDS / threads)}, i.e. {threads / TASK_SECONDS:,.0f} "
        "tasks/s."
    )
    notes.append(
        "`Client.map` makes one Dask task per item (keys hashed from the function and the "
        "item, `pure=True` by default); cleanbreak's pool makes one Dask task per unit of "
        "items, sized to about 50 ms of work once it has timed the function, with at most "
        "2 x threads units submitted at a time."
    )
    for name, label, _n, _ideal in jobs:
        runs = [
            f"{api.short} "
            + ", ".join(f"{x:.3f}" for x in outcome.figures.get(f"{api.key}:{name}", []))
            + " s"
            for api in APIS
            if outcome.figures.get(f"{api.key}:{name}")
        ]
        if runs:
            notes.append(f"Every run, {label}: {'; '.join(runs)} (the spread is the noise).")
    _problem_notes(section, outcome)
    return section


def _cold_section(settings: Settings, reps: int, outcome: Outcome) -> Section:
    first = FIRST_PER_THREAD * settings.workers
    section = Section(
        "dask-oneshot",
        "9b. Dask backend: one-shot, connecting and a first map",
        f"What a user waits for first: connecting to the scheduler of a fresh cluster "
        f"({_cluster(settings)}) and a first `map` of {first} tiny tasks, in a `with` block; "
        "**one-shot**, not warm: the workers import the task module (and cleanbreak's unit "
        f"runner) during this call. Median of {reps} alternating run(s), a fresh process and a "
        "fresh cluster per run. Ratio: time against Client (lower is better).",
        [
            "API",
            "connect",
            "connect + first map",
            "vs Client",
            "exit of the `with` block",
        ],
    )
    base = _med(outcome, BASE, "first")
    for api in APIS:
        connect = _med(outcome, api.key, "connect")
        total = _med(outcome, api.key, "first")
        close = _med(outcome, api.key, "oneshot_close")
        if total is None or connect is None:
            section.rows.append([api.cold_label, "—", "not measured", "—", "—"])
            continue
        section.rows.append(
            [
                api.cold_label,
                fmt_seconds(connect),
                fmt_seconds(total),
                fmt_ratio(total / base) if base else "—",
                fmt_seconds(close) if close is not None else "—",
            ]
        )
    notes = section.notes
    starts = [
        *outcome.figures.get("client:cluster_start", []),
        *outcome.figures.get("cb:cluster_start", []),
    ]
    stops = [
        *outcome.figures.get("client:cluster_close", []),
        *outcome.figures.get("cb:cluster_close", []),
    ]
    if starts and stops:
        notes.append(
            f"Not timed above: starting the `LocalCluster` took {fmt_seconds(median(starts))} "
            f"(median; {fmt_seconds(min(starts))} to {fmt_seconds(max(starts))}), closing it "
            f"{fmt_seconds(median(stops))} ({fmt_seconds(min(stops))} to "
            f"{fmt_seconds(max(stops))})."
        )
    closes = [
        (label, values)
        for label, values in (
            ("the warm pool's exit", outcome.figures.get("cb:pool_close", [])),
            (
                "the warm client's exit (cleanbreak runs)",
                outcome.figures.get("cb:client_close", []),
            ),
            (
                "the warm client's exit (Client.map runs)",
                outcome.figures.get("client:client_close", []),
            ),
        )
        if values
    ]
    if closes:
        notes.append(
            "Closing, warm part: "
            + "; ".join(
                f"{label} {fmt_seconds(median(v))} (at most {fmt_seconds(max(v))})"
                for label, v in closes
            )
            + "."
        )
    slow = [
        f"{name} {fmt_seconds(x)}"
        for name in ("oneshot_close", "pool_close", "client_close", "cluster_close")
        for key in (BASE, "cb")
        for x in outcome.figures.get(f"{key}:{name}", [])
        if x > SLOW_CLOSE
    ]
    if slow:
        notes.append(f"**Slow closes** (over {SLOW_CLOSE:.0f} s): {', '.join(slow)}.")
    return section


def _problem_notes(section: Section, outcome: Outcome) -> None:
    for problem in outcome.problems:
        section.notes.append(f"**Failed**: {problem}")
    if not outcome.runs:
        return
    if not outcome.odd:
        section.notes.append(
            f"No warnings or errors in the output of the {outcome.runs} child process(es) "
            "(the cluster's workers log to it too)."
        )
        return
    for first, count in sorted(outcome.odd.values(), key=lambda v: -v[1]):
        shown = first if len(first) <= 200 else first[:199] + "…"
        section.notes.append(
            f"Printed in {count} of {outcome.runs} run(s) (warning or error): `{shown}`"
        )
