"""What every measurement shares: settings, child processes, process sessions, tables.

Every measurement runs its libraries in child processes (``child.py``), one per library and
repetition. A fresh process gives each library the same start (no warm caches or leftover
threads from another library), makes ``ru_maxrss`` a clean peak-memory figure, and lets the
runner kill a library that hangs, runs away with memory, or leaves processes behind.

Each child is started with ``start_new_session=True``, so the child and everything it starts
share a session id equal to the child's pid. Worker processes that move to a process group of
their own (cleanbreak's do) stay in that session, so a scan of the session finds every
descendant, even after the child has died and they were re-parented.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psutil
from tasks import LOG_ENV

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CHILD_SCRIPT = BENCH_DIR / "child.py"

Params = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    """What the command line chose."""

    workers: int
    quick: bool
    reps: int | None  # None: each measurement's own default

    def repetitions(self, full: int, quick: int) -> int:
        if self.reps is not None:
            return self.reps
        return quick if self.quick else full


def progress(message: str, stream: TextIO = sys.stderr) -> None:
    print(message, file=stream, flush=True)


# ── tables ───────────────────────────────────────────────────────────────────────────────────


@dataclass
class Section:
    """One measurement's results: a markdown table plus the lines that explain it."""

    name: str
    title: str
    intro: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.intro, ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append(
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.header))) + "|"
        )
        lines.extend(
            "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows
        )
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines) + "\n"


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def fmt_rate(value: float) -> str:
    """A rate with three significant figures and thousands separators."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def fmt_seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 100:
        return f"{value:.2f} s"
    return f"{value:,.0f} s"


def rotated(items: Sequence[Any], rep: int) -> list[Any]:
    """``items`` starting at position ``rep``: each repetition runs them in another order."""
    if not items:
        return []
    k = rep % len(items)
    return [*items[k:], *items[:k]]


# ── child processes ──────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Event:
    """One line of the task log."""

    t: float
    pid: int
    what: str
    index: int


class Child:
    """One run of ``child.py SCENARIO PARAMS OUT`` (or of ``script``, which takes the same
    arguments) in a session of its own.

    The child writes its findings as JSON to ``OUT`` (atomically, possibly more than once; the
    last write wins). Its stdout and stderr go to a file, shown when something goes wrong.
    """

    def __init__(self, scenario: str, params: Params, script: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cb-bench-"))
        self.out = self.dir / "result.json"
        self.log = self.dir / "tasks.log"
        self.output = self.dir / "output.txt"
        env = dict(os.environ)
        env[LOG_ENV] = str(self.log)
        env.pop("PYTHONSTARTUP", None)
        self.started = time.monotonic()
        with open(self.output, "wb") as sink:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(script or CHILD_SCRIPT),
                    scenario,
                    json.dumps(params),
                    str(self.out),
                ],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        self.sid = self.pid
        self._pidfd = os.pidfd_open(self.pid)
        self.exited_at: float | None = None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the child to exit; True if it has.

        Waits on a pidfd, so the exit time is exact, not rounded up to a polling interval.
        """
        if self.exited_at is not None:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1000):
            return False
        self.exited_at = time.monotonic()
        self.proc.wait()
        return True

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def result(self) -> Params | None:
        try:
            data = json.loads(self.out.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def events(self) -> list[Event]:
        try:
            text = self.log.read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 4:
                out.append(Event(float(parts[0]), int(parts[1]), parts[2], int(parts[3])))
        return out

    def wait_for_events(self, what: str, count: int, timeout: float) -> bool:
        """Poll the task log until ``count`` events ``what`` are there. False on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for e in self.events() if e.what == what) >= count:
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.005)
        return False

    def output_tail(self, lines: int = 8) -> str:
        try:
            text = self.output.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def session(self) -> list[psutil.Process]:
        """Live processes in the child's session other than the child itself."""
        return session_members(self.sid, exclude=self.pid)

    def descendants(self) -> list[psutil.Process]:
        """The child's descendants now: its process tree, plus the rest of its session."""
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.pid).children(recursive=True):
                found[proc.pid] = proc
        for proc in self.session():
            found.setdefault(proc.pid, proc)
        return list(found.values())

    def kill_all(self) -> None:
        """SIGKILL the child and every process left in its session, and reap the child."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        for proc in self.session():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self.wait(10)
        deadline = time.monotonic() + 5
        while self.session() and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.kill_all()
        os.close(self._pidfd)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (the same process: psutil checks the start time too)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def session_members(sid: int, exclude: int | None = None) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        if proc.pid == exclude:
            continue
        try:
            if os.getsid(proc.pid) == sid and alive(proc):
                out.append(proc)
        except OSError:
            continue
    return out


def run_child(
    scenario: str, params: Params, timeout: float, script: Path | None = None
) -> tuple[Params | None, str]:
    """Run a child (``script``: another main module than child.py) to completion. Returns its
    result, or None and why there is none."""
    with Child(scenario, params, script) as child:
        if not child.wait(timeout):
            return None, f"no result within {timeout:.0f} s"
        result = child.result()
        if result is None:
            return None, f"exit status {child.returncode}: {child.output_tail(4)}"
        return result, ""


def started_after(events: Iterable[Event], t0: float) -> str:
    """How many tasks started after ``t0``, and when the first and last of them did."""
    late = sorted(e.t - t0 for e in events if e.what == "start" and e.t > t0)
    if not late:
        return "0"
    if len(late) == 1:
        return f"{len(late)} (at +{fmt_seconds(late[0])})"
    return f"{len(late)} (+{fmt_seconds(late[0])} to +{fmt_seconds(late[-1])})"


def describe_processes(procs: Sequence[psutil.Process], worker_pids: set[int]) -> str:
    """``"0"``, or the count in bold split into workers (pids that ran a task) and helpers."""
    if not procs:
        return "0"
    workers = sum(1 for p in procs if p.pid in worker_pids)
    helpers = len(procs) - workers
    parts = []
    if workers:
        parts.append(f"{workers} worker{'s' if workers > 1 else ''}")
    if helpers:
        parts.append(f"{helpers} helper{'s' if helpers > 1 else ''}")
    return f"**{len(procs)}** ({', '.join(parts)})"


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit {returncode}"


def current_rss() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Start this process's peak resident set size afresh from its current size (Linux:
    ``/proc/self/clear_refs``). False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (exact: the kernel keeps it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ── the machine ──────────────────────────────────────────────────────────────────────────────


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine() -> str:
    usable = len(os.sched_getaffinity(0))
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} logical cores ({usable} usable), {cpu_model()}, {memory:.0f} GiB RAM; "
        f"Python {sys.version.split()[0]} ({sys.implementation.name}) on Linux "
        f"{os.uname().release}"
    )
