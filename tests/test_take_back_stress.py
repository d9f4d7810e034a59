"""Chunks sent ahead and taken back for a free worker (``_manager``, "Taking back"), at random:
tasks of random lengths (most instant, some long), in chunks of one and two, through the list
and iterator maps, each with a deadline. Every task must run exactly once and every result come
back; the runs must take some chunk back (else this tests nothing).
``CLEANBREAK_TAKE_BACK_RUNS`` sets the runs per call (CI: 5)."""

from __future__ import annotations

import collections
import multiprocessing
import os
import random
from pathlib import Path
from typing import cast

import pytest

import cleanbreak
from cleanbreak._manager import LocalBackend
from cleanbreak.multiprocessing import Pool
from tests import tasks

GUARD = 60.0
RUNS = int(os.environ.get("CLEANBREAK_TAKE_BACK_RUNS", "5"))
CALLS = ["map", "drop-in map_async", "drop-in imap", "drop-in imap_unordered"]


@pytest.mark.parametrize("chunksize", [1, 2])
def test_every_task_runs_once_when_chunks_are_taken_back(
    start_method: str, tmp_path: Path, chunksize: int
) -> None:
    seed = random.randrange(1 << 20)
    rng = random.Random(seed)
    counts: collections.Counter[str] = collections.Counter()
    taken_back = 0
    with Pool(2, context=multiprocessing.get_context(start_method)) as face:
        pool: cleanbreak.Pool = face._pool
        for run in range(RUNS):
            for call in CALLS:
                log = str(tmp_path / f"{run}-{call}.log")
                n = rng.randrange(4, 40)
                items = [(log, i, rng.choice([0.0, 0.0, 0.0, 0.002, 0.03])) for i in range(n)]
                # Each with a deadline: a fault here could as well hang the map.
                if call == "map":
                    got = pool.map(tasks.log_and_sleep, items, chunksize=chunksize, timeout=GUARD)
                    results = list(got)
                elif call == "drop-in map_async":
                    results = face.map_async(tasks.log_and_sleep, items, chunksize).get(GUARD)
                else:
                    it = getattr(face, call[len("drop-in ") :])(
                        tasks.log_and_sleep, items, chunksize
                    )
                    results = [it.next(GUARD) for _ in items]
                ran = collections.Counter(Path(log).read_text().split())
                if sorted(results) != [i * i for i in range(n)]:
                    counts["results lost or wrong"] += 1
                if any(ran[str(i)] != 1 for i in range(n)) or len(ran) != n:
                    counts["tasks not run exactly once"] += 1
        taken_back = cast(LocalBackend, pool._backend).taken_back
    print(
        f"\ntake-back stress (seed {seed}): {RUNS * len(CALLS)} maps, {taken_back} chunks "
        f"taken back, {dict(counts) or 'no faults'}"
    )
    assert not counts, f"seed {seed}: {dict(counts)}"
    assert taken_back > 0, f"seed {seed}: no chunk was taken back: the test tested nothing"
