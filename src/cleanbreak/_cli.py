"""The ``cleanbreak`` command: ``cleanbreak demo`` runs a CPU-bound job you can stop with Ctrl-C.

The progress display uses rich when the ``cli`` extra is installed, and plain lines otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn, Protocol

from ._errors import Interrupted
from ._pool import Pool, default_workers

DEMO_BASE = 10_000_000
DEMO_BLOCK = 10_000


def count_primes(block: int) -> int:
    """Count the primes in one block of integers above ten million, by trial division.

    Deliberately plain Python: about a tenth of a second of pure CPU per block.
    """
    lo = DEMO_BASE + block * DEMO_BLOCK
    found = 0
    for x in range(lo | 1, lo + DEMO_BLOCK, 2):
        if x % 3 == 0:
            continue
        d = 5
        while d * d <= x:
            if x % d == 0 or x % (d + 2) == 0:
                break
            d += 6
        else:
            found += 1
    return found


class _Progress(Protocol):
    def advance(self) -> None: ...
    def close(self) -> None: ...


class _PlainProgress:
    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()
        self.step = max(1, total // 10)

    def advance(self) -> None:
        self.done += 1
        if self.tty:
            print(f"\r  {self.done}/{self.total} blocks done", end="", file=sys.stderr, flush=True)
        elif self.done % self.step == 0 or self.done == self.total:
            print(f"  {self.done}/{self.total} blocks done", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


class _RichProgress:
    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
        )
        self._task = self._progress.add_task("counting primes", total=total)
        self._progress.start()

    def advance(self) -> None:
        self._progress.advance(self._task)

    def close(self) -> None:
        self._progress.stop()


def _progress(total: int) -> _Progress:
    """A rich progress bar on a terminal, when the cli extra is installed; else plain lines
    on stderr (every tenth of the way when not on a terminal, which suits logs)."""
    if sys.stdout.isatty():
        try:
            return _RichProgress(total)
        except ImportError:
            pass
    return _PlainProgress(total)


def demo(workers: int, blocks: int, on_interrupt: str) -> int:
    print(
        f"cleanbreak demo: counting primes in {blocks} blocks of {DEMO_BLOCK:,} integers on "
        f"{workers} workers. Press Ctrl-C at any time.",
        flush=True,
    )
    started = time.monotonic()
    results: dict[int, int] = {}
    pids: list[int] = []
    progress = _progress(blocks)
    try:
        with Pool(
            workers, on_interrupt="drain" if on_interrupt == "drain" else "terminate"
        ) as pool:
            pids = pool._backend.pids
            for block, count in pool.imap_unordered(_indexed, range(blocks)):
                results[block] = count
                progress.advance()
    except Interrupted as exc:
        progress.close()
        results.update(exc.completed.values())
        took = time.monotonic() - started
        alive = [pid for pid in pids if _alive(pid)]
        workers_left = f"{len(alive)} workers still alive" if alive else "every worker has exited"
        print(
            f"Stopped by {exc.signal.name} after {took:.1f} s: kept {len(results)} of {blocks} "
            f"results ({sum(results.values()):,} primes so far); {workers_left}.",
            flush=True,
        )
        return 128 + int(exc.signal)
    progress.close()
    took = time.monotonic() - started
    print(
        f"Done: {sum(results.values()):,} primes in {blocks} blocks, {took:.1f} s on {workers} "
        "workers.",
        flush=True,
    )
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - the pid was reused by another user's process
        return True
    return True


def _indexed(block: int) -> tuple[int, int]:
    return block, count_primes(block)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cleanbreak", description="A process pool that stops cleanly.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run_demo = sub.add_parser(
        "demo", help="run a CPU-bound job on all cores; press Ctrl-C to stop it cleanly"
    )
    run_demo.add_argument(
        "--workers", type=_positive_int, default=None, help="worker processes (default: CPUs)"
    )
    run_demo.add_argument(
        "--blocks", type=_positive_int, default=300, help="how many tasks (default: 300)"
    )
    run_demo.add_argument(
        "--on-interrupt",
        choices=("terminate", "drain"),
        default="terminate",
        help="on Ctrl-C, stop running tasks (terminate) or let them finish (drain)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.workers or default_workers(), args.blocks, args.on_interrupt)
    parser.print_help()
    return 2
