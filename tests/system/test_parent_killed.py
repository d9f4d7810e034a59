"""The parent is killed with SIGKILL: its workers notice and exit by themselves, and take the
processes their tasks started with them. No process of the run is left."""

from __future__ import annotations

import pytest

from ._harness import METHODS, ORPHAN_GUARD, ms, record
from .conftest import StartChild


@pytest.mark.parametrize("method", METHODS)
def test_workers_and_their_children_exit_when_the_parent_is_killed(
    start_child: StartChild, method: str
) -> None:
    child = start_child(method=method, layout="gg" + "qq")
    child.wait_for(
        lambda c: c.indices("grandchild") == {0, 1}, "both tasks to start their grandchild"
    )
    watched = list(child.watched.values())
    assert {w.what for w in watched} == {"worker", "grandchild"}

    killed = child.send("sigkill-parent")
    child.wait_exit()
    left = child.wait_gone(watched, ORPHAN_GUARD)

    assert left == [], f"still running {ORPHAN_GUARD} s after the parent was killed: {left}"
    for what in ("worker", "grandchild"):
        exits = [w.exited_ns for w in watched if w.what == what]
        assert all(t is not None for t in exits)
        slowest = max(t for t in exits if t is not None)
        record(f"parent SIGKILLed: last {what} exited after (ms)", ms(killed, slowest))
    leftovers, took = child.wait_session_empty(ORPHAN_GUARD)
    assert leftovers == [], f"processes left behind: {leftovers}"
    record(
        "parent SIGKILLed: session empty after the kill (ms)",
        ms(killed, child.exited_ns or 0) + took * 1000,
    )
