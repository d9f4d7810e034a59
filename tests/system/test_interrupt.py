"""Ctrl-C and SIGTERM in terminate mode (the default), against a real parent process.

The pool runs 2 workers over ``LAYOUT``: three quick tasks, then four that block for ever
(each after starting a ``sleep`` grandchild), then two more quick ones. Every worker ends up
blocked in one of the blocking tasks, with the rest queued behind them, so the test knows the
exact state when it signals: results 0-2 are in the parent (their ``recv`` handshake), two
tasks are running, and nothing else may start.
"""

from __future__ import annotations

import os
import signal

import pytest

from ._harness import METHODS, Child, assert_cleaned_up, ignored_signals, ms, record
from .conftest import StartChild

LAYOUT = "qqq" + "gggg" + "qq"
QUICK = {0: 0, 1: 10, 2: 20}
BLOCKING = {3, 4, 5, 6}
SIGNAL_NAME = {
    "sigint-group": "SIGINT",
    "sigint-parent": "SIGINT",
    "sigterm-parent": "SIGTERM",
}


def _settled(child: Child) -> bool:
    """Every quick result is in the parent, and both workers sit in a blocking task that has
    started its grandchild."""
    return (
        child.indices("recv") >= set(QUICK)
        and len(child.indices("start") & BLOCKING) == 2
        and len(child.indices("grandchild")) == 2
    )


@pytest.mark.parametrize("how", ["sigint-group", "sigint-parent", "sigterm-parent"])
@pytest.mark.parametrize("method", METHODS)
def test_signal_stops_everything_and_keeps_results(
    start_child: StartChild, method: str, how: str
) -> None:
    child = start_child(method=method, layout=LAYOUT)
    child.wait_for(_settled, "the quick results and both blocking tasks")
    for pid in child.pids_of("worker"):
        assert os.getpgid(pid) == pid, "a worker must lead a process group of its own"
        assert signal.SIGINT in ignored_signals(pid), "a worker must ignore SIGINT"

    sent = child.send(how)
    status = child.wait_exit()
    assert child.exited_ns is not None

    assert status == 130, child.output()
    report = child.report()
    assert report["signal"] == SIGNAL_NAME[how]
    assert child.completed() == QUICK
    futures = report["futures"]
    assert futures[:3] == ["result:0", "result:10", "result:20"]
    assert not any(f.startswith("result") for f in futures[3:]), futures
    assert not any(f == "pending" for f in futures), futures
    child.drain_events()
    late = child.started_after(sent)
    record(f"terminate {how}: tasks started after the signal", len(late))
    assert late == [], f"tasks started after the signal: {late}"
    assert child.indices("start") & {7, 8} == set()
    assert_cleaned_up(child, f"terminate {how}")

    record(f"terminate {how}: signal to Interrupted (ms)", ms(sent, report["caught_ns"]))
    record(f"terminate {how}: signal to parent exit (ms)", ms(sent, child.exited_ns))


@pytest.mark.parametrize("method", METHODS)
def test_task_that_survives_sigterm_does_not_let_the_next_one_start(
    start_child: StartChild, method: str
) -> None:
    """A running task that catches SIGTERM and returns: its worker must not go on to the task
    queued behind it (the shared stop flag, read between tasks). Through ``map``, which sends
    each worker its next task ahead of time, so that the next one is already in the worker."""
    child = start_child(method=method, layout="tt" + "qqqq", api="map")
    child.wait_for(lambda c: c.indices("start") == {0, 1}, "both SIGTERM-catching tasks")

    sent = child.send("sigint-group")
    status = child.wait_exit()

    assert status == 130, child.output()
    child.drain_events()
    assert child.indices("term") == {0, 1}, [
        (e.kind, e.args, ms(sent, e.received_ns)) for e in child.events
    ]
    late = child.started_after(sent)
    assert late == [], f"tasks started after the signal: {late}"
    # Results that finished after the signal may be kept, but nothing else.
    assert set(child.completed()) <= {0, 1}
    assert_cleaned_up(child, "terminate, SIGTERM-catching tasks")


@pytest.mark.parametrize("method", METHODS)
def test_sigterm_while_pool_idle_and_main_thread_in_user_code(
    start_child: StartChild, method: str
) -> None:
    """The pool has nothing to do and the main thread spins in pure Python inside the ``with``
    block: SIGTERM still raises Interrupted there, with the finished results."""
    child = start_child(method=method, layout="qq", wait="busy")
    child.wait_for(lambda c: bool(c.of("busy")), "the main thread to be busy in user code")

    sent = child.send("sigterm-parent", asleep=False)  # it never sleeps: it spins
    status = child.wait_exit()
    assert child.exited_ns is not None

    assert status == 130, child.output()
    report = child.report()
    assert report["signal"] == "SIGTERM"
    assert child.completed() == {0: 0, 1: 10}
    assert report["futures"] == ["result:0", "result:10"]
    assert_cleaned_up(child, "idle pool, SIGTERM")
    record(
        "idle pool, busy main thread: SIGTERM to Interrupted (ms)", ms(sent, report["caught_ns"])
    )
    record("idle pool, busy main thread: SIGTERM to parent exit (ms)", ms(sent, child.exited_ns))
