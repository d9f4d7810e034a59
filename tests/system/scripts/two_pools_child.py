"""Two pools in one process, as a notebook holds them: ``two_pools_child.py DIR [alone]``.

Pool A ran one task, whose future is still referenced (done: 1,000,000); pool B's ``map`` is
being iterated, and the loop body, after its first result, writes ``DIR/body`` and waits: the
Ctrl-C comes there, in the caller's own code. The child prints one JSON line: the exception's
type and ``completed``. It must hold B's results (``k -> k * k``), not A's.

``alone``: pool B is not made yet (the next cell's pool, about to start): the caller's own code
writes ``DIR/body`` and waits there. A was idle at the Ctrl-C: ``completed`` must be empty (its
future keeps its own result; a key of A's numbering would mix with a later map's indices).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
from tests import tasks


def main() -> None:
    folder = sys.argv[1]
    idle = cleanbreak.Pool(1)
    earlier = idle.submit(tasks.square, 1000)
    earlier.result()
    out: dict[str, object] = {}
    if sys.argv[2:] == ["alone"]:
        try:
            tasks.touch(os.path.join(folder, "body"))
            threading.Event().wait(tasks.GUARD)  # the caller's own code: Ctrl-C comes here
        except KeyboardInterrupt as exc:
            out = {
                "exc": type(exc).__name__,
                "completed": {str(k): v for k, v in getattr(exc, "completed", {}).items()},
                "earlier": earlier.result(),
            }
        print(json.dumps(out), flush=True)
        idle.shutdown()
        return
    with cleanbreak.Pool(1) as working:
        try:
            for _value in working.map(tasks.square, range(20), chunksize=1):
                tasks.touch(os.path.join(folder, "body"))
                threading.Event().wait(tasks.GUARD)  # the loop body works: Ctrl-C comes here
        except KeyboardInterrupt as exc:
            out = {
                "exc": type(exc).__name__,
                "completed": {str(k): v for k, v in getattr(exc, "completed", {}).items()},
            }
    print(json.dumps(out), flush=True)
    del earlier
    idle.shutdown()


if __name__ == "__main__":
    main()
