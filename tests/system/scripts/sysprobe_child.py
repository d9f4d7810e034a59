"""One cleanbreak pool scenario in a process of its own, for the system tests to signal.

The test starts this script in a new session, reads its events FIFO (see ``sysprobe_tasks``),
signals it, and reads the one JSON object it prints on stdout at the end. Events written here:

- ``pids <pid>,<pid>``   the pool's workers, once the pool is up (not with ``--api cbmap``)
- ``level <n> <ns>``     with ``--watch-level``: the pool's stop level changed (1 draining,
                         2 stopping, 3 killing), i.e. the pool has acted on a signal
- ``busy <ns>``          with ``--wait busy``: the tasks are done and the main thread is now
                         spinning in user code inside the ``with`` block
- ``reading <ns>``       with ``--input lazy``: the pool asked the input generator for the item
                         after the last one, and the generator now waits (in ``time.sleep``)
- ``spawning <n>``       with ``--hold-spawn``: the manager thread is about to start worker n,
                         and waits for one byte on the release FIFO first (so ``Pool()`` has
                         not returned)
- ``constructing``       with ``--hold-construct``: ``Pool()`` is making its backend (after it
                         put its signal handler in place, before any worker starts), and
                         waits for one byte on the release FIFO
- ``shutdown``           with ``--hold-shutdown``: every task is done and the pool is about to
                         shut down; it waits for one byte on the release FIFO first
- ``finished``           with ``--hold-finished``: every worker is gone and the pool's
                         ``shutdown`` has just woken from its wait for that; it waits for one
                         byte on the release FIFO
- ``journal-closing``    with ``--hold-journal-close``: the pool is about to commit and close
                         its journal (``--journal``); it waits for one byte on the release FIFO
- ``bootstrap <pid>``    with ``SYSPROBE_PARK_BOOTSTRAP`` set (spawn, forkserver): a worker is
                         importing this module, and waits there for one byte on the release
                         FIFO (it is still in the parent's process group)
- ``orphaned <pid> main|other``  with ``--hold-orphan``: a worker's main thread (or another)
                         found that its parent died (see ``sysprobe_tasks.hold_orphans``)

Exit status: 130 after ``cleanbreak.Interrupted`` (as the CLI does), 0 when everything
finished, 1 with a traceback on anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from types import FrameType
from typing import Any, cast

# The repository root, so that the tasks import (here and in the workers) by their full name.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
import cleanbreak._journal
import cleanbreak._manager
import cleanbreak._shm
from tests.system.scripts.sysprobe_tasks import (
    Receipt,
    Spec,
    emit,
    hold_orphans,
    task,
    wait_release,
)

if __name__ == "__mp_main__" and os.environ.get("SYSPROBE_PARK_BOOTSTRAP"):
    # A worker started by spawn or forkserver imports this module before it runs anything of
    # cleanbreak's: park it here, where a Ctrl-C to the group used to print its traceback.
    emit(os.environ["SYSPROBE_EVENTS"], "bootstrap", os.getpid())
    wait_release(os.environ["SYSPROBE_RELEASE"])


def _user_handler(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _watch_level(pool: cleanbreak.Pool, events: str) -> None:
    # Test instrumentation: the stop level is private, and the pool has no hook to report it.
    # This thread must not take the signals the test sends (see _start_watcher).
    seen = 0
    while True:
        level = cast(cleanbreak._manager.LocalBackend, pool._backend).level
        if level != seen:
            seen = level
            emit(events, "level", level, time.monotonic_ns())
        time.sleep(0.0005)


def _start_watcher(pool: cleanbreak.Pool, events: str) -> None:
    """Start ``_watch_level`` in a thread that blocks SIGINT and SIGTERM.

    The kernel may hand a process-directed signal to any thread that does not block it; a
    thread of the test's own must not be the one that takes the test's Ctrl-C. (A thread
    inherits the signal mask of the thread that starts it.)
    """
    stop = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        threading.Thread(target=_watch_level, args=(pool, events), daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _waiting(specs: list[Spec], events: str) -> Iterator[Spec]:
    """The specs, then a wait for ever: an input whose next item is slow to come."""
    yield from specs
    emit(events, "reading", time.monotonic_ns())
    while True:
        time.sleep(3600)


def _hold_shutdown(events: str, release: str) -> None:
    """Test instrumentation: as ``Pool.shutdown`` tells the backend to close, it announces
    itself and waits to be released."""
    real = cleanbreak._manager.LocalBackend.close

    def close(self: cleanbreak._manager.LocalBackend, cancel_pending: bool) -> None:
        emit(events, "shutdown")
        wait_release(release)
        real(self, cancel_pending)

    cleanbreak._manager.LocalBackend.close = close  # type: ignore[method-assign,assignment]


def _hold_finished(events: str, release: str) -> None:
    """Test instrumentation: the pool's first wait for its workers to be gone announces its
    end, and waits to be released before it returns."""
    real = cleanbreak._manager.LocalBackend.wait
    first = [True]

    def wait(self: cleanbreak._manager.LocalBackend, timeout: float | None = None) -> bool:
        done = real(self, timeout)
        if done and (first.pop() if first else False):
            emit(events, "finished")
            wait_release(release)
        return done

    cleanbreak._manager.LocalBackend.wait = wait  # type: ignore[method-assign,assignment]


def _hold_journal_close(events: str, release: str) -> None:
    """Test instrumentation: as the pool first closes its journal, it announces it and waits."""
    real = cleanbreak._journal.Journal.close
    first = [True]

    def close(self: cleanbreak._journal.Journal, *, quick: bool = False) -> None:
        if first.pop() if first else False:
            emit(events, "journal-closing")
            wait_release(release)
        real(self, quick=quick)

    cleanbreak._journal.Journal.close = close  # type: ignore[method-assign]


def _hold_construct(events: str, release: str) -> None:
    """Test instrumentation: ``Pool()`` announces that it is making its backend, and waits."""
    real = cleanbreak._shm.Segments.new_pool

    def new_pool(spares: int) -> cleanbreak._shm.Segments:
        emit(events, "constructing")
        wait_release(release)
        return real(spares)

    cleanbreak._shm.Segments.new_pool = staticmethod(new_pool)  # type: ignore[method-assign,assignment]


def _hold_spawn(events: str, release: str) -> None:
    """Test instrumentation: the manager thread announces each worker it is about to start,
    and waits to be released first."""
    real = cleanbreak._manager.LocalBackend._spawn
    count = iter(range(1_000_000))

    def spawn(self: cleanbreak._manager.LocalBackend) -> None:
        emit(events, "spawning", next(count))
        wait_release(release)
        real(self)

    cleanbreak._manager.LocalBackend._spawn = spawn  # type: ignore[method-assign]


async def _run_in_executor(
    args: argparse.Namespace, specs: list[Spec], report: dict[str, Any]
) -> list[Any]:
    """The tasks through asyncio's run_in_executor, on a pool made inside asyncio.run."""
    if args.api == "asyncio-loop-handler":
        # As black does: the loop's own SIGINT handler cancels the main task.
        main = asyncio.current_task()
        assert main is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, main.cancel)
    with cleanbreak.Pool(
        args.workers, on_interrupt=args.mode, mp_context=args.method, journal=args.journal
    ) as pool:
        return await _await_all(args, pool, specs, report)


async def _await_all(
    args: argparse.Namespace, pool: cleanbreak.Pool, specs: list[Spec], report: dict[str, Any]
) -> list[Any]:
    """Await every task through run_in_executor: what the coroutine saw, if it was stopped."""
    loop = asyncio.get_running_loop()
    emit(args.events, "pids", ",".join(str(p) for p in pool._backend.pids))
    report["sigint_handler_inside"] = repr(signal.getsignal(signal.SIGINT))
    try:
        results = list(await asyncio.gather(*(loop.run_in_executor(pool, task, s) for s in specs)))
    except BaseException as exc:
        report["coroutine_saw"] = type(exc).__name__
        raise
    report["yielded"] = results  # the caller has them, whatever the with block's end does
    return results


def _spin() -> None:
    n = 0
    while True:
        n += 1


def _future_state(fut: Future[Receipt]) -> str:
    if fut.cancelled():
        return "cancelled"
    if not fut.done():
        return "pending"
    exc = fut.exception()
    if exc is not None:
        return f"exception:{type(exc).__name__}"
    return f"result:{fut.result()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, choices=["forkserver", "spawn", "fork"])
    parser.add_argument("--mode", default="terminate", choices=["terminate", "drain"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layout", required=True, help="one task kind per character")
    parser.add_argument(
        "--api",
        default="submit",
        choices=[
            "submit",
            "map",
            "imap_unordered",
            "cbmap",
            "asyncio",
            "asyncio-loop-handler",
            "asyncio-pool-before",
        ],
    )
    parser.add_argument("--chunksize", type=int, default=1)
    parser.add_argument("--hold-spawn", action="store_true")
    parser.add_argument("--hold-shutdown", action="store_true")
    parser.add_argument("--hold-construct", action="store_true")
    parser.add_argument("--hold-orphan", action="store_true")
    parser.add_argument("--hold-journal-close", action="store_true")
    parser.add_argument("--hold-finished", action="store_true")
    parser.add_argument(
        "--journal", default=None, help="record the outcomes in a journal of this name"
    )
    parser.add_argument(
        "--input",
        default="list",
        choices=["list", "lazy"],
        help="map and imap_unordered: a list, or a generator that waits for ever after the "
        "last item",
    )
    parser.add_argument(
        "--wait",
        default="results",
        choices=["results", "exit", "busy"],
        help="submit: wait on every future, leave the with block at once, or wait for the "
        "results and then spin in user code",
    )
    parser.add_argument("--events", required=True)
    parser.add_argument("--release", required=True)
    parser.add_argument("--user-handler", action="store_true")
    parser.add_argument("--watch-level", action="store_true")
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=None,
        help="seconds a stopped worker has before it is killed (default: cleanbreak's own)",
    )
    args = parser.parse_args()
    if args.journal:  # in the run's own folder, where the events FIFO is
        args.journal = os.path.join(os.path.dirname(args.events), args.journal)
    # The test sends SIGUSR1 to a child that hangs, to see where every thread is.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    if args.stop_grace is not None:
        # Test instrumentation: a long grace makes "the second Ctrl-C leaves a task that
        # ignores SIGTERM running, the third kills it" deterministic.
        cleanbreak._manager.STOP_GRACE = args.stop_grace

    if args.user_handler:
        signal.signal(signal.SIGINT, _user_handler)
    if args.hold_spawn:
        _hold_spawn(args.events, args.release)
    if args.hold_shutdown:
        _hold_shutdown(args.events, args.release)
    if args.hold_construct:
        _hold_construct(args.events, args.release)
    if args.hold_finished:
        _hold_finished(args.events, args.release)
    if args.hold_journal_close:
        _hold_journal_close(args.events, args.release)
    init = (hold_orphans, (args.events,)) if args.hold_orphan else (None, ())
    specs: list[Spec] = [(k, i, args.events, args.release) for i, k in enumerate(args.layout)]
    futures: list[Future[Receipt]] = []
    report: dict[str, Any] = {}
    try:
        if args.api == "cbmap":
            results: list[Any] = cleanbreak.map(
                task,
                specs,
                workers=args.workers,
                on_interrupt=args.mode,
                chunksize=args.chunksize,
                mp_context=args.method,
                journal=args.journal,
            )
        elif args.api == "asyncio-pool-before":  # made before asyncio.run, which then
            with cleanbreak.Pool(  # installs no SIGINT handler of its own (ours is there)
                args.workers, on_interrupt=args.mode, mp_context=args.method
            ) as pool:
                results = asyncio.run(_await_all(args, pool, specs, report))
        elif args.api.startswith("asyncio"):
            results = asyncio.run(_run_in_executor(args, specs, report))
        else:
            with cleanbreak.Pool(
                args.workers,
                on_interrupt=args.mode,
                mp_context=args.method,
                initializer=init[0],
                initargs=init[1],
                journal=args.journal,
            ) as pool:
                emit(args.events, "pids", ",".join(str(p) for p in pool._backend.pids))
                if args.watch_level:
                    _start_watcher(pool, args.events)
                if args.api in ("map", "imap_unordered"):
                    mapper = pool.map if args.api == "map" else pool.imap_unordered
                    source = specs if args.input == "list" else _waiting(specs, args.events)
                    results = []
                    report["yielded"] = results
                    for result in mapper(task, source, chunksize=args.chunksize):
                        results.append(result)
                else:
                    futures = [pool.submit(task, spec) for spec in specs]
                    if args.wait != "exit":
                        results = [f.result() for f in futures]
                    if args.wait == "busy":
                        emit(args.events, "busy", time.monotonic_ns())
                        _spin()
    except cleanbreak.Interrupted as exc:
        report["caught_ns"] = time.monotonic_ns()
        report["signal"] = exc.signal.name
        report["completed"] = {str(k): v for k, v in sorted(exc.completed.items())}
        report["total"] = exc.total
        status = 130
    else:
        report["caught_ns"] = None
        report["signal"] = None
        report["results"] = results if args.wait != "exit" else None
        status = 0
    report["futures"] = [_future_state(f) for f in futures]
    report["sigint_handler_is_users"] = signal.getsignal(signal.SIGINT) is _user_handler
    report["sigint_handler"] = repr(signal.getsignal(signal.SIGINT))
    report["sigterm_handler"] = repr(signal.getsignal(signal.SIGTERM))
    print(json.dumps(report), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
