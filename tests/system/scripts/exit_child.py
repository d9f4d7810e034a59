"""How a process that used cleanbreak ends: after an Interrupted, caught or not, and with
``submit`` called from an atexit handler.

Modes:

- ``uncaught``: two tasks block, the test signals, and the ``Interrupted`` is left uncaught.
  Before that the script writes ``buffered`` to stdout (a file: block-buffered), leaves a file
  open with unflushed data (``--out-file``), and registers an atexit handler that prints
  ``atexit ran``. All three must be seen after the process died of the signal.
- ``caught``: the same, but it catches ``Interrupted`` and calls ``sys.exit(130)``.
- ``atexit-submit-first`` / ``atexit-submit-last``: an atexit handler, registered before
  cleanbreak is imported or after the pool is made, submits to a pool that was never shut down.
  It prints ``runtime-error: <message>`` if that raises RuntimeError, else the outcome.

Events: ``parent <pid>`` at the start, the tasks' own (see ``sysprobe_tasks``), and with
``--park-atexit``, ``atexit <ns>`` from an atexit handler that then waits for the release FIFO.
"""

from __future__ import annotations

import argparse
import atexit
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.system.scripts.sysprobe_tasks import emit, task, wait_release

_kept_open: list[Any] = []


def _submit_at_exit(pool: Any) -> None:
    try:
        fut = pool.submit(abs, -1)
    except RuntimeError as exc:
        print(f"runtime-error: {exc}", flush=True)
        return
    try:
        print(f"submitted: {fut.result(timeout=5)}", flush=True)
    except BaseException as exc:
        print(f"submitted: {type(exc).__name__}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode")
    parser.add_argument("--method", default="forkserver")
    parser.add_argument("--out-file")
    parser.add_argument("--park-atexit", action="store_true")
    parser.add_argument("--events", required=True)
    parser.add_argument("--release", required=True)
    args = parser.parse_args()
    emit(args.events, "parent", __import__("os").getpid())

    if args.mode == "atexit-submit-first":
        holder: list[Any] = []
        atexit.register(lambda: _submit_at_exit(holder[0]))
    import cleanbreak

    if args.mode.startswith("atexit-submit"):
        pool = cleanbreak.Pool(1, mp_context=args.method)
        assert pool.submit(abs, -2).result(timeout=30) == 2
        if args.mode == "atexit-submit-first":
            holder.append(pool)
        else:
            atexit.register(_submit_at_exit, pool)
        return 0

    if args.park_atexit:

        def park() -> None:
            emit(args.events, "atexit", time.monotonic_ns())
            wait_release(args.release)

        atexit.register(park)
    atexit.register(print, "atexit ran")
    if args.out_file:
        f = open(args.out_file, "w")  # noqa: SIM115 - left open on purpose
        f.write("unflushed")
        _kept_open.append(f)
    print("buffered", end=" ")
    specs = [("b", i, args.events, args.release) for i in range(2)]
    try:
        with cleanbreak.Pool(2, mp_context=args.method) as pool:
            for fut in [pool.submit(task, spec) for spec in specs]:
                fut.result()
    except cleanbreak.Interrupted:
        if args.mode == "caught":
            sys.exit(130)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
