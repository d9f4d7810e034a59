"""``progress=True`` on ``map``, ``imap_unordered`` and ``cleanbreak.map``: the display goes to
stderr and ends with a one-line summary. (The live bar on a terminal is tested through
``cleanbreak run`` in a pseudo-terminal, in ``tests/system/test_run.py``; the display in a real
IPython kernel in ``tests/system/test_notebook_progress.py``.)"""

from __future__ import annotations

import io
import sys
import threading
import types

import pytest

import cleanbreak
from cleanbreak._progress import Progress
from tests import tasks


def _summary(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_map_shows_progress_and_a_summary(
    fs_pool: cleanbreak.Pool, capfd: pytest.CaptureFixture[str]
) -> None:
    assert list(fs_pool.map(tasks.square, range(50), progress=True)) == [x * x for x in range(50)]
    assert _summary(capfd.readouterr().err).startswith("done: 50 done, 0 failed in ")


def test_imap_unordered_counts_failures(
    fs_pool: cleanbreak.Pool, capfd: pytest.CaptureFixture[str]
) -> None:
    out = list(
        fs_pool.imap_unordered(
            tasks.raise_task_error, [-1, 2, -3], progress=True, return_exceptions=True
        )
    )
    assert len(out) == 3
    assert _summary(capfd.readouterr().err).startswith("done: 2 done, 1 failed in ")


def test_leaving_the_loop_early_says_stopped(
    fs_pool: cleanbreak.Pool, capfd: pytest.CaptureFixture[str]
) -> None:
    for _ in fs_pool.map(tasks.square, range(1000), progress=True, chunksize=1):
        break
    summary = _summary(capfd.readouterr().err)
    assert summary.startswith("stopped: ") and " not done " in summary, summary


def test_module_map_shows_progress(capfd: pytest.CaptureFixture[str]) -> None:
    assert cleanbreak.map(tasks.square, range(5), workers=2, progress=True) == [
        0,
        1,
        4,
        9,
        16,
    ]
    assert _summary(capfd.readouterr().err).startswith("done: 5 done, 0 failed in ")


def test_no_progress_prints_nothing(
    fs_pool: cleanbreak.Pool, capfd: pytest.CaptureFixture[str]
) -> None:
    list(fs_pool.map(tasks.square, range(5)))
    assert capfd.readouterr().err == ""


def test_progress_must_be_a_bool(fs_pool: cleanbreak.Pool) -> None:
    with pytest.raises(TypeError, match="progress must be True or False"):
        fs_pool.map(tasks.square, range(3), progress=1)  # type: ignore[arg-type]


def test_plain_lines_come_at_each_tenth() -> None:
    done = [0]
    stream = io.StringIO()
    progress = Progress(lambda: (done[0], 0, 0), 100, label="work", stream=stream)
    seen = threading.Event()
    for step in range(1, 101):
        done[0] = step
        if step % 10 == 0:
            # Wait for the display's thread to draw this tenth (a handshake, with a guard).
            for _ in range(200):
                if f"work: {step}/100 done" in stream.getvalue():
                    break
                seen.wait(0.01)
    summary = progress.stop("done")
    lines = stream.getvalue().splitlines()
    assert lines[:-1] == [line for line in lines[:-1] if line.startswith("work: ")]
    assert [line.split()[1] for line in lines[:-1]] == [f"{10 * k}/100" for k in range(1, 11)]
    assert lines[-1] == summary and summary.startswith("done: 100 done, 0 failed in ")


def _short_run(stream: io.StringIO | None = None) -> str:
    done = [0]
    progress = Progress(lambda: (done[0], 0, 0), 10, label="work", stream=stream)
    done[0] = 10
    return progress.stop("done")


def test_outside_ipython_it_is_not_imported(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    summary = _short_run()
    assert "IPython" not in sys.modules
    assert _summary(capfd.readouterr().err) == summary


class _FakeIPython:
    """An IPython in ``sys.modules`` whose shell has a kernel or not, and whose display
    records what it is asked to show (or fails, when ``broken``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, kernel: bool, broken: bool = False):
        self.shown: list[tuple[str, str]] = []
        shell = types.SimpleNamespace(**({"kernel": object()} if kernel else {}))
        ipython = types.ModuleType("IPython")
        ipython.get_ipython = lambda: shell  # type: ignore[attr-defined]
        display = types.ModuleType("IPython.display")
        display.display = self.display  # type: ignore[attr-defined]
        ipython.display = display  # type: ignore[attr-defined]
        self.broken = broken
        monkeypatch.setitem(sys.modules, "IPython", ipython)
        monkeypatch.setitem(sys.modules, "IPython.display", display)

    def display(self, obj: object, display_id: bool = False) -> types.SimpleNamespace:
        if self.broken:
            raise RuntimeError("no display here")
        assert display_id is True
        self.shown.append(("display", repr(obj)))
        return types.SimpleNamespace(update=lambda new: self.shown.append(("update", repr(new))))


def test_ipython_in_a_terminal_keeps_the_lines(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """IPython without a kernel (in a terminal): the lines go to stderr, as in a script. (A
    real kernel and a real terminal IPython: ``tests/system/test_notebook_progress.py``.)"""
    fake = _FakeIPython(monkeypatch, kernel=False)
    summary = _short_run()
    assert _summary(capfd.readouterr().err) == summary
    assert fake.shown == []


def test_in_a_kernel_it_is_one_display(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    fake = _FakeIPython(monkeypatch, kernel=True)
    summary = _short_run()
    assert capfd.readouterr().err == ""
    kinds = [kind for kind, _ in fake.shown]
    assert kinds[0] == "display" and set(kinds[1:]) == {"update"}, kinds
    assert fake.shown[0][1].startswith("work: 0/10 done (0%), 0 failed, ")
    assert fake.shown[-1][1].startswith("work: 10/10 done (100%), 0 failed, ")
    assert fake.shown[-1][1].endswith(f"\n{summary}")


def test_in_a_kernel_a_stream_given_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeIPython(monkeypatch, kernel=True)
    stream = io.StringIO()
    summary = _short_run(stream)
    assert stream.getvalue().splitlines()[-1] == summary
    assert fake.shown == []


def test_in_a_kernel_without_a_display_the_lines_come(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    _FakeIPython(monkeypatch, kernel=True, broken=True)
    summary = _short_run()
    assert _summary(capfd.readouterr().err) == summary
