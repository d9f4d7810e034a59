"""The Ctrl-C promise at the moments the other system tests do not choose (issue 9): in the
middle of a chunk, while the pool starts, while a worker imports the main module, after the
parent died between two items, and under ``asyncio.run``.

Each test parks the child at its moment by a handshake (an event it writes, a FIFO it waits
on), then signals it as a terminal would.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ._harness import EXIT_GUARD, METHODS, Child, assert_cleaned_up, blocked_signals, ms, record
from .conftest import StartChild

SIGNALS = ["sigint-group", "sigterm-parent"]


def _no_traceback(child: Child) -> None:
    err = child.stderr()
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("api", ["map", "imap_unordered", "cbmap"])
@pytest.mark.parametrize("how", SIGNALS)
@pytest.mark.parametrize("method", METHODS)
def test_stopping_a_chunk_keeps_the_items_it_finished(
    start_child: StartChild, method: str, how: str, api: str
) -> None:
    """One chunk of three items on one worker: items 0 and 1 finish at once, item 2 blocks.
    The chunk reports every 50 ms, so 0 and 1 are still in the worker when the signal comes.
    The worker breaks off item 2, sends 0 and 1, and dies: nothing finished is lost."""
    child = start_child(method=method, layout="qqb", workers=1, api=api, chunksize=3)
    child.wait_for(lambda c: c.indices("start") == {0, 1, 2}, "items 0-1 to finish, 2 to block")
    assert not child.of("recv"), "the chunk reported before the signal: the test proves nothing"

    sent = child.send(how)
    status = child.wait_exit()

    assert status == 130, child.output()
    assert child.kept() == {0: 0, 1: 10}
    child.drain_events()
    assert child.started_after(sent) == []
    _no_traceback(child)
    assert_cleaned_up(child, f"chunk stopped, {api}")
    record(f"chunk stopped ({how}): signal to parent exit (ms)", ms(sent, child.exited_ns or 0))


@pytest.mark.parametrize("method", METHODS)
def test_the_second_ctrl_c_of_a_drain_keeps_the_items_a_chunk_finished(
    start_child: StartChild, method: str
) -> None:
    child = start_child(
        method=method,
        layout="qqb",
        workers=1,
        api="map",
        chunksize=3,
        mode="drain",
        watch_level=True,
    )
    child.wait_for(lambda c: c.indices("start") == {0, 1, 2}, "items 0-1 to finish, 2 to block")
    child.send("sigint-group")
    child.wait_for(lambda c: c.has_level(1), "the pool to start draining")
    child.send("sigint-group")
    status = child.wait_exit()

    assert status == 130, child.output()
    assert child.kept() == {0: 0, 1: 10}
    _no_traceback(child)
    assert_cleaned_up(child, "drain, chunk stopped")


@pytest.mark.parametrize("how", SIGNALS)
@pytest.mark.parametrize("method", METHODS)
def test_a_signal_while_the_pool_starts_gives_interrupted(
    start_child: StartChild, method: str, how: str
) -> None:
    """The signal comes while ``Pool()`` is starting its workers: ``Interrupted``, not a
    ``KeyboardInterrupt`` from inside multiprocessing, and nothing is left."""
    child = start_child(method=method, layout="qq", hold_spawn=True)
    child.wait_for(lambda c: bool(c.of("spawning")), "the pool to start its first worker")

    sent = child.send(how)
    child.release(8)  # the held start goes on
    status = child.wait_exit()

    assert status == 130, child.output()
    assert child.report()["signal"] == ("SIGINT" if how == "sigint-group" else "SIGTERM")
    assert not child.of("pids"), "Pool() returned after the signal"
    child.drain_events()
    assert child.started_after(sent) == []
    _no_traceback(child)
    assert_cleaned_up(child, "signal while the pool starts")
    record(
        "signal while the pool starts: to Interrupted (ms)", ms(sent, child.report()["caught_ns"])
    )


@pytest.mark.parametrize("how", SIGNALS)
@pytest.mark.parametrize("method", METHODS)
def test_a_signal_as_the_pool_is_made_gives_interrupted(
    start_child: StartChild, method: str, how: str
) -> None:
    """The signal comes at the very start of ``Pool()``, before any worker: ``Interrupted``
    (a SIGTERM does not kill the process as its default action would)."""
    child = start_child(method=method, layout="qq", hold_construct=True)
    child.wait_for(lambda c: bool(c.of("constructing")), "Pool() to make its backend")

    child.send(how)
    child.release(1)
    status = child.wait_exit()

    assert status == 130, child.output()
    assert child.report()["signal"] == ("SIGINT" if how == "sigint-group" else "SIGTERM")
    child.drain_events()
    assert not child.of("pids") and not child.of("start")
    _no_traceback(child)
    assert_cleaned_up(child, "signal as the pool is made")


@pytest.mark.parametrize("how", SIGNALS)
@pytest.mark.parametrize("api", ["cbmap", "submit", "map"])
def test_a_signal_while_the_pool_shuts_down_keeps_every_result(
    start_child: StartChild, api: str, how: str
) -> None:
    """Every task is done and the pool is shutting down (``cleanbreak.map`` has collected its
    list, or the ``with`` block ends) when the signal comes: ``Interrupted``, with every
    result that the caller has not got otherwise."""
    child = start_child(method="forkserver", layout="qqqq", api=api, hold_shutdown=True)
    child.wait_for(lambda c: bool(c.of("shutdown")), "the pool to shut down")

    child.send(how)
    child.release(1)
    status = child.wait_exit()

    assert status == 130, child.output()
    report = child.report()
    everything = {i: 10 * i for i in range(4)}
    if api == "submit":  # the futures keep their results, and completed lists them
        assert child.completed() == everything
        assert report["futures"] == [f"result:{v}" for v in everything.values()]
    else:
        assert child.kept() == everything
    _no_traceback(child)
    assert_cleaned_up(child, f"signal while the pool shuts down, {api}")


@pytest.mark.parametrize("how", SIGNALS)
@pytest.mark.parametrize("api", ["cbmap", "submit", "map"])
def test_a_signal_once_the_workers_are_gone_keeps_every_result(
    start_child: StartChild, api: str, how: str
) -> None:
    """The manager thread has found every worker gone and said so, and the shutdown's wait is
    returning, when the signal comes: the pool is not done until its handler goes, so it is
    ``Interrupted`` with every result (not SIGTERM's default action)."""
    child = start_child(method="forkserver", layout="qqqq", api=api, hold_finished=True)
    _signal_at_the_end(child, how, api, "finished", "the workers to be gone")
    assert_cleaned_up(child, f"signal once the workers are gone, {api}")


def _signal_at_the_end(child: Child, how: str, api: str, event: str, what: str) -> None:
    """The child's four quick tasks are done and it waits at ``event``: signal it, let it go
    on, and check that it ends with ``Interrupted`` and every result, printing nothing."""
    child.wait_for(lambda c: bool(c.of(event)), what)

    child.send(how, asleep=False)
    child.release(1)
    status = child.wait_exit()

    assert status == 130, child.output()
    everything = {i: 10 * i for i in range(4)}
    if api == "submit":  # the futures keep their results, and completed lists them
        assert child.completed() == everything
    else:
        assert child.kept() == everything
    _no_traceback(child)


@pytest.mark.parametrize("how", SIGNALS)
@pytest.mark.parametrize("api", ["cbmap", "submit", "map", "asyncio"])
def test_a_signal_while_the_journal_closes_keeps_and_records_every_result(
    start_child: StartChild, api: str, how: str
) -> None:
    """Every task is done, every worker is gone, and the pool is committing and closing its
    journal when the signal comes: ``Interrupted`` once the journal is committed (not
    SIGTERM's default action halfway through the commit), with every result, each one in the
    journal."""
    child = start_child(
        method="forkserver", layout="qqqq", api=api, journal="j.sqlite", hold_journal_close=True
    )
    _signal_at_the_end(child, how, api, "journal-closing", "the pool to close its journal")
    with sqlite3.connect(child.tmp / "j.sqlite") as conn:
        (recorded,) = conn.execute("SELECT count(*) FROM outcomes WHERE ok = 1").fetchone()
    conn.close()
    assert recorded == 4
    assert_cleaned_up(child, f"signal while the journal closes, {api}")


@pytest.mark.parametrize("api", ["submit", "map"])
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_ctrl_c_while_workers_import_the_main_module_prints_nothing(
    start_child: StartChild, method: str, api: str
) -> None:
    """Both workers are still importing the main module (spawn and forkserver do that first),
    in the parent's process group, when Ctrl-C reaches the group. They print nothing: they
    started with SIGINT blocked and then ignore it, and the pool kills a worker that is not
    ready yet at once."""
    child = start_child(method=method, layout="qqqq", api=api, park_bootstrap=True)
    child.wait_for(lambda c: len(c.of("bootstrap")) == 2, "both workers to import the module")
    if method == "spawn":  # a fork server's children start with the mask a process has
        for event in child.of("bootstrap"):
            blocked = blocked_signals(event.int(0))
            assert {signal.SIGINT, signal.SIGTERM} <= blocked, f"a starting worker blocks {blocked}"

    sent, _report = child.ctrl_c()

    child.drain_events()
    assert child.of("start") == []
    _no_traceback(child)
    assert_cleaned_up(child, "Ctrl-C while workers start")
    record("Ctrl-C while workers start: to Interrupted (ms)", ms(sent, child.report()["caught_ns"]))


@pytest.mark.parametrize("chunksize", [1, 7])
@pytest.mark.parametrize("method", METHODS)
def test_no_item_starts_once_the_parent_is_dead(
    start_child: StartChild, method: str, chunksize: int
) -> None:
    """The parent is SIGKILLed while item 0 runs. The worker's watchdog is made unable to act
    (``hold_orphans``), as when a task holds the GIL: the main thread must see for itself,
    between two items, that the lifeline is closed, and start nothing more. Items 1-6 come in
    the same chunk (chunksize 7) or as chunks already sent to the worker (chunksize 1)."""
    child = start_child(
        method=method,
        layout="d" + "q" * 6,
        workers=1,
        api="map",
        chunksize=chunksize,
        hold_orphan=True,
    )
    child.wait_for(lambda c: c.indices("start") == {0}, "item 0 to start")

    child.send("sigkill-parent")
    child.wait_exit()
    child.wait_for(
        lambda c: any(e.args[1] == "other" for e in c.of("orphaned")),
        "the watchdog to see the parent die",
        after_exit=True,
    )
    child.release(1)  # item 0 returns; no other item may start
    child.wait_for(
        lambda c: (
            any(e.args[1] == "main" for e in c.of("orphaned")) or bool(c.indices("start") - {0})
        ),
        "the worker's main thread to find the parent gone (or to start the next item)",
        after_exit=True,
    )
    child.drain_events()
    assert child.indices("start") == {0}


@pytest.mark.parametrize("api", ["asyncio", "asyncio-loop-handler", "asyncio-pool-before"])
@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_under_asyncio_stops_the_running_tasks(
    start_child: StartChild, method: str, api: str
) -> None:
    """A pool made inside ``asyncio.run``, called through ``run_in_executor``. asyncio put its
    own SIGINT handler in place (the runner's, or the loop's ``add_signal_handler``, as black
    does); the pool chains it: the running tasks are stopped at once, and ``Interrupted``
    comes out of ``asyncio.run``; the coroutine sees asyncio's ``CancelledError`` where it
    awaits. The same with a pool made before ``asyncio.run``, which then installs no handler of
    its own: ours raises in the event loop's code, and asyncio cancels the main task as the
    run ends."""
    child = start_child(method=method, layout="bb" + "qq", api=api)
    child.wait_for(lambda c: c.indices("start") == {0, 1}, "both blocking tasks")

    sent, report = child.ctrl_c()

    assert report["completed"] == {}
    assert "_handler" in report["sigint_handler_inside"], report
    assert report["coroutine_saw"] == "CancelledError", report
    child.drain_events()
    assert child.started_after(sent) == []
    _no_traceback(child)
    assert_cleaned_up(child, f"Ctrl-C under {api}")
    record(f"Ctrl-C under {api}: to Interrupted (ms)", ms(sent, report["caught_ns"]))


def _run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one of the scripts that signal themselves at their moment, in a session of its own,
    from the repository's root (where a fork server finds their preload modules)."""
    script = Path(__file__).parent / "scripts" / name
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=script.parents[3],
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=EXIT_GUARD,
        check=False,
    )


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_while_asyncio_sets_a_result_prints_nothing(method: str) -> None:
    """The signal lands in the middle of one of the event loop's callbacks, one that sets a
    future's result (``scripts/asyncio_race_child.py``). asyncio's handler, which the pool
    chains, cancels the main task and that future with it: called right there, it made the
    callback fail with ``InvalidStateError`` ("Exception in callback"). The pool runs it as a
    callback of its own."""
    proc = _run_script("asyncio_race_child.py", method)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize("touched", ["touched", "first touch"])
@pytest.mark.parametrize("method", METHODS)
def test_a_ctrl_c_asyncio_took_just_before_the_pool_stops_it(
    method: str, touched: str, tmp_path: Path
) -> None:
    """Ctrl-C under ``asyncio.run`` after asyncio put its handler in place and before the pool
    put ours (``scripts/asyncio_before_pool_child.py``). asyncio's handler only asks to cancel
    the main task, which ran on into ``Pool()``: the pool started its workers and took the
    tasks, the cancel came at the first ``await``, and asyncio raised its plain
    ``KeyboardInterrupt`` (the results of a stress run's job were lost so). ``Pool()`` raises
    ``Interrupted`` and starts nothing."""
    proc = _run_script("asyncio_before_pool_child.py", str(tmp_path), method, touched)
    assert proc.stdout.splitlines() == ["Interrupted SIGINT", "[]"], proc.stdout + proc.stderr
    assert proc.returncode == 0
    assert proc.stderr == ""


# Ctrl-C as a pool checks its arguments, before its handler is in place: iterating over
# ``retry_on`` sends it to the process group, as a terminal would.
CHECKING = textwrap.dedent(
    """
    import os, signal, sys
    import cleanbreak
    import cleanbreak.multiprocessing

    class Kinds:
        def __iter__(self):
            os.killpg(os.getpgrp(), signal.SIGINT)
            return iter([ValueError])

    make = cleanbreak.Pool if sys.argv[1] == "Pool" else cleanbreak.multiprocessing.Pool
    try:
        make(1, retry_on=Kinds())
        print("made")
    except cleanbreak.Interrupted as exc:
        print("Interrupted", exc.signal.name)
    """
)


@pytest.mark.parametrize("face", ["Pool", "multiprocessing.Pool"])
def test_a_ctrl_c_while_a_pool_checks_its_arguments_is_the_pools(face: str) -> None:
    """Python's handler raises a plain ``KeyboardInterrupt`` there; ``Pool()`` raises
    ``Interrupted``, as it does a moment later, once its own handler is in place."""
    proc = subprocess.run(
        [sys.executable, "-c", CHECKING, face],
        cwd=Path(__file__).parents[2],
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=EXIT_GUARD,
        check=False,
    )
    assert (proc.stdout, proc.stderr) == ("Interrupted SIGINT\n", "")


def test_ctrl_c_as_the_fork_server_unblocks_it_prints_nothing() -> None:
    """Ctrl-C lands in the fork server right after its last preload module, cleanbreak's,
    unblocked SIGINT (``scripts/forkserver_child.py``). Restored to Python's handler there,
    it raised ``KeyboardInterrupt`` in the import machinery ("Exception ignored in ...
    _get_module_lock"), or killed the fork server. The fork server keeps ignoring it, and
    the processes it forks still start with Python's handler."""
    proc = _run_script("forkserver_child.py")
    assert proc.stderr == ""
    assert proc.returncode == 130
    assert proc.stdout == "default\n"


# Ctrl-C while a second pool is made, once its backend (manager thread, workers) exists and
# before Pool() holds it: the first pool, idle, says "raise now", and the handler raised in the
# middle of the second pool's start, which left that backend running with nobody to stop it
# (the notebook stress test, seed 633365: two workers left for the rest of the kernel's life).
SECOND_POOL = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys, time
    import cleanbreak
    from cleanbreak import _pool, _signals
    from tests.tasks import GUARD

    held = cleanbreak.Pool(1, mp_context="fork")
    done = held.submit(abs, -7)
    done.result()
    real = _pool.LocalBackend

    def make_backend(*args):
        backend = real(*args)
        (starting,) = [p for p in _signals._listeners if p._starting]
        os.killpg(os.getpgrp(), signal.SIGINT)
        deadline = time.monotonic() + GUARD
        while not starting._pending_level:  # the handler has seen it (a deadlock guard only)
            assert time.monotonic() < deadline, "no signal"
            time.sleep(0.001)
        return backend

    _pool.LocalBackend = make_backend
    try:
        cleanbreak.Pool(2, mp_context="fork")
        print("made")
    except cleanbreak.Interrupted as exc:
        print("Interrupted", exc.signal.name, exc.completed)
    deadline = time.monotonic() + GUARD
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.01)
    print("left", len(multiprocessing.active_children()))
    print("held", done.result())
    """
)


def test_a_ctrl_c_while_a_second_pool_starts_leaves_nothing_running() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_POOL],
        cwd=Path(__file__).parents[2],
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=EXIT_GUARD + 30,
        check=False,
    )
    assert proc.stdout.splitlines() == ["Interrupted SIGINT {}", "left 0", "held 7"], (
        proc.stdout + proc.stderr
    )
    assert proc.stderr == ""
