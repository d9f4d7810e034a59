"""The progress display of ``map(progress=True)`` and of ``cleanbreak run``.

A thread of its own polls the run's counters a few times a second and draws them, so the hot
paths (the manager thread, the caller's loop) only count. On a terminal it is a live bar drawn
by rich, when the ``cli`` extra is installed, or a line redrawn in place; elsewhere (a log, a
pipe) it prints a plain line at every tenth of the way, and at least every 30 seconds. It writes
to stderr, and ends with a one-line summary.

In an IPython kernel (a notebook, JupyterLab, VS Code, nbclient) it is one display instead,
sent with IPython's own display protocol and updated in place (``update_display_data``), which
ends showing the summary; nothing goes to stderr then. It needs no package beyond IPython, which
a kernel always has (rich's and tqdm's notebook displays need ipywidgets).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import html
import importlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from . import _signals

POLL_SECONDS = 0.1
PLAIN_EVERY_SECONDS = 30.0
NOTEBOOK_EVERY_SECONDS = 0.25  # the least time between two updates of a kernel's display

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
        self._display: Any = None  # the kernel's display handle, in a kernel
        self._shown: tuple[int, int, int, int] | None = None  # what the display last showed
        self._context = contextvars.copy_context()  # the caller's: in a kernel, the cell's
        loop: Callable[[], None] = self._loop
        if stream is None and _in_kernel():
            with contextlib.suppress(Exception):
                self._start_display()
        if self._display is not None:
            # The thread sends the display's updates in the context of this cell (this thread's
            # context), so that they carry the cell's request as their parent whatever else the
            # kernel runs meanwhile (another subshell's cell, a comm message): ipykernel files
            # a message from a thread without it under whichever request came last.
            loop = functools.partial(self._context.copy().run, self._loop)
        elif self._tty:
            with contextlib.suppress(ImportError):
                self._start_rich()
        self._thread = _signals.start_quiet_thread(loop, "cleanbreak-progress")

    def _start_display(self) -> None:
        display = importlib.import_module("IPython.display").display
        self._display = display(self._view(0, 0, 0, 0.0), display_id=True)
        self._shown = (0, 0, 0, 0)
        self._last_line = time.monotonic()

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
        now = time.monotonic()
        took = now - self._started
        if self._display is not None:
            # An update when something shown changed (the counts, or the clock's second), and
            # at most one every NOTEBOOK_EVERY_SECONDS.
            shown = (done, failed, reused, int(took))
            if shown != self._shown and now - self._last_line >= NOTEBOOK_EVERY_SECONDS:
                self._shown = shown
                self._last_line = now
                self._display.update(self._view(done, failed, reused, took))
            return
        # Outcomes reused from a journal come at once: they do not count in the rate.
        rate = (done - reused) / took if took > 0 else 0.0
        if self._rich is not None:
            self._rich.update(self._task, completed=done, failed=failed, rate=f"{rate:,.1f}/s")
            return
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
        """Stop drawing and print the summary line (in a kernel: show it in the display, as
        its last update): ``how`` is "done", "interrupted" or "stopped" (the caller left the
        loop). Returns the summary."""
        with self._lock:
            if self._stopped:
                return ""
            self._stopped = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(1.0)
        done, failed, reused = self._counts()
        if self._display is not None:
            pass  # its last update, the summary, is below
        elif self._rich is not None:
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
        if self._display is not None:
            # The display ends showing the summary, in place of the summary line.
            view = self._view(done, failed, reused, took, ended=how, summary=summary)
            with contextlib.suppress(Exception):
                self._context.copy().run(self._display.update, view)
            return summary
        with contextlib.suppress(Exception):
            print(summary, file=self._stream, flush=True)
        return summary

    def _view(
        self,
        done: int,
        failed: int,
        reused: int,
        took: float,
        *,
        ended: str | None = None,
        summary: str | None = None,
    ) -> _View:
        """What the kernel's display shows; ``ended``: how the run ended, once it has."""
        rate = (done - reused) / took if took > 0 else 0.0
        eta = None
        if ended is None and self.total is not None and rate > 0:
            eta = _clock((self.total - done) / rate)
        total = self.total
        if total is None and ended == "done":
            total = done  # known now
        bar = ended is None or total is not None  # no bar moving to and fro once it ended
        return _View(
            self._label, done, total, failed, reused, rate, _clock(took), eta, summary, bar
        )


class _View:
    """What a kernel's display shows: a bar (``_repr_html_``), and the same as a line of text
    for a front end that shows text only."""

    def __init__(
        self,
        label: str,
        done: int,
        total: int | None,
        failed: int,
        reused: int,
        rate: float,
        elapsed: str,
        eta: str | None,
        summary: str | None,
        bar: bool,
    ) -> None:
        self.label = label
        self.done = done
        self.total = total
        self.failed = failed
        self.reused = reused
        self.rate = rate
        self.elapsed = elapsed
        self.eta = eta
        self.summary = summary
        self.bar = bar

    def _counts(self) -> str:
        of = f"/{self.total:,}" if self.total is not None else ""
        line = f"{self.done:,}{of} done"
        if self.total:
            line += f" ({100 * self.done // self.total}%)"
        line += f", {self.failed:,} failed"
        if self.reused:
            line += f" ({self.reused:,} from the journal)"
        return line

    def _timing(self) -> str:
        line = f"{self.rate:,.1f}/s, {self.elapsed} elapsed"
        if self.eta is not None:
            line += f", ETA {self.eta}"
        return line

    def __repr__(self) -> str:
        line = f"{self.label}: {self._counts()}, {self._timing()}"
        if self.summary is not None:
            line += f"\n{self.summary}"
        return line

    def _repr_html_(self) -> str:
        bar = ""
        if self.bar:
            # No value: the bar of an unknown total, which moves to and fro.
            value = "" if self.total is None else f' value="{self.done}" max="{self.total}"'
            if self.total == 0:
                value = ' value="1" max="1"'
            bar = f'<progress{value} style="width: 20em; vertical-align: middle"></progress> '
        counts = html.escape(self._counts())
        if self.failed:
            failed = html.escape(f"{self.failed:,} failed")
            counts = counts.replace(failed, f'<span style="color: #c62828">{failed}</span>', 1)
        parts = [
            '<div class="cleanbreak-progress" style="font-family: monospace">',
            f"<b>{html.escape(self.label)}</b> {bar}{counts}, {html.escape(self._timing())}",
        ]
        if self.summary is not None:
            parts.append(f"<br>{html.escape(self.summary)}")
        parts.append("</div>")
        return "".join(parts)


def _in_kernel() -> bool:
    """Whether this runs in an IPython kernel (a notebook's); not in IPython in a terminal.
    IPython is not imported for this."""
    module = sys.modules.get("IPython")
    get_ipython = getattr(module, "get_ipython", None)
    if get_ipython is None:
        return False
    try:
        shell = get_ipython()
    except Exception:
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
