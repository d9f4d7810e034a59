"""``on_interrupt="drain"``: the first Ctrl-C lets running tasks finish and starts nothing
new, the second stops them, the third kills them.

The child reports each change of the pool's stop level (``--watch-level``), so the test knows
that the pool has acted on a signal before it does the next thing.
"""

from __future__ import annotations

import pytest

from ._harness import METHODS, assert_cleaned_up, ms, record
from .conftest import StartChild

TAIL = "qqqq"  # queued behind the running tasks (two of them already in the workers' pipes)


@pytest.mark.parametrize("how", ["sigint-group", "sigterm-parent"])
@pytest.mark.parametrize(("api", "wait"), [("submit", "results"), ("submit", "exit"), ("map", "")])
@pytest.mark.parametrize("method", METHODS)
def test_first_signal_lets_running_tasks_finish(
    start_child: StartChild, method: str, api: str, wait: str, how: str
) -> None:
    """Wherever the main thread waits (a future, the ``with`` block's exit, a ``map``), the
    running tasks finish and are kept, nothing queued starts, and Interrupted is raised."""
    child = start_child(
        method=method,
        layout="dd" + TAIL,
        mode="drain",
        api=api,
        wait=wait or "results",
        watch_level=True,
    )
    child.wait_for(lambda c: c.indices("start") == {0, 1}, "both tasks to start")

    sent = child.send(how)
    child.wait_for(lambda c: c.has_level(1), "the pool to start draining")
    assert len(child.still_running("worker")) == 2, "drain must not stop running tasks"
    released = child.release(2)
    status = child.wait_exit()
    assert child.exited_ns is not None

    assert status == 130, child.output()
    report = child.report()
    assert report["signal"] == ("SIGINT" if how == "sigint-group" else "SIGTERM")
    assert child.kept() == {0: 0, 1: 10}
    if api == "submit":
        assert report["futures"][:2] == ["result:0", "result:10"]
        assert not any(f.startswith("result") for f in report["futures"][2:])
    child.drain_events()
    late = child.started_after(sent)
    record(f"drain {how}: tasks started after the first signal", len(late))
    assert late == [], f"tasks started after the signal: {late}"
    assert_cleaned_up(child, f"drain {how}")
    record(f"drain {how}: tasks released to parent exit (ms)", ms(released, child.exited_ns))


@pytest.mark.parametrize("how", ["sigint-group", "sigint-parent", "sigterm-parent"])
@pytest.mark.parametrize("method", METHODS)
def test_second_signal_stops_the_drain(start_child: StartChild, method: str, how: str) -> None:
    """Tasks that would never finish: the second signal stops them at once."""
    child = start_child(method=method, layout="bb" + TAIL, mode="drain", watch_level=True)
    child.wait_for(lambda c: c.indices("start") == {0, 1}, "both tasks to start")

    first = child.send(how)
    child.wait_for(lambda c: c.has_level(1), "the pool to start draining")
    assert len(child.still_running("worker")) == 2, "drain must not stop running tasks"
    second = child.send(how)
    status = child.wait_exit()
    assert child.exited_ns is not None

    assert status == 130, child.output()
    report = child.report()
    assert report["signal"] == ("SIGTERM" if how == "sigterm-parent" else "SIGINT")
    assert child.completed() == {}
    assert not any(f.startswith("result") for f in report["futures"])
    child.drain_events()
    assert child.started_after(first) == []
    assert_cleaned_up(child, f"drain {how}, second signal")
    record(f"drain {how}: second signal to Interrupted (ms)", ms(second, report["caught_ns"]))
    record(f"drain {how}: second signal to parent exit (ms)", ms(second, child.exited_ns))


@pytest.mark.parametrize("method", METHODS)
def test_third_signal_kills_tasks_that_ignore_sigterm(start_child: StartChild, method: str) -> None:
    """Tasks that survive SIGTERM: still running after the second Ctrl-C (they report the
    SIGTERM it brought), gone after the third. The kill-after-grace is pushed out of the way
    (``stop_grace``) so that only the third Ctrl-C can kill them."""
    child = start_child(
        method=method, layout="ss" + TAIL, mode="drain", watch_level=True, stop_grace=1000
    )
    child.wait_for(lambda c: c.indices("start") == {0, 1}, "both tasks to start")

    first = child.send("sigint-group")
    child.wait_for(lambda c: c.has_level(1), "the pool to start draining")
    child.send("sigint-group")
    child.wait_for(lambda c: c.indices("term") == {0, 1}, "both tasks to get SIGTERM")
    assert len(child.still_running("worker")) == 2, "the tasks ignore SIGTERM: still running"
    assert child.running(), "the parent must wait while its workers live"
    third = child.send("sigint-group")
    status = child.wait_exit()
    assert child.exited_ns is not None

    assert status == 130, child.output()
    report = child.report()
    assert child.completed() == {}
    child.drain_events()
    assert child.started_after(first) == []
    assert_cleaned_up(child, "drain, third Ctrl-C")
    record("drain: third Ctrl-C to Interrupted (ms)", ms(third, report["caught_ns"]))
    record("drain: third Ctrl-C to parent exit (ms)", ms(third, child.exited_ns))
