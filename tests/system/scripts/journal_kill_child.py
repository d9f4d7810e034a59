"""A journaled run whose parent the test kills with SIGKILL: ``journal_kill_child.py JOURNAL N
CHUNKSIZE METHOD [big]``. Items below N return at once (with ``big``, 2 MiB each) and the rest
block; once the caller has N
results it prints ``got N`` and waits to be killed."""

from __future__ import annotations

import functools
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
from tests import tasks


def main() -> None:
    journal, n, chunksize, method = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    task = tasks.blob_below if sys.argv[5:] == ["big"] else tasks.square_below
    fn = functools.partial(task, n)
    with cleanbreak.Pool(2, mp_context=method, journal=journal) as pool:
        for got, _ in enumerate(pool.imap_unordered(fn, range(n + 4), chunksize=chunksize), 1):
            if got == n:
                print(f"got {got}", flush=True)
                threading.Event().wait()


if __name__ == "__main__":
    main()
