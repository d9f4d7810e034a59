"""Fixtures for the system tests, and a summary of the figures they measured."""

from __future__ import annotations

import json
import os
import signal
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._harness import FIGURES, Child

StartChild = Callable[..., Child]

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # pytest was started in the background by a shell without job control, which ignores
    # SIGINT for it. The children these tests signal would inherit that: give them a terminal's.
    signal.signal(signal.SIGINT, signal.default_int_handler)


class _Started:
    """The children a test started, each in a folder of its own; ``cleanup`` kills and reaps
    everything they started."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.children: list[Child] = []

    def start(self, argv: list[str], **kw: Any) -> Child:
        tmp = self.tmp_path / f"child{len(self.children)}"
        tmp.mkdir()
        child = Child(tmp, argv, **kw)
        self.children.append(child)
        child.start()
        return child

    def cleanup(self) -> None:
        for child in self.children:
            child.cleanup()


@pytest.fixture
def start_child(tmp_path: Path) -> Iterator[StartChild]:
    """Start ``scripts/sysprobe_child.py`` with the given options; everything it started is
    killed and reaped when the test ends, however it ends."""
    started = _Started(tmp_path)

    def start(
        *,
        method: str,
        layout: str,
        workers: int = 2,
        mode: str = "terminate",
        api: str = "submit",
        wait: str = "results",
        user_handler: bool = False,
        watch_level: bool = False,
        stop_grace: float | None = None,
        input: str = "list",
        chunksize: int = 1,
        hold_spawn: bool = False,
        hold_shutdown: bool = False,
        hold_construct: bool = False,
        hold_orphan: bool = False,
        park_bootstrap: bool = False,
        hold_journal_close: bool = False,
        hold_finished: bool = False,
        journal: str | None = None,
    ) -> Child:
        argv = [
            f"--method={method}",
            f"--layout={layout}",
            f"--workers={workers}",
            f"--mode={mode}",
            f"--api={api}",
            f"--wait={wait}",
            f"--input={input}",
            f"--chunksize={chunksize}",
        ]
        switches = {
            "--hold-spawn": hold_spawn,
            "--hold-shutdown": hold_shutdown,
            "--hold-construct": hold_construct,
            "--hold-orphan": hold_orphan,
            "--hold-journal-close": hold_journal_close,
            "--hold-finished": hold_finished,
            "--user-handler": user_handler,
            "--watch-level": watch_level,
        }
        argv += [name for name, on in switches.items() if on]
        if stop_grace is not None:
            argv.append(f"--stop-grace={stop_grace}")
        if journal is not None:
            argv.append(f"--journal={journal}")
        return started.start(argv, park_bootstrap=park_bootstrap)

    try:
        yield start
    finally:
        started.cleanup()


StartCommand = Callable[..., Child]


@pytest.fixture
def start_command(tmp_path: Path) -> Iterator[StartCommand]:
    """Start ``command`` (a script of ``scripts/`` run by this Python, or any argv) with the
    events and release FIFOs appended to its arguments; cleaned up as ``start_child`` does."""
    started = _Started(tmp_path)

    def start(command: list[str], *argv: str) -> Child:
        return started.start(list(argv), command=command)

    try:
        yield start
    finally:
        started.cleanup()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("cleanbreak system figures (median, min, max over runs)")
    for name in sorted(FIGURES):
        values = FIGURES[name]
        terminalreporter.write_line(
            f"{name:<60} {statistics.median(values):9.2f} {min(values):9.2f} "
            f"{max(values):9.2f}   n={len(values)}"
        )
    path = os.environ.get("CLEANBREAK_SYSTEM_FIGURES")
    if path:
        Path(path).write_text(json.dumps(FIGURES, indent=1, sort_keys=True))
