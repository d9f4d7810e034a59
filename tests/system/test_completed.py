"""``Interrupted.completed`` holds every result that finished, whichever API produced it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ._harness import EXIT_GUARD, METHODS, TIMEOUT, assert_cleaned_up
from .conftest import StartChild


@pytest.mark.parametrize("api", ["map", "submit"])
@pytest.mark.parametrize("method", METHODS)
def test_results_behind_a_blocked_one_are_kept(
    start_child: StartChild, method: str, api: str
) -> None:
    """Task 0 blocks for ever, tasks 1-3 finish. An ordered ``map`` never yielded them (task 0
    comes first), yet ``completed`` has them; with ``submit`` the keys are submission indices
    and the futures keep their results.

    Four workers, so that each task has a worker to itself: a worker takes a second task only
    once every worker has one, and task 0 never lets go of its worker.
    """
    child = start_child(method=method, layout="bqqq", workers=4, api=api)
    child.wait_for(
        lambda c: 0 in c.indices("start") and c.indices("recv") == {1, 2, 3},
        "task 0 to block and tasks 1-3 to reach the parent",
    )

    child.send("sigint-group")
    status = child.wait_exit()

    assert status == 130, child.output()
    report = child.report()
    assert child.completed() == {1: 10, 2: 20, 3: 30}
    if api == "map":
        assert report["total"] == 4
    else:
        assert report["futures"][1:] == ["result:10", "result:20", "result:30"]
        assert not report["futures"][0].startswith("result")
    assert_cleaned_up(child, f"completed, {api}")


@pytest.mark.parametrize("method", METHODS)
def test_module_map_keeps_every_finished_result(start_child: StartChild, method: str) -> None:
    """``cleanbreak.map``: results it had yielded to itself and results still buffered are
    all in ``completed``. Four quick tasks, then two blocking tasks per worker, then more."""
    child = start_child(method=method, layout="qqqq" + "bbbb" + "qq", api="cbmap")
    child.wait_for(
        lambda c: c.indices("recv") >= {0, 1, 2, 3} and len(c.indices("start") & {4, 5, 6, 7}) == 2,
        "the quick results and both workers to block",
    )

    sent, report = child.ctrl_c()
    completed = child.completed()
    assert report["total"] == 10
    child.drain_events()
    # The quick results: those at the end too, where a worker that came free ran them while
    # the blocking tasks before them waited behind another (tasks start in about the order
    # given). Every result the parent had received is in completed.
    assert {0, 1, 2, 3} <= completed.keys() <= {0, 1, 2, 3, 8, 9}
    assert completed == {i: 10 * i for i in child.indices("recv")}
    assert child.started_after(sent) == []
    assert_cleaned_up(child, "completed, cleanbreak.map")


@pytest.mark.parametrize("api", ["map", "cbmap"])
@pytest.mark.parametrize("method", METHODS)
def test_result_that_arrives_with_the_signal_is_kept(
    start_child: StartChild, method: str, api: str
) -> None:
    """The Ctrl-C lands at the very moment a result reaches the parent: task 1's result, as it
    is unpickled there, sends SIGINT (see ``received_with_sigint``). Task 0 blocks for ever,
    so the map's caller is waiting, and it is this result that wakes it. The result had
    arrived before the signal, so it must be in ``completed``.

    (A terminal's Ctrl-C a few microseconds after a result arrives hits the same moment by
    chance. ``test_results_behind_a_blocked_one_are_kept[map]`` did, about one run in two,
    until it learnt to signal only a parent that is asleep.)
    """
    child = start_child(method=method, layout="bk", api=api)
    status = child.wait_exit()

    assert status == 130, child.output()
    assert child.report()["signal"] == "SIGINT"
    assert child.completed() == {1: 10}
    assert_cleaned_up(child, f"completed, result arriving with the signal, {api}")


@pytest.mark.parametrize("method", METHODS)
def test_result_that_arrives_with_the_signal_is_kept_under_asyncio(
    start_child: StartChild, method: str
) -> None:
    """As above, through ``run_in_executor`` inside ``asyncio.run``: asyncio cancels the
    main task, and with it the asyncio future of task 1, before the pool's future can pass
    its result on. The pool's future then has no other holder than the pool; the result
    must still be in ``completed``."""
    child = start_child(method=method, layout="bk", api="asyncio")
    status = child.wait_exit()

    assert status == 130, child.output()
    assert child.report()["signal"] == "SIGINT"
    assert child.completed() == {1: 10}
    assert_cleaned_up(child, "completed, result arriving with the signal, asyncio")


@pytest.mark.parametrize("api", ["map", "imap_unordered"])
@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_while_the_input_is_read_keeps_every_guarantee(
    start_child: StartChild, method: str, api: str
) -> None:
    """The caller's thread is inside the user's generator, which waits for its next item,
    when Ctrl-C comes. Tasks 0 and 1 finished, task 2 blocks for ever. The signal reaches the
    pool from the generator's frame: the pool stops at once, task 2 is stopped, no task starts,
    and every finished result is either yielded already or in ``completed``."""
    child = start_child(method=method, layout="qqb", api=api, input="lazy")
    child.wait_for(
        lambda c: c.indices("recv") == {0, 1} and 2 in c.indices("start") and bool(c.of("reading")),
        "tasks 0-1 to finish, task 2 to block and the generator to wait for its next item",
    )

    sent, _report = child.ctrl_c()
    assert child.kept() == {0: 0, 1: 10}
    child.drain_events()
    assert child.started_after(sent) == []
    assert_cleaned_up(child, f"Ctrl-C while the input is read, {api}")


def test_an_idle_pool_does_not_take_the_interrupt_of_a_working_one(tmp_path: Path) -> None:
    """A notebook holds two pools: an idle one, whose done future is still referenced, and one
    whose ``map`` the cell iterates. The Ctrl-C lands in the loop body: ``completed`` holds
    the working pool's results (the first live pool took the gathering, and gave the idle
    pool's future in their place: found by the notebook stress test, seed 185303)."""
    report = _two_pools(tmp_path)
    completed = {int(k): v for k, v in report["completed"].items()}
    assert 1_000_000 not in completed.values(), completed
    assert all(v == k * k for k, v in completed.items()), completed


def test_an_idle_pool_that_the_interrupt_stops_keeps_nothing_in_completed(tmp_path: Path) -> None:
    """Only the idle pool lives (the next cell's pool is not made yet), and the Ctrl-C lands in
    the caller's own code: nothing was running, so ``completed`` is empty, and the idle pool's
    done future keeps its result. (Found by the notebook stress test, seed 633365: the idle
    pool's future, under its own numbering, was in ``completed``; a caller that merges it into
    a map's results would have overwritten one.)"""
    report = _two_pools(tmp_path, "alone")
    assert report["completed"] == {}, report
    assert report["earlier"] == 1_000_000


def _two_pools(tmp_path: Path, *mode: str) -> dict[str, Any]:
    """Run ``two_pools_child.py``, Ctrl-C to its group once its body runs: its report."""
    script = Path(__file__).parent / "scripts" / "two_pools_child.py"
    with subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), *mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        try:
            deadline = time.monotonic() + TIMEOUT
            while not (tmp_path / "body").exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the loop body never ran"
                time.sleep(0.005)
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=EXIT_GUARD)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    # (Before the fix, the working pool's own Interrupted came again from its with block.)
    assert proc.returncode == 0 and "Traceback" not in err.decode(), err.decode()
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    assert report.get("exc") == "Interrupted", (report, err.decode())
    return report
