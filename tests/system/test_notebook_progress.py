"""``progress=True`` in a notebook: one display, updated in place.

In a real IPython kernel, driven as a front end drives it, ``map``, ``imap_unordered`` and
``cleanbreak.map`` with ``progress=True`` send one ``display_data`` and then only
``update_display_data`` messages for the same display, all filed under the cell that ran the
call (even the ones the progress thread sends while another cell runs in a subshell), and no
text to stdout or stderr; the last update shows how the run ended. IPython in a terminal keeps
the lines on stderr.

Every message the kernel publishes is recorded (not only those filed under a cell the test
knows), so that an update filed under the wrong request is seen. Synchronisation is by
handshake: the test waits for the display's first update, or for a cell's marker; every wait
is bounded by a deadlock guard only.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cleanbreak._progress import NOTEBOOK_EVERY_SECONDS
from tests.tasks import GUARD

from ._kernel import ROOT, Cell, Kernel

pytest.importorskip("ipykernel")

N = 400
SHOWN = ("display_data", "update_display_data")


@dataclass
class Notebook:
    kernel: Kernel
    seen: list[dict[str, Any]]  # every iopub message the kernel sent, whatever its parent


@pytest.fixture(scope="module")
def notebook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Notebook]:
    k = Kernel(tmp_path_factory.mktemp("kernel"))
    seen: list[dict[str, Any]] = []
    get = k.client.get_iopub_msg

    def record(*args: Any, **kwargs: Any) -> dict[str, Any]:
        msg: dict[str, Any] = get(*args, **kwargs)
        seen.append(msg)
        return msg

    k.client.get_iopub_msg = record  # type: ignore[method-assign]
    try:
        k.ok(
            "import threading, time\nimport cleanbreak\nfrom tests import tasks\n"
            f"GUARD = {GUARD}\npool = cleanbreak.Pool(2)"
        )
        yield Notebook(k, seen)
    finally:
        k.shutdown()


def _pump_until(kernel: Kernel, done: Callable[[], bool], what: str) -> None:
    """Take the kernel's messages until ``done()`` (a handshake; the timeout is a guard)."""
    deadline = time.monotonic() + GUARD
    while not done():
        left = deadline - time.monotonic()
        assert left > 0, f"no {what}"
        kernel._pump(left)


def _display_id(msg: dict[str, Any]) -> str | None:
    transient = msg["content"].get("transient") or {}
    return transient.get("display_id")


def _the_display(notebook: Notebook, cell: Cell) -> list[dict[str, Any]]:
    """The one display the cell showed, with its updates: checks that it is one display,
    updated in place, every message of it filed under the cell, and no text from the cell."""
    assert cell.stdout == "" and cell.stderr == "", cell.summary()
    assert [m for m in cell.messages if m["msg_type"] == "stream"] == []
    shown = [m for m in cell.messages if m["msg_type"] in SHOWN]
    kinds = [m["msg_type"] for m in shown]
    assert kinds[:1] == ["display_data"], kinds
    assert kinds[1:] == ["update_display_data"] * (len(kinds) - 1), kinds
    assert len(shown) >= 2, "no update after the display"
    display_id = _display_id(shown[0])
    assert display_id, shown[0]
    assert all(_display_id(m) == display_id for m in shown), shown
    # Every message of this display, whatever request it was filed under, is the cell's.
    ours = [m for m in notebook.seen if m["msg_type"] in SHOWN and _display_id(m) == display_id]
    assert [m["parent_header"].get("msg_id") for m in ours] == [cell.msg_id] * len(ours)
    assert len(ours) == len(shown)
    for m in shown:
        data = m["content"]["data"]
        assert set(data) >= {"text/plain", "text/html"}, data
        assert "cleanbreak-progress" in data["text/html"]
    return shown


def _text(msg: dict[str, Any]) -> str:
    return str(msg["content"]["data"]["text/plain"])


def test_pool_map_is_one_display(notebook: Notebook) -> None:
    cell = notebook.kernel.ok(f"len(list(pool.map(tasks.square, range({N}), progress=True)))")
    assert cell.value() == N
    shown = _the_display(notebook, cell)
    assert _text(shown[0]).startswith(f"square: 0/{N} done (0%), 0 failed")
    last = _text(shown[-1])
    assert f"square: {N}/{N} done (100%), 0 failed" in last, last
    assert f"\ndone: {N} done, 0 failed in " in last, last
    assert f'<progress value="{N}" max="{N}"' in shown[-1]["content"]["data"]["text/html"]


def test_module_map_is_one_display(notebook: Notebook) -> None:
    cell = notebook.kernel.ok(
        f"len(cleanbreak.map(tasks.square, range({N}), workers=2, progress=True))"
    )
    assert cell.value() == N
    last = _text(_the_display(notebook, cell)[-1])
    assert f"square: {N}/{N} done (100%)" in last and f"\ndone: {N} done, 0 failed in " in last


@pytest.mark.parametrize("items", [f"range({N})", f"iter(range({N}))"])
def test_imap_unordered_is_one_display(notebook: Notebook, items: str) -> None:
    cell = notebook.kernel.ok(
        f"sorted(pool.imap_unordered(tasks.square, {items}, progress=True)) == "
        f"[x * x for x in range({N})]"
    )
    assert cell.value() is True
    shown = _the_display(notebook, cell)
    # Of an iterator the total is unknown until it ends.
    of = f"/{N}" if items.startswith("range") else ""
    assert _text(shown[0]).startswith(f"square: 0{of} done")
    last = _text(shown[-1])
    assert f"square: {N}/{N} done (100%)" in last and f"\ndone: {N} done, 0 failed in " in last


def test_failures_show_in_the_display(notebook: Notebook) -> None:
    cell = notebook.kernel.ok(
        "len(list(pool.imap_unordered(tasks.raise_task_error, [-1, 2, -3], progress=True,"
        " return_exceptions=True)))"
    )
    assert cell.value() == 3
    last = _the_display(notebook, cell)[-1]
    assert "\ndone: 2 done, 1 failed in " in _text(last), _text(last)
    assert '<span style="color: #c62828">1 failed</span>' in last["content"]["data"]["text/html"]


def test_leaving_the_loop_early_says_stopped(notebook: Notebook) -> None:
    cell = notebook.kernel.ok(
        "for _ in pool.imap_unordered(tasks.square, range(1000), progress=True, chunksize=1):\n"
        "    break"
    )
    last = _text(_the_display(notebook, cell)[-1])
    assert "\nstopped: " in last and " not done " in last, last


def test_updates_come_a_few_times_a_second_while_it_runs(notebook: Notebook) -> None:
    # Most of a second of 1 ms tasks, one at a time on each of two workers.
    cell = notebook.kernel.ok(
        "_t = time.monotonic()\n"
        "_n = len(list(pool.map(tasks.one_ms, range(1500), progress=True, chunksize=1)))\n"
        "_n, time.monotonic() - _t"
    )
    n, took = cell.value()
    assert n == 1500
    shown = _the_display(notebook, cell)
    updates = shown[1:-1]  # the ones while it ran, before the last
    assert updates, "no update while it ran"
    assert len(updates) <= took / NOTEBOOK_EVERY_SECONDS + 1, (len(updates), took)
    texts = [_text(m) for m in shown]
    # No update repeats what was shown already, and the counts only go up.
    assert all(a != b for a, b in itertools.pairwise(texts)), texts
    counts = [int(t.split(": ", 1)[1].split("/", 1)[0].replace(",", "")) for t in texts]
    assert counts == sorted(counts) and counts[-1] == 1500, texts


def test_the_interrupt_button_ends_the_display_interrupted(notebook: Notebook) -> None:
    kernel = notebook.kernel
    cell = kernel.start(
        "try:\n"
        "    cleanbreak.map(tasks.one_ms, range(5000), workers=2, progress=True)\n"
        "except cleanbreak.Interrupted as exc:\n"
        "    _kept = len(exc.completed)\n"
        "_kept"
    )
    # The handshake: the display's first update says the run is going.
    _pump_until(
        kernel,
        lambda: any(m["msg_type"] == "update_display_data" for m in cell.displays),
        "update of the display",
    )
    kernel.interrupt()
    kernel.wait(cell)
    assert cell.status == "ok", cell.summary()
    assert 0 < cell.value() < 5000
    last = _text(_the_display(notebook, cell)[-1])
    summary = last.split("\n")[-1]
    match = re.fullmatch(
        r"interrupted: ([\d,]+) done, 0 failed, ([\d,]+) not done in .* s", summary
    )
    assert match, last
    done, left = (int(n.replace(",", "")) for n in match.groups())
    assert done > 0 and done + left == 5000, last


def _kernel_info(kernel: Kernel) -> dict[str, Any]:
    """The kernel's ``kernel_info_reply``; a cell's reply that comes first is filed with it."""
    request = kernel.client.kernel_info()
    deadline = time.monotonic() + GUARD
    while True:
        reply = kernel.client.get_shell_msg(timeout=max(0.0, deadline - time.monotonic()))
        parent = reply["parent_header"].get("msg_id")
        if parent == request:
            return dict(reply["content"])
        if (cell := kernel._cells.get(parent)) is not None:
            cell.status = reply["content"]["status"]


def _subshell(kernel: Kernel) -> str:
    """A new subshell of the kernel (ipykernel 7): cells sent to it run in a thread of their
    own, while the main shell runs another."""
    client = kernel.client
    client.control_channel.send(client.session.msg("create_subshell_request", {}))
    reply = client.get_control_msg(timeout=GUARD)
    assert reply["content"]["status"] == "ok", reply
    return str(reply["content"]["subshell_id"])


def _start_in(kernel: Kernel, subshell: str, code: str) -> Cell:
    """Start a cell in a subshell (``Kernel.start`` sends to the main shell only)."""
    client = kernel.client
    content = {
        "code": code,
        "silent": False,
        "store_history": False,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }
    msg = client.session.msg("execute_request", content)
    msg["header"]["subshell_id"] = subshell
    client.shell_channel.send(msg)
    cell = Cell(msg["header"]["msg_id"])
    kernel._cells[cell.msg_id] = cell
    return cell


def test_updates_stay_with_their_cell_while_another_cell_runs(notebook: Notebook) -> None:
    """The progress thread's updates carry the request of the cell that started the run, even
    while a cell runs in a subshell (ipykernel files a thread's message under the request it
    saw last, unless the thread runs in the cell's context)."""
    kernel = notebook.kernel
    if "kernel subshells" not in _kernel_info(kernel).get("supported_features", []):
        pytest.skip("this kernel has no subshells")
    first, second = _subshell(kernel), _subshell(kernel)
    kernel.ok("release, go = threading.Event(), threading.Event()")
    # The run gives 20 items, then waits for `release` before it gives the rest.
    cell = kernel.start(
        "def _items():\n"
        "    yield from range(20)\n"
        "    release.wait(GUARD)\n"
        "    yield from range(20, 40)\n"
        "n_done = len(list(pool.imap_unordered(tasks.square, _items(), progress=True)))"
    )
    # The other cell starts once this one runs (its display is there), so that it is the
    # request the kernel saw last.
    _pump_until(kernel, lambda: bool(cell.displays), "display")
    other = _start_in(kernel, first, "print('other cell', flush=True)\ngo.wait(GUARD)")
    kernel.wait_for_output(other, "other cell")
    # An update sent while the other cell runs (it says so before it waits): the display's
    # clock moves at least once a second.
    since = len(notebook.seen)
    _pump_until(
        kernel,
        lambda: any(m["msg_type"] == "update_display_data" for m in notebook.seen[since:]),
        "update while the other cell ran",
    )
    third = _start_in(kernel, second, "go.set()\nrelease.set()")
    for each in (other, third, cell):
        kernel.wait(each)
        assert each.status == "ok", each.summary()
    # Read in a cell of its own: ipykernel 7 may file a cell's execute_result under a subshell's
    # request that started meanwhile (its display hook is shared), which is not what this tests.
    assert kernel.ok("n_done").value() == 40
    assert other.displays == [] and third.displays == []
    last = _text(_the_display(notebook, cell)[-1])
    assert "\ndone: 40 done, 0 failed in " in last, last


def test_ipython_in_a_terminal_keeps_the_lines() -> None:
    """Outside a kernel (IPython in a terminal), no display: the lines and the summary go to
    stderr, as in a script."""
    code = (
        "import cleanbreak\nfrom tests import tasks\n"
        "print(type(get_ipython()).__name__)\n"
        "print(len(cleanbreak.map(tasks.square, range(50), workers=2, progress=True)))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    proc = subprocess.run(
        [sys.executable, "-m", "IPython", "--quick", "--no-banner", "--colors=nocolor", "-c", code],
        capture_output=True,
        text=True,
        timeout=GUARD,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["TerminalInteractiveShell", "50"], proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("done: 50 done, 0 failed in "), proc.stderr


def test_a_notebook_run_by_nbclient_keeps_one_output_the_last_state() -> None:
    """A front end (nbclient) applies the updates in place: the saved cell has one output of
    the display, showing how the run ended."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    code = (
        "import cleanbreak\nfrom tests import tasks\n"
        "len(cleanbreak.map(tasks.one_ms, range(1000), workers=2, progress=True))"
    )
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    client = nbclient.NotebookClient(
        notebook, timeout=int(GUARD), resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    outputs = notebook.cells[0].outputs
    assert [o["output_type"] for o in outputs] == ["display_data", "execute_result"], outputs
    text = outputs[0]["data"]["text/plain"]
    assert text.startswith("one_ms: 1,000/1,000 done (100%)"), text
    assert "\ndone: 1,000 done, 0 failed in " in text, text
