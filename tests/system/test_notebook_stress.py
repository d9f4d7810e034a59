"""The interrupt button at random moments, in a real IPython kernel, through every API.

The notebook twin of ``test_stress.py``. One kernel (``_kernel.Kernel``, driven through
``jupyter_client``) serves the whole test; a new one takes over only if it died or hung. Each
run is one cell: it defines the task function (so it goes to the workers by value, as a
notebook user's does), then runs 60 tasks of 1-40 ms on 2 workers through one API: ``submit``
(futures, then ``.result()`` of each), ``map``, ``imap_unordered`` over a generator,
``cleanbreak.map``, ``map`` in drain mode, or asyncio's ``run_in_executor`` in a cell that
awaits each future (the kernel runs such a cell as a coroutine, under a SIGINT handler of its
own, which ours chains); on one start method; with a pool made in the
cell (``with cleanbreak.Pool(...)``, or ``cleanbreak.map``) or one held in a variable since an
earlier cell, the same pool from run to run (so each run with it also checks that it lives on
after the last interrupt). The loop that takes the results only keeps each one, or, in half the
runs, also works on it for ``WORK_MS`` (a plot, a file: where a notebook user's interrupt often
lands). The cell prints a marker as the job is about to start; the test waits for it, waits a
random time (the moment under test, not a synchronisation) and presses the interrupt button
(``Kernel.interrupt``: SIGINT to the kernel's process group). Half the cells catch
``Interrupted``; the others leave it uncaught, and the next cell reads it from
``sys.last_value`` (``sys.last_exc`` on 3.12+). That next cell, which prints the run's report,
is also the check that the kernel lives.

The instrumentation is in ``scripts/notebook_stress_cells.py``: the tasks' start and end
events with the moment their worker read the gate (as in ``stress_child.py``), each pool's gate
closing (tagged with the pool it belongs to: the interrupt stops every live pool, held ones
too), and when the Interrupted was made, shown and the cell ended. Events go to an append-only
file per run (see there for why not a FIFO), read once the cell is over.

Counted, each of which must be 0:

- hangs: the cell did not end within ``EXIT_GUARD`` seconds of the interrupt (the kernel's
  stacks are printed, and a new kernel takes over)
- kernel died: the kernel was not alive during or after the run, or did not run the next cell
- cell errors: the cell ended with an error that is not an ``Interrupted`` (a held pool that
  refuses its next call, say), or never printed its marker; or the interrupt raised nothing
  (the cell ran on, ``NOTHING_RAISED_NS`` or more after it, to its normal end). A held pool's
  ``run_in_executor`` cell that ends with ``CancelledError`` is counted apart ("cancelled by
  the kernel": the README's known limits), and checked for everything else
- processes left: a worker still alive 1 s after the cell ended. The kernel's fork server and
  resource tracker (its children, by their command lines) are not workers. Whatever else
  descends from the kernel is a pool's worker: after an ``Interrupted`` none may be left, since
  the interrupt stops every live pool, held ones too; when the job ended before the interrupt,
  none of a pool made in the cell may be left, and a held pool keeps its workers. The workers
  that ran the run's tasks (their pids, from the start events) are checked by pid as well
- results lost: a task that had computed its result (its ``end`` event) at least 1 ms before
  the interrupt, whose result the cell does not have: neither yielded, nor in
  ``Interrupted.completed``, nor (``submit``, ``run_in_executor``) the result of its future;
  in drain mode, any task that ended at all. A job that ended before the interrupt must have
  yielded all 60
- results wrong: a kept result with the wrong value (or another run's), a ``map`` result under
  the wrong index in ``completed``, or one both yielded and in ``completed``
- tasks started late: a task whose worker read the gate for it after its pool closed the gate
- tracebacks: any text on the cell's stderr (or the next cell's: ipykernel forwards what the
  workers write, to the cell that runs when it arrives), "Traceback" in its stdout, or an
  uncaught ``Interrupted`` shown as more than its one line
- slow stops: in terminate mode, the cell had the ``Interrupted`` (caught: its ``except`` ran;
  uncaught: IPython showed it) more than 0.1 s after the interrupt once a task had started (0.45 s
  when two tests share the cores: ``_harness.SLOW_STOP_NS``), or
  more than ``STARTING_NS`` while the pool was still starting (as in the terminal test). Each
  stop is recorded with its kind, and a slow one with its moment and where the time went

A run whose job ended before the interrupt counts only for leftovers (and must have every
result), as in the terminal test; so does one interrupted by the kernel's own
``KeyboardInterrupt`` before any pool existed (no task had started: nothing was at stake).

Settings (environment): ``CLEANBREAK_NOTEBOOK_STRESS_RUNS`` (default 18, for CI: every API on
every start method once; the holder, the catching and the loop's body go round in a cycle of 8,
shifted by one for each round of the APIs, so 144 runs make every combination), ``_SEED``,
``_WORK_MS``; to narrow a failure down, ``_APIS`` and ``_METHODS`` (comma-separated) and
``_LOG`` (a file that gets one JSON line per run: its combination, moment, stop, gate,
leftovers and problems); to see a count fail, ``_BREAK`` (one
of ``BREAKS``: a fault injected into the kernel). The counts and figures are printed in the
figures summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from ._harness import EXIT_GUARD, METHODS, SLOW_STOP_NS, record
from ._kernel import Kernel
from .scripts.notebook_stress_cells import MARKER, REPORT

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

APIS = ["submit", "map", "imap_unordered", "cbmap", "drain", "run_in_executor"]
# To narrow a failure down: only these APIs (comma-separated), only these start methods.
APIS = os.environ.get("CLEANBREAK_NOTEBOOK_STRESS_APIS", ",".join(APIS)).split(",")
METHODS = os.environ.get("CLEANBREAK_NOTEBOOK_STRESS_METHODS", ",".join(METHODS)).split(",")
RUNS = int(os.environ.get("CLEANBREAK_NOTEBOOK_STRESS_RUNS", str(len(APIS) * len(METHODS))))
SEED = int(os.environ.get("CLEANBREAK_NOTEBOOK_STRESS_SEED", str(time.time_ns() % 1_000_000)))
TASKS = 60
# How long the loop's body works on each result it takes, in the runs where it does.
WORK_MS = float(os.environ.get("CLEANBREAK_NOTEBOOK_STRESS_WORK_MS", "20"))
LEFT_AFTER = 1.0  # seconds after the cell's end by which no worker of it may be left
MARGIN_NS = 1_000_000  # a result computed this long before the interrupt must be kept
# The longest stop while the pool starts (as in test_stress.py).
STARTING_NS = max(300_000_000, SLOW_STOP_NS)
NOTHING_RAISED_NS = 10_000_000  # a cell that ends this long after the interrupt raised nothing
REPORT_GUARD = 20.0  # deadlock guard for the cell that reports a run
LOG = os.environ.get("CLEANBREAK_NOTEBOOK_STRESS_LOG")  # a file for one JSON line per run
COUNTS = [
    "hangs",
    "kernel died",
    "cell errors",
    "processes left",
    "results lost",
    "results wrong",
    "tasks started late",
    "tracebacks",
    "slow stops",
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks
INFRA = ("multiprocessing.forkserver import main", "multiprocessing.resource_tracker import main")


@dataclass(frozen=True)
class Combo:
    api: str
    method: str
    held: bool  # a pool held in a variable since an earlier cell (else made in the cell)
    caught: bool  # the cell catches Interrupted (else the next cell reads sys.last_value)
    works: bool  # the loop's body works on each result (else it only keeps it)

    @property
    def mode(self) -> str:
        return "drain" if self.api == "drain" else "terminate"

    @property
    def held_name(self) -> str:
        return f"held-{self.method}-{self.mode}"

    def label(self, run: int) -> str:
        holder = "held pool" if self.held else "pool of the cell"
        catch = "caught" if self.caught else "uncaught"
        body = f", a body of {WORK_MS:g} ms" if self.works else ""
        return f"run {run} ({self.api}, {self.method}, {holder}, {catch}{body}, seed {SEED})"


def combo(run: int) -> Combo:
    """The run's combination: every API on one start method, then on the next (every pair in
    18 runs); the holder, the catching and the loop's body alternate in a cycle of 8, shifted
    by one for each round of the pairs: every combination in 144 runs."""
    pairs = len(APIS) * len(METHODS)
    api = APIS[run % len(APIS)]
    method = METHODS[run // len(APIS) % len(METHODS)]
    turn = (run % pairs + run // pairs) % 8
    held = turn % 2 == 1 and api != "cbmap"  # cleanbreak.map makes its own pool
    works = (turn // 4) % 2 == 1 and api != "cbmap"  # (which has no loop)
    return Combo(api, method, held, (turn // 2) % 2 == 0, works)


# ── the cells ────────────────────────────────────────────────────────────────────────────────

SETUP = """\
import faulthandler, os, signal, time
_stacks = open({stacks!r}, "w")
faulthandler.register(signal.SIGUSR1, file=_stacks, all_threads=True)
import cleanbreak
from tests.system.scripts import notebook_stress_cells as cells
cells.setup()
HELD = {{}}
"""

# Faults to inject, to see each count fail (CLEANBREAK_NOTEBOOK_STRESS_BREAK=name): code run in
# the kernel after SETUP (and, for "traceback", a line in the task).
BREAKS = {
    # A pool call that stops the pool waits 15 s first: hangs.
    "hang": """\
_real_stop = cleanbreak._pool.Pool._stop
def _broken_stop(self, exc):
    time.sleep(15)
    _real_stop(self, exc)
cleanbreak._pool.Pool._stop = _broken_stop
""",
    # ... 0.2 s: slow stops.
    "slow": """\
_real_stop = cleanbreak._pool.Pool._stop
def _broken_stop(self, exc):
    time.sleep(0.2)
    _real_stop(self, exc)
cleanbreak._pool.Pool._stop = _broken_stop
""",
    # The kernel exits as a pool call makes its Interrupted: kernel died.
    "died": """\
def _broken_interrupted(self, *args, **kwargs):
    os._exit(1)
cleanbreak._pool.Pool._interrupted = _broken_interrupted
""",
    # A held pool refuses the calls after an interrupt: cell errors.
    "refuse": """\
def _refuse(self):
    if self._signal is not None:
        raise RuntimeError("cannot schedule new tasks: the pool was interrupted")
cleanbreak._pool.Pool._rearm = _refuse
""",
    # An Interrupted made by a pool call forgets its results: results lost.
    "lost": """\
_real_interrupted = cleanbreak._pool.Pool._interrupted
def _broken_interrupted(self, *args, **kwargs):
    exc = _real_interrupted(self, *args, **kwargs)
    exc.completed.clear()
    return exc
cleanbreak._pool.Pool._interrupted = _broken_interrupted
""",
    # ... or gets them wrong: results wrong.
    "wrong": """\
_real_interrupted = cleanbreak._pool.Pool._interrupted
def _broken_interrupted(self, *args, **kwargs):
    exc = _real_interrupted(self, *args, **kwargs)
    exc.completed.update({k: (r, i, v + 1) for k, (r, i, v) in exc.completed.items()})
    return exc
cleanbreak._pool.Pool._interrupted = _broken_interrupted
""",
    # The pools never close their gates (but say they did): tasks started late.
    "gate": """\
def _open_gate(gate):
    cells.emit(cells._events, "gate", time.monotonic_ns(), gate.nb_stress_tag)
cleanbreak._manager.close_gate = _open_gate
""",
    # Once a pool has stopped, a process of the kernel's outlives the cell: processes left.
    "left": """\
import multiprocessing
_real_stop = cleanbreak._pool.Pool._stop
def _broken_stop(self, exc):
    _real_stop(self, exc)
    multiprocessing.get_context("fork").Process(target=time.sleep, args=(3,)).start()
cleanbreak._pool.Pool._stop = _broken_stop
""",
    # A task writes a traceback on the worker's stderr: tracebacks.
    "traceback": "",
    "none": "",
}
BREAK = os.environ.get("CLEANBREAK_NOTEBOOK_STRESS_BREAK", "")
TASK_BREAK = """
    if index == 3:
        os.write(2, b"Traceback (most recent call last):\\n  a task's own\\n")"""

HOLD = """\
cells.tag({name!r})
HELD[{name!r}] = cleanbreak.Pool(
    2, on_interrupt={mode!r}, mp_context={method!r}, initializer=cells.time_gate_reads
)
"""

HEAD = """\
import asyncio, os, time
REPORT = {{"yielded": []}}
futures = None
cells.new_run({events!r}, {tag!r})

def nb_task(spec):
    run, index, seconds, events = spec{task_break}
    cells.emit(events, "start", index, os.getpid(), time.monotonic_ns(), cells.gate_read_ns())
    if index % 2:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
    else:
        time.sleep(seconds)
    cells.emit(events, "end", index, time.monotonic_ns())
    return run, index, 7 * index

specs = cells.specs({run}, {seed}, {tasks}, {events!r})
"""

JOBS = {
    "submit": """\
futures = []
for spec in specs:
    futures.append(pool.submit(nb_task, spec))
for fut in futures:
    REPORT["yielded"].append(fut.result())
""",
    "map": """\
for result in pool.map(nb_task, specs):
    REPORT["yielded"].append(result)
""",
    "imap_unordered": """\
for result in pool.imap_unordered(nb_task, cells.lazy(specs)):
    REPORT["yielded"].append(result)
""",
    # A cell that awaits: the kernel runs it as a coroutine, with a SIGINT handler of its own.
    "run_in_executor": """\
futures = []
for spec in specs:
    futures.append(asyncio.get_running_loop().run_in_executor(pool, nb_task, spec))
for fut in futures:
    REPORT["yielded"].append(await fut)
""",
}
JOBS["drain"] = JOBS["map"]

CBMAP = """\
REPORT["yielded"].extend(
    cleanbreak.map(nb_task, specs, workers=2, mp_context={method!r},
                   initializer=cells.time_gate_reads)
)
"""

WITH = """\
with cleanbreak.Pool(
    2, on_interrupt={mode!r}, mp_context={method!r}, initializer=cells.time_gate_reads
) as pool:
"""

CAUGHT = """\
except cleanbreak.Interrupted as exc:
    REPORT["caught_ns"] = time.monotonic_ns()
    REPORT["caught"] = exc
"""


def run_cell(c: Combo, run: int, seed: int, events: Path) -> str:
    """The code of a run's cell."""
    tag = c.held_name if c.held else f"run{run}"
    task_break = TASK_BREAK if BREAK == "traceback" else ""
    head = HEAD.format(
        events=str(events), tag=tag, run=run, seed=seed, tasks=TASKS, task_break=task_break
    )
    loop = JOBS.get(c.api, "")  # each ends with its loop's body, indented by 4
    if c.works:  # say, a plot or a file for each result: the interrupt often lands here
        loop += f"    time.sleep({WORK_MS / 1000})\n"
    if c.api == "cbmap":
        job = "cells.begin()\n" + CBMAP.format(method=c.method)
    elif c.held:
        job = f"pool = HELD[{c.held_name!r}]\ncells.begin()\n" + loop
    else:
        job = "cells.begin()\n" + WITH.format(mode=c.mode, method=c.method)
        job += textwrap.indent(loop, "    ")
    job += "cells.done()\n"
    if c.caught:
        job = "try:\n" + textwrap.indent(job, "    ") + CAUGHT
    return head + job


# ── the kernel ───────────────────────────────────────────────────────────────────────────────


@dataclass
class Notebook:
    """The test's kernel, started again if it dies or hangs."""

    tmp: Path
    kernel: Kernel | None = None
    held: set[str] = field(default_factory=set)
    restarts: int = 0

    @property
    def k(self) -> Kernel:
        if self.kernel is None:
            self.kernel = Kernel(self.tmp)
            self.held = set()
            self.kernel.ok(SETUP.format(stacks=str(self.stacks)) + BREAKS[BREAK or "none"])
        return self.kernel

    @property
    def stacks(self) -> Path:
        return self.tmp / f"stacks{self.restarts}.txt"

    def hold(self, c: Combo) -> None:
        """Make the run's held pool, in a cell of its own, the first time it is needed."""
        if c.held and c.held_name not in self.held:
            self.k.ok(HOLD.format(name=c.held_name, mode=c.mode, method=c.method))
            self.held.add(c.held_name)

    def workers(self) -> dict[int, str]:
        """The kernel's live descendants but its fork server and resource tracker: the
        pools' workers (and whatever those started), with their command lines."""
        kernel = self.k
        out: dict[int, str] = {}
        for proc in kernel.descendants():
            with contextlib.suppress(psutil.Error):
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(proc.cmdline())
                if proc.ppid() == kernel.pid and any(s in cmd for s in INFRA):
                    continue
                out[proc.pid] = cmd[:120]
        return out

    def dump_stacks(self) -> str:
        """Every thread's stack in the kernel (faulthandler on SIGUSR1, set up in SETUP)."""
        if self.kernel is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.kernel.pid, signal.SIGUSR1)
                time.sleep(0.5)  # diagnostics only: let faulthandler write them
        with contextlib.suppress(OSError):
            return self.stacks.read_text(errors="replace")
        return "(no stacks)"

    def restart(self) -> None:
        """Kill the kernel and whatever it started; the next use starts a new one."""
        if self.kernel is None:
            return
        procs = self.kernel.descendants()
        self.kernel.shutdown()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self.kernel = None
        self.restarts += 1

    def close(self) -> None:
        self.restart()


# ── one run ──────────────────────────────────────────────────────────────────────────────────


@dataclass
class Events:
    begin: int | None = None
    done: int | None = None
    starts: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # i: pid, ns, read ns
    ends: dict[int, int] = field(default_factory=dict)
    gates: list[tuple[int, str]] = field(default_factory=list)


def read_events(path: Path) -> Events:
    ev = Events()
    if not path.exists():
        return ev
    for line in path.read_text().splitlines():
        kind, *args = line.split()
        if kind == "begin":
            ev.begin = int(args[0])
        elif kind == "done":
            ev.done = int(args[0])
        elif kind == "start":
            ev.starts[int(args[0])] = (int(args[1]), int(args[2]), int(args[3]))
        elif kind == "end":
            ev.ends[int(args[0])] = int(args[1])
        elif kind == "gate":
            ev.gates.append((int(args[0]), args[1]))
        else:
            raise AssertionError(f"unknown event {line!r} in {path}")
    return ev


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def leftovers(
    nb: Notebook, must_go: Any, pids: set[int], ended_ns: int
) -> tuple[dict[int, str], float]:
    """Poll (every 10 ms) until none of the workers that must go (``must_go(workers)``
    picks them) and none of ``pids`` is alive, or ``LEFT_AFTER`` s after the cell ended.
    Returns what is left and how long after the cell's end the check passed (or gave up)."""
    deadline = ended_ns + int(LEFT_AFTER * 1e9)
    while True:
        left: dict[int, str] = must_go(nb.workers())
        left |= {p: "(a worker of the run's tasks)" for p in pids if p not in left and _alive(p)}
        now = time.monotonic_ns()
        if not left or now >= deadline:
            return left, (now - ended_ns) / 1e9
        time.sleep(0.01)


def kept_results(c: Combo, run: int, rep: dict[str, Any], wrong: list[str]) -> set[int]:
    """The indices of the results the cell has, checking every value."""
    yielded = [tuple(v) for v in rep["yielded"]]
    completed = {int(k): tuple(v) for k, v in (rep["completed"] or {}).items()}
    futures = [tuple(v) for v in rep["futures"] or []]
    for v in [*yielded, *completed.values(), *futures]:
        if v != (run, v[1], 7 * v[1]):
            wrong.append(f"{list(v)} is not [{run}, i, 7 * i]")
    if c.api not in ("submit", "run_in_executor"):
        wrong.extend(
            f"completed[{k}] is task {v[1]}'s result" for k, v in completed.items() if k != v[1]
        )
        both = {v[1] for v in yielded} & {v[1] for v in completed.values()}
        if both:
            wrong.append(f"yielded and in completed: {sorted(both)}")
    return {v[1] for v in [*yielded, *completed.values(), *futures]}


def run_once(nb: Notebook, run: int, rng: random.Random) -> list[str]:
    """One run: its cell, the interrupt at a random moment, the report; what went wrong, as
    ``count: detail`` lines (and notes without a count)."""
    c = combo(run)
    label = c.label(run)
    events = nb.tmp / f"run{run}.events"
    nb.hold(c)
    kernel = nb.k
    before = nb.workers()
    cell = kernel.start(run_cell(c, run, rng.randrange(1 << 30), events))
    try:
        kernel.wait_for_output(cell, MARKER)
    except AssertionError as exc:
        nb.restart()
        return [f"cell errors: {label}: {exc}"]
    time.sleep(rng.uniform(0.0, 0.9))  # the random moment
    sent = kernel.interrupt()
    deadline = time.monotonic() + EXIT_GUARD
    while not cell.done:
        if not kernel.alive():
            nb.restart()
            return [f"kernel died: {label}: in the cell\n{cell.summary()}"]
        if time.monotonic() > deadline:
            stacks = nb.dump_stacks()
            nb.restart()
            return [f"hangs: {label}: {cell.summary()}\nthe kernel's stacks:\n{stacks}"]
        with contextlib.suppress(AssertionError):
            kernel.wait(cell, 0.5)
    seen_end = time.monotonic_ns()
    with contextlib.suppress(AssertionError):
        kernel.wait(cell, REPORT_GUARD)  # its reply
    if not kernel.alive():
        nb.restart()
        return [f"kernel died: {label}: after the cell\n{cell.summary()}"]
    try:
        report = kernel.run("cells.report(REPORT, futures)", REPORT_GUARD)
    except AssertionError as exc:
        nb.restart()
        return [f"kernel died: {label}: the next cell did not run: {exc}"]
    lines = [ln for ln in report.stdout.splitlines() if ln.startswith(REPORT)]
    if report.status != "ok" or len(lines) != 1:
        return [f"cell errors: {label}: the report cell failed\n{report.summary()}"]
    rep: dict[str, Any] = json.loads(lines[0][len(REPORT) :])
    ev = read_events(events)
    facts: dict[str, Any] = {"run": run, "combo": vars(c)}
    if ev.begin is not None:
        facts["moment_ms"] = (sent - ev.begin) / 1e6
    out = judge(nb, c, label, sent, seen_end, before, cell, report, rep, ev, facts)
    if LOG:
        with open(LOG, "a") as log:
            print(json.dumps({**facts, "problems": [ANSI.sub("", p) for p in out]}), file=log)
    return out


def judge(
    nb: Notebook,
    c: Combo,
    label: str,
    sent: int,
    seen_end: int,
    before: dict[int, str],
    cell: Any,
    report: Any,
    rep: dict[str, Any],
    ev: Events,
    facts: dict[str, Any],
) -> list[str]:
    out: list[str] = []
    run = int(label.split()[1])
    ended = rep["cell_ended_ns"] or seen_end
    exception = rep["exception"]
    interrupted = exception == "Interrupted"
    # A held pool in a cell that awaits it, the button pressed while the cell waits: the
    # kernel cancels the cell (its own handler, which ours chains), and the cell ends with
    # CancelledError, not Interrupted (see the README's known limits). The pool has stopped
    # all the same: everything else is checked as for an Interrupted.
    cancelled = exception == "CancelledError" and c.api == "run_in_executor" and c.held
    stopped = interrupted or cancelled

    # Leftovers, first: they count whatever the run's outcome.
    run_pids = {pid for pid, _ns, _read in ev.starts.values()}
    if stopped:  # every live pool stopped, held ones too
        must_go: Any = lambda now: now  # noqa: E731
    elif c.held:  # the held pool lives on: its workers stay
        must_go = lambda now: {}  # noqa: E731
        run_pids = set()
    else:  # the cell's own pool is gone; held pools, idle since before, stay
        must_go = lambda now: {p: n for p, n in now.items() if p not in before}  # noqa: E731
    left, took = leftovers(nb, must_go, run_pids, ended)
    if left:
        out.append(f"processes left: {label}: {took:.2f} s after the cell ended: {left}")
    elif ended > sent:  # (else the test was still waiting to interrupt as the cell ended)
        facts["gone_ms"] = took * 1000
        record("notebook stress: cell end to its workers gone (ms)", took * 1000)

    # The workers' output, to this cell or to the next one (tracebacks), whatever the outcome.
    if cell.stderr.strip() or report.stderr.strip() or "Traceback" in cell.stdout:
        out.append(
            f"tracebacks: {label}: stdout\n{cell.stdout}\nstderr\n{cell.stderr}"
            f"\nthe next cell's stderr\n{report.stderr}"
        )
    if cell.error is not None and cell.error.get("ename") == "Interrupted":
        shown = cell.error.get("traceback", [])
        if len(shown) != 1:
            out.append(f"tracebacks: {label}: the uncaught Interrupted showed\n{shown}")

    wrong: list[str] = []
    kept = kept_results(c, run, rep, wrong)
    if wrong:
        out.append(f"results wrong: {label}: {wrong}")

    if exception is None and ended > sent + NOTHING_RAISED_NS:
        # The cell ran on well after the interrupt, and nothing was raised in it: counted,
        # and what it kept and started is checked all the same.
        out.append(f"cell errors: {label}: the interrupt raised nothing\n{cell.summary()}")
    elif exception is None or (ev.done is not None and ev.done < sent) or ended < sent:
        # The job ended before the interrupt: from then on, it is the user's code's.
        missing = sorted(set(range(TASKS)) - kept)
        if exception is None and missing:
            out.append(f"results lost: {label}: the job ended with {missing} missing")
        return [*out, "after the end"]
    elif exception == "KeyboardInterrupt" and not ev.starts and not ev.gates:
        return [*out, "before the pool"]  # the kernel's own: no pool existed yet
    elif not stopped:
        return [*out, f"cell errors: {label}: it ended with {exception}\n{cell.summary()}"]
    if interrupted and not c.caught:
        out.append("uncaught")
    if cancelled:
        out.append("cancelled by the kernel")
    if ev.begin is not None:
        record("notebook stress: interrupt after the job began (ms)", (sent - ev.begin) / 1e6)

    must = {i for i, t in ev.ends.items() if c.mode == "drain" or t < sent - MARGIN_NS}
    lost = sorted(must - kept)
    if lost:
        out.append(f"results lost: {label}: {lost}")

    tag = c.held_name if c.held else f"run{run}"
    gates = [t for t, g in ev.gates if g == tag]
    if gates:
        record("notebook stress: interrupt to gate closed (ms)", (gates[0] - sent) / 1e6)
        facts["gate_ms"] = (gates[0] - sent) / 1e6
        late = [i for i, (_pid, _ns, read) in ev.starts.items() if read > gates[0]]
        if late:
            out.append(f"tasks started late: {label}: after the gate closed {late}")
    if not all(0 < read <= ns for _pid, ns, read in ev.starts.values()):
        raise AssertionError(f"{label}: a start without its gate read: {ev.starts}")

    if interrupted and c.mode == "terminate":
        starting = not any(ns < sent for _pid, ns, _read in ev.starts.values())
        kind = "while the pool started" if starting else "once a task had started"
        how = "caught" if c.caught else "uncaught, shown"
        stop = (rep["caught_ns"] if c.caught else rep["shown_ns"]) - sent
        record(f"notebook stress: interrupt to Interrupted, {how}, {kind} (ms)", stop / 1e6)
        facts.update(stop_ms=stop / 1e6, kind=kind, how=how)
        record("notebook stress: interrupt to the cell's end, terminate (ms)", (ended - sent) / 1e6)
        if stop > (STARTING_NS if starting else SLOW_STOP_NS):

            def after(ns: int | None) -> str:
                return "never" if not ns else f"{(ns - sent) / 1e6:.1f} ms"

            moment = (sent - ev.begin) / 1e6 if ev.begin is not None else float("nan")
            out.append(
                f"slow stops: {label}: Interrupted after {stop / 1e6:.0f} ms ({kind}, {how}; "
                f"the interrupt {moment:.0f} ms after the job began; after it the gate closed "
                f"{after(gates[0] if gates else None)}, a pool call raised Interrupted "
                f"{after(rep['raised_ns'])}, IPython showed it {after(rep['shown_ns'])}, "
                f"the cell ended {after(ended)})"
            )
    return out


def tally(runs: int, problems: list[str]) -> None:
    counts = Counter(p.split(":", 1)[0] for p in problems)
    record("notebook stress: runs", runs)
    for name in COUNTS:
        record(f"notebook stress: {name}", counts[name])
    kinds = ("uncaught", "after the end", "before the pool", "cancelled by the kernel")
    for note in kinds:
        record(f"notebook stress: runs {note}", counts[note])
    summary = ", ".join(f"{name} {counts[name]}" for name in COUNTS)
    notes = ", ".join(f"{n} {counts[n]}" for n in kinds)
    print(f"\nnotebook stress, {runs} runs (seed {SEED}): {summary} (runs {notes})")
    real = [ANSI.sub("", p) for p in problems if ":" in p]
    assert not real, "\n\n".join(real)


@pytest.mark.stress
def test_interrupt_button_at_random_moments_loses_nothing_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    nb = Notebook(tmp_path)
    problems: list[str] = []
    try:
        for run in range(RUNS):
            problems += run_once(nb, run, rng)
    finally:
        nb.close()
    tally(RUNS, problems)
