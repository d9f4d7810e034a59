"""Signals at random moments, through every API and start method, counting what went wrong.

Each run starts ``scripts/stress_child.py`` (60 tasks of 1-40 ms on 2 workers, about 0.7 s of
work), waits for it to report that it is about to make its pool, then waits a random time
(the moment under test, not a synchronisation) and sends Ctrl-C to the group, SIGINT to the
parent alone, or SIGTERM. The runs go round every API, start method and signal. A second test
SIGKILLs the parent at a random moment instead.

Counted, each of which must be 0:

- hangs: the child did not exit within ``EXIT_GUARD`` seconds
- processes left: a process of the run still alive 1 s after the child exited
- segments left: a ``/dev/shm`` segment of the run's pools left 1 s after the child exited
- results lost: a task that had computed its result (its ``end`` event) at least 1 ms before
  the signal, whose result is neither yielded nor in ``Interrupted.completed`` (in drain mode,
  any task that ended at all)
- results wrong: a kept result with the wrong value, or yielded and in ``completed`` both
- tasks started late: a task whose worker read the gate for it after the pool had closed the
  gate (the moment the signal handler ran; before that the signal was not yet handled), or,
  for SIGKILL, after the parent was dead. The moment just before that read is the task's
  start here (``stress_child.py`` times it): the task's own first instruction comes later,
  and on a busy machine, with the worker preempted in between, after the gate closed
- tracebacks: anything on stderr
- slow stops: in terminate mode, ``Interrupted`` caught more than 0.1 s after the signal (0.45 s
  when two tests share the cores: ``_harness.SLOW_STOP_NS``), or
  more than ``STARTING_NS`` after it when no task had started yet: the pool was still
  starting its workers, and a worker the fork server is forking can only be stopped once the
  fork server has started (a new interpreter that imports the main module)
- results not journaled: every other run records its outcomes in a journal; a result the
  caller got (yielded or in ``completed``) that the journal does not hold once the child
  exited, or, after a SIGKILL, a journal that fails SQLite's integrity check or holds a wrong
  value. (``CLEANBREAK_STRESS_JOURNAL=0`` leaves the journal out.)

The number of runs is ``CLEANBREAK_STRESS_RUNS`` (CI: one round of the 54 combinations is
too long, so by default 6 runs, drawn from them at random), and ``CLEANBREAK_STRESS_KILLS`` for the
SIGKILL test (default 2). The counts are printed in the figures summary.
"""

from __future__ import annotations

import itertools
import os
import pickle
import random
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from cleanbreak import _shm

from ._harness import EXIT_GUARD, METHODS, SLOW_STOP_NS, Child, record
from .conftest import StartCommand

SCRIPT = Path(__file__).parent / "scripts" / "stress_child.py"
APIS = ["submit", "map", "imap_unordered", "cbmap", "drain", "asyncio"]
SIGNALS = ["sigint-group", "sigint-parent", "sigterm-parent"]
RUNS = int(os.environ.get("CLEANBREAK_STRESS_RUNS", "6"))
KILLS = int(os.environ.get("CLEANBREAK_STRESS_KILLS", "2"))
JOURNAL = os.environ.get("CLEANBREAK_STRESS_JOURNAL", "1") == "1"
SEED = int(os.environ.get("CLEANBREAK_STRESS_SEED", str(time.time_ns() % 1_000_000)))
LEFT_AFTER = 1.0  # seconds after the child's exit by which nothing of it may be left
MARGIN_NS = 1_000_000  # a result computed this long before the signal must be kept
# The longest stop while the pool starts (see "slow stops").
STARTING_NS = max(300_000_000, SLOW_STOP_NS)
COUNTS = [
    "hangs",
    "processes left",
    "segments left",
    "results lost",
    "results wrong",
    "tasks started late",
    "tracebacks",
    "slow stops",
    "results not journaled",
]


def _segments(child: Child) -> list[str]:
    prefix = f"cb-{_shm._namespace()}-"
    pids = {str(child.pid), *(str(p) for p in child.pids_of("worker"))}
    return [n for n in os.listdir(_shm.SHM_DIR) if n.startswith(prefix) and n.split("-")[2] in pids]


def _leftovers(child: Child, exited_ns: int) -> tuple[list[str], list[str]]:
    """Processes and segments of the run still there ``LEFT_AFTER`` s after the child exited."""
    wait = LEFT_AFTER - (time.monotonic_ns() - exited_ns) / 1e9
    names, _took = child.wait_session_empty(max(0.0, wait))
    segments = _segments(child)
    if segments:
        time.sleep(max(0.0, LEFT_AFTER - (time.monotonic_ns() - exited_ns) / 1e9))
        segments = _segments(child)
    return names, segments


def _kept(child: Child, api: str, wrong: list[str]) -> dict[int, int]:
    report = child.report()
    yielded = {int(i): v for i, v in report["yielded"]}
    completed = {int(k): v[1] for k, v in report["completed"].items()}
    if api in ("map", "imap_unordered", "drain", "cbmap") and yielded.keys() & completed.keys():
        wrong.append(f"yielded and in completed: {sorted(yielded.keys() & completed.keys())}")
    kept = yielded | completed
    wrong.extend(f"task {i}: {v} != {7 * i}" for i, v in kept.items() if v != 7 * i)
    return kept


def _start(start: StartCommand, api: str, method: str, seed: int, journal: bool) -> Child:
    extra = ["--journal=journal.sqlite"] if journal else []
    child = start(
        [sys.executable, str(SCRIPT)],
        f"--api={api}",
        f"--method={method}",
        f"--seed={seed}",
        *extra,
    )
    child.wait_for(lambda c: bool(c.of("begin")), "the child to begin")
    return child


def _journaled(child: Child, label: str, problems: list[str]) -> set[int] | None:
    """The indices whose results the child's journal holds (None: it had none); checks that
    the file is sound and every value right."""
    path = child.tmp / "journal.sqlite"
    if not path.exists():
        return None
    try:
        with sqlite3.connect(path) as conn:
            check = conn.execute("PRAGMA integrity_check").fetchone()
            try:
                rows = conn.execute("SELECT value FROM outcomes WHERE ok = 1").fetchall()
            except sqlite3.OperationalError:  # stopped before the table was made
                rows = []
        conn.close()
    except sqlite3.Error as exc:
        problems.append(f"results not journaled: {label}: the journal does not open: {exc}")
        return set()
    if check != ("ok",):
        problems.append(f"results not journaled: {label}: integrity check says {check}")
    values = [pickle.loads(blob) for (blob,) in rows]
    wrong = [v for v in values if v[1] != 7 * v[0]]
    if wrong:
        problems.append(f"results not journaled: {label}: wrong values {wrong}")
    return {v[0] for v in values}


def _left_behind(child: Child, label: str) -> list[str]:
    """Once the child exited: what of it is left (as ``count: detail`` lines); then its events."""
    assert child.exited_ns is not None
    out: list[str] = []
    names, segments = _leftovers(child, child.exited_ns)
    child.drain_events()
    if names:
        out.append(f"processes left: {label}: {names}")
    if segments:
        out.append(f"segments left: {label}: {segments}")
    return out


def _signal_once(child: Child, how: str, rng: random.Random, label: str, api: str) -> list[str]:
    """Signal one run at a random moment; what went wrong, as ``count: detail`` lines."""
    time.sleep(rng.uniform(0.0, 0.9))  # the random moment
    sent = child.send(how, asleep=False)
    try:
        status = child.wait_exit(EXIT_GUARD)
    except AssertionError:
        return [f"hangs: {label}\n{child.dump_stacks()}"]
    out = _left_behind(child, label)
    done = child.of("done")
    if status == 0 or (done and done[0].int(0) < sent):
        # The job ended before the signal: from then on, Ctrl-C is the user's program's.
        return [*out, "after the end"]
    err = child.stderr()
    if err.strip():
        out.append(f"tracebacks: {label}: stderr\n{err}")
    if status != 130:
        return [*out, f"results lost: {label}: exit status {status}\n{child.output()}"]
    wrong: list[str] = []
    kept = _kept(child, api, wrong)
    if wrong:
        out.append(f"results wrong: {label}: {wrong}")
    ends = {e.int(0): e.int(1) for e in child.of("end")}
    must = {i for i, t in ends.items() if api == "drain" or t < sent - MARGIN_NS}
    lost = sorted(must - kept.keys())
    if lost:
        out.append(f"results lost: {label}: {lost}")
    journaled = _journaled(child, label, out)
    if journaled is not None and kept.keys() - journaled:
        out.append(f"results not journaled: {label}: {sorted(kept.keys() - journaled)}")
    gates = [e.int(0) for e in child.of("gate")]
    if gates:
        record("stress: signal to gate closed (ms)", (gates[0] - sent) / 1e6)
        late = [i for i, read in _gate_reads(child) if read > gates[0]]
        if late:
            out.append(f"tasks started late: {label}: after the gate closed {late}")
    caught = (child.report().get("caught_ns") or sent) - sent
    if api != "drain":
        starting = not any(e.int(2) < sent for e in child.of("start"))
        kind = "while the pool started" if starting else "once a task had started"
        record(f"stress: signal to Interrupted, terminate, {kind} (ms)", caught / 1e6)
        if caught > (STARTING_NS if starting else SLOW_STOP_NS):
            out.append(f"slow stops: {label}: Interrupted after {caught / 1e6:.0f} ms ({kind})")
    return out


def _gate_reads(child: Child) -> list[tuple[int, int]]:
    """Each started task, with the moment just before its worker read the gate for it."""
    starts = child.of("start")
    assert all(0 < e.int(3) <= e.int(2) for e in starts)
    return [(e.int(0), e.int(3)) for e in starts]


def _kill_once(child: Child, rng: random.Random, label: str) -> list[str]:
    time.sleep(rng.uniform(0.0, 0.9))  # the random moment
    child.send("sigkill-parent")
    child.wait_exit(EXIT_GUARD)
    out = _left_behind(child, label)
    assert child.exited_ns is not None
    late = [i for i, read in _gate_reads(child) if read > child.exited_ns]
    if late:
        out.append(f"tasks started late: {label}: after the parent died {late}")
    _journaled(child, label, out)
    return out


def _tally(kind: str, runs: int, problems: list[str]) -> None:
    counts = Counter(p.split(":", 1)[0] for p in problems)
    record(f"stress {kind}: runs", runs)
    for name in COUNTS:
        record(f"stress {kind}: {name}", counts[name])
    if kind == "signals":
        record("stress signals: runs whose job ended before the signal", counts["after the end"])
    summary = ", ".join(f"{name} {counts[name]}" for name in COUNTS)
    print(f"\nstress, {runs} {kind} (seed {SEED}): {summary}")
    real = [p for p in problems if p != "after the end"]
    assert not real, "\n\n".join(real)


@pytest.mark.stress
def test_signals_at_random_moments_lose_nothing_and_leave_nothing(
    start_command: StartCommand,
) -> None:
    rng = random.Random(SEED)
    combos = list(itertools.product(APIS, METHODS, SIGNALS))
    rng.shuffle(combos)
    problems: list[str] = []
    for run in range(RUNS):
        api, method, how = combos[run % len(combos)]
        journal = JOURNAL and run % 2 == 0
        label = f"run {run} ({api}, {method}, {how}, journal {journal}, seed {SEED})"
        child = _start(start_command, api, method, rng.randrange(1 << 30), journal)
        try:
            problems += _signal_once(child, how, rng, label, api)
        finally:
            child.cleanup()  # its descriptors: hundreds of runs would run out
    _tally("signals", RUNS, problems)


@pytest.mark.stress
def test_sigkill_at_random_moments_leaves_nothing_and_starts_nothing(
    start_command: StartCommand,
) -> None:
    rng = random.Random(SEED + 1)
    combos = list(itertools.product(APIS, METHODS))
    rng.shuffle(combos)
    problems: list[str] = []
    for run in range(KILLS):
        api, method = combos[run % len(combos)]
        journal = JOURNAL and run % 2 == 0
        label = f"kill {run} ({api}, {method}, journal {journal}, seed {SEED})"
        child = _start(start_command, api, method, rng.randrange(1 << 30), journal)
        try:
            problems += _kill_once(child, rng, label)
        finally:
            child.cleanup()
    _tally("SIGKILLs", KILLS, problems)
