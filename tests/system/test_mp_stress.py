"""The drop-in at random moments: ``cleanbreak.multiprocessing.Pool`` through each of its calls,
Ctrl-C to the group, SIGINT or SIGTERM to the parent at a random moment from before the first
touch of the drop-in's module to the job's end. Counted, as the terminal stress test counts:

- hangs: the child did not exit within EXIT_GUARD seconds
- processes left: a process of the child's session still there 1 s after it exited
- tracebacks: anything on the child's stderr, but Python's own KeyboardInterrupt for a SIGINT
  that came once the job was over (see ``_the_programs_own``)
- results lost: a task that had finished (its ``done`` line written 5 ms or more before the
  signal) whose result the caller neither got nor found in ``Interrupted.completed`` or a
  finished ``AsyncResult``; or a child that ended in another way than the signal's exit status
- results wrong: a kept result that is not its task's
- tasks started late: a task that started 20 ms or more after the signal

``CLEANBREAK_MP_STRESS_RUNS`` runs (default 11: each call once, the three signals in turn), seed
``CLEANBREAK_STRESS_SEED``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ._harness import EXIT_GUARD, TIMEOUT, record

SCRIPT = Path(__file__).parent / "scripts" / "mp_stress_child.py"
# How many tasks a mode runs (the child's TASKS): else 24.
TASKS = {"apply_round_trips": 1000, "apply_tiny": 2000, "map_tiny": 2000}
MODES = [
    "apply_async",
    "apply_round_trips",
    "apply_tiny",
    "map_tiny",
    "map_async",
    "map_async_chunks",
    "map",
    "starmap",
    "imap",
    "imap_unordered",
    "imap_timeout",
]
# CLEANBREAK_MP_STRESS_MODES: a comma-separated subset of the modes, to stress those alone.
MODES = os.environ.get("CLEANBREAK_MP_STRESS_MODES", ",".join(MODES)).split(",")
HOWS = ["sigint-group", "sigint-parent", "sigterm-parent"]
RUNS = int(os.environ.get("CLEANBREAK_MP_STRESS_RUNS", "11"))
SEED = int(os.environ.get("CLEANBREAK_STRESS_SEED", str(time.time_ns() % 1_000_000)))


def _session(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


_after_the_job: list[str] = []  # runs whose stderr was the program's own KeyboardInterrupt
_mid_job: list[str] = []  # runs that the signal interrupted (the others had ended before it)


def _the_programs_own(
    report: dict[str, object], log: list[list[str]], count: int, sent: int, err: str
) -> bool:
    """Whether ``err`` is Python's own KeyboardInterrupt for a SIGINT that came after the job:
    every task had ended before it and the pool was gone (the report says "done"). The signal
    is then the program's, and Python does what it always does, which includes printing the
    KeyboardInterrupt, or "Exception ignored" for one raised while the interpreter exits or in
    a ``__del__`` (seen: ``threading._shutdown``; the drop-in's ``Pool.__del__``, as the stock
    pool's, of a pool closed before)."""
    ended = [int(ns) for what, _i, ns in log if what == "done"]
    last_line = err.strip().splitlines()[-1]
    return (
        report["how"] == "done"
        and len(ended) == count
        and max(ended) < sent
        and last_line.startswith("KeyboardInterrupt")
    )


def _one_run(tmp: Path, mode: str, how: str, rng: random.Random) -> list[str]:
    """One run; what went wrong, as ``count: detail`` lines."""
    folder = tmp / f"run-{rng.randrange(1 << 30)}"
    folder.mkdir()
    label = f"{mode}, {how}"
    count = TASKS.get(mode, 24)
    with subprocess.Popen(
        [
            sys.executable,
            "-X",
            "faulthandler",
            str(SCRIPT),
            mode,
            str(folder),
            str(rng.randrange(1 << 30)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().strip() == "begin", proc.communicate()
        time.sleep(rng.uniform(0.0, 0.6))  # the random moment: the import, the start, the job
        sent = time.monotonic_ns()
        if how == "sigint-group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT if how == "sigint-parent" else signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=EXIT_GUARD)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGABRT)  # faulthandler prints every thread's stack
            _out, err = proc.communicate()
            with contextlib.suppress(ProcessLookupError):  # the abort ended the whole group
                os.killpg(proc.pid, signal.SIGKILL)
            return [f"hangs: {label}: {err.decode()[-6000:]}"]
        exited = time.monotonic()
    problems = []
    while _session(proc.pid) and time.monotonic() < exited + 1.0:
        time.sleep(0.01)
    if _session(proc.pid):
        problems.append(f"processes left: {label}: {_session(proc.pid)}")
        for left in _session(proc.pid):
            left.kill()
    logged = folder / "log"  # (none when the signal came before any task started)
    log = [line.split() for line in logged.read_text().splitlines()] if logged.exists() else []
    lines = out.decode().strip().splitlines()
    if not lines:
        # It died before its report. If every task had ended before the signal, the job was
        # over and the pool gone: the signal was the program's, and its default action
        # ended it (a KeyboardInterrupt's traceback, or death by SIGTERM), as the test allows
        # below for a report printed first. Otherwise what it had is lost.
        ended = {int(i) for what, i, ns in log if what == "done" and int(ns) < sent}
        if len(ended) == count and proc.returncode in (1, -signal.SIGINT, -signal.SIGTERM):
            return problems
        return [
            *problems,
            f"results lost: {label}: no report, exit status {proc.returncode}, "
            f"{len(ended)} of {count} ended before the signal; stderr: {err.decode()[-3000:]}",
        ]
    report = json.loads(lines[-1])
    if report["how"] != "done":
        _mid_job.append(label)
    if err.strip():
        if _the_programs_own(report, log, count, sent, err.decode()):
            _after_the_job.append(label)
        else:
            problems.append(f"tracebacks: {label}: {err.decode()[-2000:]}")
    kept = {int(k): v for k, v in report["kept"].items()}
    finished = {int(i) for what, i, ns in log if what == "done" and int(ns) < sent - 5_000_000}
    late = [int(i) for what, i, ns in log if what == "start" and int(ns) > sent + 20_000_000]
    expected = 143 if how == "sigterm-parent" else 130
    if report["how"] == "done":
        # The job ended before the signal: from then on the signal is the program's, and may
        # end it as its default action does.
        if proc.returncode not in (0, -signal.SIGINT, -signal.SIGTERM) or len(kept) != count:
            problems.append(f"results lost: {label}: ended {proc.returncode}, {len(kept)} kept")
    elif proc.returncode != expected:
        problems.append(f"results lost: {label}: exit status {proc.returncode}")
    if lost := sorted(finished - set(kept)):
        problems.append(f"results lost: {label}: {lost} finished, not kept")
    if wrong := [i for i, v in kept.items() if v != [i, i * i]]:
        problems.append(f"results wrong: {label}: {wrong}")
    if late and report["how"] != "done":
        problems.append(f"tasks started late: {label}: {late}")
    return problems


def test_the_drop_in_at_random_moments_loses_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    combos = [(m, h) for m in MODES for h in HOWS]
    rng.shuffle(combos)
    problems: list[str] = []
    deadline = time.monotonic() + TIMEOUT * 10
    for run in range(RUNS):
        mode, how = combos[run % len(combos)] if run >= len(MODES) else (MODES[run], HOWS[run % 3])
        problems += _one_run(tmp_path, mode, how, rng)
        assert time.monotonic() < deadline
    counts = {
        kind: sum(p.startswith(kind + ":") for p in problems)
        for kind in (
            "hangs",
            "processes left",
            "tracebacks",
            "results lost",
            "results wrong",
            "tasks started late",
        )
    }
    for kind, n in counts.items():
        record(f"drop-in stress: {kind}", n)
    print(f"\ndrop-in stress, {RUNS} runs (seed {SEED}): {counts}")
    print(f"(a KeyboardInterrupt of Python's after the job, allowed: {len(_after_the_job)})")
    print(f"(runs the signal interrupted: {len(_mid_job)})")
    assert not problems, "\n".join(problems)
