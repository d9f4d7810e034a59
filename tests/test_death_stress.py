"""Workers that die at random moments while tiny tasks travel together (``_manager``, "Tasks
that travel together"): a task that kills its worker, and a worker killed from outside
(SIGKILL, as the OOM killer sends), through the drop-in's classic ``apply_async`` loop,
and ``starmap_async(..., chunksize=1)``. Counted over the runs, each of
which must stay 0: hangs, results lost or wrong, the task at fault run more than once or not
failed with ``WorkerDied``, tasks failed beyond the one at fault and the one each outside kill
hit. ``CLEANBREAK_DEATH_RUNS`` sets the runs per call (CI: 3); ``CLEANBREAK_STRESS_SEED`` the
seed."""

from __future__ import annotations

import collections
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import cleanbreak
from cleanbreak.multiprocessing import Pool
from tests import tasks

GUARD = 60.0
RUNS = int(os.environ.get("CLEANBREAK_DEATH_RUNS", "3"))
SEED = int(os.environ.get("CLEANBREAK_STRESS_SEED", str(time.time_ns() % 1_000_000)))
CALLS = ["apply_async", "starmap_async"]
N = 300


def _kill_a_worker(backend: Any, rng: random.Random, killed: list[int]) -> None:
    time.sleep(rng.uniform(0.0, 0.01))  # the random moment
    with backend._state:
        pids = [w.pid for w in backend._workers.values() if w.ready and not w.gone]
    if pids:
        os.kill(rng.choice(pids), signal.SIGKILL)
        killed.append(1)


@pytest.mark.parametrize("call", CALLS)
def test_worker_deaths_at_random_moments_cost_one_task_each(tmp_path: Path, call: str) -> None:
    rng = random.Random(f"{SEED}-{call}")
    counts: collections.Counter[str] = collections.Counter()
    travelled = kills = twice = 0
    with Pool(2) as p:
        backend: Any = p._pool._backend
        # Brief, as measured: its tasks travel together.
        assert p.starmap(tasks.die_on, [(i, -1) for i in range(8)], 1) == [i * i for i in range(8)]
        for run in range(RUNS):
            log = tmp_path / f"{call}-{run}"
            log.mkdir()
            bad = rng.choice([-1, rng.randrange(N)])  # the task that kills its worker, if any
            killed: list[int] = []
            killer = None
            if rng.random() < 0.5:
                killer = threading.Thread(target=_kill_a_worker, args=(backend, rng, killed))
            args = [(str(log), i, bad) for i in range(N)]
            if killer is not None:
                killer.start()
            outcomes: dict[int, Any] = {}
            try:
                if call == "apply_async":
                    pending = [p.apply_async(tasks.die_on_logged, a) for a in args]
                    for i, r in enumerate(pending):
                        try:
                            outcomes[i] = r.get(GUARD)
                        except cleanbreak.WorkerDied as exc:
                            outcomes[i] = exc
                else:
                    # A map raises its first failure: the log says what ran.
                    try:
                        got = p.starmap_async(tasks.die_on_logged, args, 1).get(GUARD)
                        outcomes = dict(enumerate(got))
                    except cleanbreak.WorkerDied as exc:
                        outcomes[-1] = exc
            except multiprocessing.TimeoutError:
                counts["hangs"] += 1
                continue
            finally:
                if killer is not None:
                    killer.join(GUARD)
            kills += len(killed)
            runs = tasks.runs_logged(str(log))
            twice += sum(1 for c in runs.values() if c > 1)
            failed = [i for i, v in outcomes.items() if isinstance(v, BaseException)]
            # Once, unless an outside kill failed a map before it came to the task at fault.
            if bad >= 0 and runs[bad] != 1 and not (killed and runs[bad] == 0):
                counts["the task at fault not run exactly once"] += 1
            if -1 in outcomes and outcomes[-1].task != bad and not killed:
                counts["tasks failed beyond those at fault"] += 1
            if call == "apply_async":
                if bad >= 0 and bad not in failed:
                    counts["the task at fault not failed"] += 1
                if len(set(failed) - {bad}) > len(killed):
                    counts["tasks failed beyond those at fault"] += 1
                wrong = [i for i, v in outcomes.items() if i not in failed and v != i * i]
                if wrong or len(outcomes) != N:
                    counts["results lost or wrong"] += 1
            elif not failed and (bad >= 0 or outcomes != {i: i * i for i in range(N)}):
                counts["results lost or wrong"] += 1
            if any(runs[i] == 0 for i in range(N) if i != bad and not failed):
                counts["results lost or wrong"] += 1
        travelled = backend.travelled_together
    print(
        f"\ndeath stress, {call}, {RUNS} runs (seed {SEED}): {kills} outside kills, "
        f"{travelled} tasks travelled together, {twice} tasks ran twice, "
        f"{dict(counts) or 'no faults'}"
    )
    assert not counts, f"seed {SEED}: {dict(counts)}"
    assert travelled > 0, "no task travelled with others: the test tested nothing"
