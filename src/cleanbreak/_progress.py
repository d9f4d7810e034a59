"""The progress display of ``map(progress=True)`` and of ``cleanbreak run``.

A thread of its own polls the run's counters a few times a second and draws them, so the hot
paths (the manager thread, the caller's loop) only count. On a terminal it is a live bar drawn
by rich, when the ``cli`` extra is installed, or a line redrawn in place; elsewhere (a log, a
pipe) it prints a plain line at every tenth of the way, and at least every 30 seconds. It writes
to stderr, and ends with a one-line summary.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from . import _signals

POLL_SECONDS = 0.1
PLAIN_EVERY_SECONDS = 30.0

Counts = Callable[
    [], tuple[int, int, int]
]  # outcomes so far, failures and journal reuses among them


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Shows ``counts()`` against ``total`` (None: unknown) until ``stop``."""

    def __init__(
        self,
        counts: Counts,
        total: int | None,
        *,
        label: str = "tasks",
        resume_hint: str | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self._counts = counts
        self.total = total
        self._label = label
        self._hint = resume_hint
        self._stream = stream if stream is not None else sys.stderr
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False
        self._tty = _isatty(self._stream)
        self._rich: Any = None
        self._task: Any = None
        self._last_line = self._started
        self._last_tenth = 0
        if self._tty:
            with contextlib.suppress(ImportError):
                self._start_rich()
        self._thread = _signals.start_quiet_thread(self._loop, "cleanbreak-progress")

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        columns: list[Any] = [
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn() if self.total is not None else TextColumn("{task.completed}"),
            TaskProgressColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        rich = RichProgress(*columns, console=Console(file=self._stream), transient=True)
        self._task = rich.add_task(self._label, total=self.total, failed=0, rate="")
        # rich redraws from a thread of its own: started with SIGINT and SIGTERM blocked, so
        # that a signal always reaches the main thread (see _signals.start_quiet_thread).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _signals.HANDLED)
        try:
            rich.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._rich = rich

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            with self._lock:
                if self._stopped:
                    return
                with contextlib.suppress(Exception):
                    self._draw(*self._counts())

    def _draw(self, done: int, failed: int, reused: int) -> None:
        # Outcomes reused from a journal come at once: they do not count in the rate.
        took = time.monotonic() - self._started
        rate = (done - reused) / took if took > 0 else 0.0
        if self._rich is not None:
            self._rich.update(self._task, completed=done, failed=failed, rate=f"{rate:,.1f}/s")
            return
        now = time.monotonic()
        of = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", ETA {_clock((self.total - done) / rate)}"
        line = f"{self._label}: {done:,}{of} done, {failed:,} failed, {rate:,.1f}/s{eta}"
        if self._tty:
            self._stream.write(f"\r\x1b[2K{line}")
            self._stream.flush()
            return
        tenth = done * 10 // self.total if self.total else 0
        if tenth > self._last_tenth or now - self._last_line >= PLAIN_EVERY_SECONDS:
            self._last_tenth = tenth
            self._last_line = now
            print(line, file=self._stream, flush=True)

    def stop(self, how: str) -> str:
        """Stop drawing and print the summary line: ``how`` is "done", "interrupted" or
        "stopped" (the caller left the loop). Returns the summary."""
        with self._lock:
            if self._stopped:
                return ""
            self._stopped = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(1.0)
        done, failed, reused = self._counts()
        if self._rich is not None:
            with contextlib.suppress(Exception):
                self._rich.stop()
        elif self._tty:
            self._stream.write("\r\x1b[2K")
        took = time.monotonic() - self._started
        ok = done - failed
        summary = f"{how}: {ok:,} done, {failed:,} failed"
        if self.total is not None and done < self.total:
            summary += f", {self.total - done:,} not done"
        if reused:
            summary += f" ({reused:,} of them from the journal)"
        summary += f" in {took:.1f} s"
        if how != "done" and self._hint:
            summary += f"; {self._hint}"
        with contextlib.suppress(Exception):
            print(summary, file=self._stream, flush=True)
        return summary


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
