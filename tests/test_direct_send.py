"""A task submitted while the manager thread waits is sent by the caller's thread itself (see
``_manager``, "Sending from the caller's thread"): what that path must keep of the manager's
promises."""

from __future__ import annotations

import json
import pickle
import textwrap
import threading
from pathlib import Path
from typing import Any, cast

import pytest

import cleanbreak
from cleanbreak._manager import LocalBackend

from . import tasks

ROOT = Path(__file__).resolve().parents[1]


def _backend(pool: cleanbreak.Pool) -> LocalBackend:
    return cast(LocalBackend, pool._backend)


def test_round_trips_are_sent_by_the_callers_thread(pool: cleanbreak.Pool) -> None:
    backend = _backend(pool)
    before = backend.sent_by_callers
    assert [pool.submit(tasks.square, i).result(tasks.GUARD) for i in range(200)] == [
        i * i for i in range(200)
    ]
    # Most of them: the manager, still finishing its loop after the last result, sends some.
    assert backend.sent_by_callers - before >= 20


class PicklesOnlyInTheManager:
    """Refuses to pickle in any thread but the manager's."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        if threading.current_thread().name != "cleanbreak-manager":
            raise pickle.PicklingError("pickled in a caller's thread")
        return (int, (self.value,))


def test_a_task_that_does_not_pickle_in_the_callers_thread_is_left_to_the_manager(
    pool: cleanbreak.Pool,
) -> None:
    # The caller's thread does not report the failure itself (a done-callback would run inside
    # submit, in the caller's thread): the manager pickles the task again, and reports what
    # happens then; here, it pickles and runs.
    backend = _backend(pool)
    tried = 0
    while backend.sent_by_callers == 0 or tried < 20:  # until the caller's thread has sent one
        only_there = cast(int, PicklesOnlyInTheManager(7))
        assert pool.submit(tasks.square, only_there).result(tasks.GUARD) == 49
        assert pool.submit(tasks.square, 3).result(tasks.GUARD) == 9
        tried += 1
        assert tried < 1000, "the caller's thread never sent a task"


def test_a_task_sent_by_the_callers_thread_keeps_its_timeout(start_method: str) -> None:
    # The manager waits in select with no deadline; a task with a timeout that a caller's
    # thread sends must wake it, or the timeout never fires.
    with cleanbreak.Pool(1, mp_context=start_method) as pool:
        backend = _backend(pool)
        assert pool.submit(tasks.square, 2).result(tasks.GUARD) == 4
        timed = pool.options(task_timeout=0.2)
        for _ in range(50):
            before = backend.sent_by_callers
            fut = timed.submit(tasks.sleep_then, tasks.GUARD, 1)
            with pytest.raises(cleanbreak.TaskTimeout):
                fut.result(timeout=tasks.GUARD / 2)
            if backend.sent_by_callers > before:
                return
        pytest.fail("the caller's thread never sent the task")


def _run_child(script: Path, template: str, **fields: object) -> tuple[Any, Any]:
    """Run ``template`` (filled in with ``fields``) as ``script``: the finished process, and the
    JSON report on its last line of output."""
    script.write_text(textwrap.dedent(template.format(root=str(ROOT), **fields)))
    done = tasks.run_script(script, timeout=tasks.GUARD * 2)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr
    return done, json.loads(lines[-1])


# The main thread is made to take a Ctrl-C while it sends a task itself, at each of the send's
# steps in turn: the signal stops the pool at once, and its Interrupted is raised only once the
# send is done (never half-way, which would lose the task).
_WINDOW = """
import json, os, signal, sys, threading
sys.path.insert(0, {root!r})
import cleanbreak
from cleanbreak import _manager
from tests import tasks

step = int(sys.argv[1]) if len(sys.argv) > 1 else {step}
calls = 0
real = {{name: getattr(_manager.LocalBackend, name) for name in ("_send", "_pack", "_flush")}}

def wrap(name):
    def wrapped(self, *args):
        global calls
        if self._from_caller and threading.current_thread() is threading.main_thread():
            calls += 1
            if calls == step:
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode
        return real[name](self, *args)
    return wrapped

for name in real:
    setattr(_manager.LocalBackend, name, wrap(name))

if __name__ == "__main__":
    out = {{"inside": False, "interrupted": False, "states": [], "sent_by_callers": 0}}
    pool = cleanbreak.Pool(1)
    futures = []

    def submit(x):
        try:
            return pool.submit(tasks.square, x)
        except cleanbreak.Interrupted:
            out["inside"] = True
            raise

    try:
        while calls < step and len(futures) < 2000:
            futures.append(submit(3))
            futures[-1].result(tasks.GUARD)
    except cleanbreak.Interrupted:
        out["interrupted"] = True
    out["sent_by_callers"] = pool._backend.sent_by_callers
    for fut in futures:
        try:
            fut.result(timeout=10)
            out["states"].append("value")
        except cleanbreak.Interrupted:
            out["states"].append("interrupted")
        except BaseException as exc:
            out["states"].append(type(exc).__name__)
    pool.shutdown()
    print(json.dumps(out))
"""


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_a_ctrl_c_while_the_main_thread_sends_is_raised_after_the_send(
    tmp_path: Path, step: int
) -> None:
    done, out = _run_child(tmp_path / "window.py", _WINDOW, step=step)
    assert out["interrupted"], out
    assert not out["inside"], "Interrupted was raised inside submit, half-way through a send"
    # Every future has an outcome: none was lost between the queue and a worker (its result
    # would time out). (A future the stop cancelled raises the Interrupted once, then
    # CancelledError.)
    assert out["states"] and set(out["states"]) <= {"value", "interrupted", "CancelledError"}
    assert "Traceback" not in done.stderr, done.stderr


# The signal that brings a put-off Interrupted back comes a moment later, from a thread of
# ours: here long after the pool call that took the Interrupted (``after="result"``; a map that
# raises its own, ``"map"``; the drop-in's ``get()``, whose task the stop cancelled meanwhile,
# or whose map's thread raised one),
# or after the pool was shut down with it still put off (``after="shutdown"``). Either way, it
# must not reach Python's own handler (a KeyboardInterrupt traceback, which a CI run saw), nor
# raise a second Interrupted: exactly one, and then the handler the program had is back.
_LATE = """
import json, os, signal, sys, threading, time
sys.path.insert(0, {root!r})
import cleanbreak
from cleanbreak import _manager, _signals
from tests import tasks

_signals._PUT_OFF_SECONDS = 0.3
after = {after!r}
fired = False
real = _manager.LocalBackend._send

def wrapped(self, *args):
    global fired
    if not fired and self._from_caller and threading.current_thread() is threading.main_thread():
        fired = True
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode
    return real(self, *args)

_manager.LocalBackend._send = wrapped

def calls(pool):
    if after == "map":  # the map's own top-up sends from the main thread
        for _ in range(200):
            list(pool.map(tasks.square, range(50), chunksize=1))
        return
    if after == "drop-in get":
        while not fired:
            pool.apply_async(tasks.square, (3,)).get(tasks.GUARD)
        return
    if after == "drop-in map_async":  # its first items are sent from the main thread
        for _ in range(200):
            pool.map_async(tasks.square, range(50), 1).get(tasks.GUARD)
        return
    futures = []
    while not fired and len(futures) < 2000:
        futures.append(pool.submit(tasks.square, 3))
        if not fired:
            futures[-1].result(tasks.GUARD)
    if after == "result":
        futures[-1].result(tasks.GUARD)
    if after == "submit again":  # the stopped pool's next call: it must not start it again
        futures.append(pool.submit(tasks.square, 4))
        print(json.dumps({{"submitted again": True}}), flush=True)


if __name__ == "__main__":
    raised = []
    if after.startswith("drop-in"):
        from cleanbreak.multiprocessing import Pool
        pool = Pool(1)
        pool.shutdown = pool.terminate
    else:
        pool = cleanbreak.Pool(1)
    try:
        calls(pool)
    except cleanbreak.Interrupted:
        raised.append("call")
    except BaseException as exc:
        raised.append(f"call: {{type(exc).__name__}}")
    try:
        pool.shutdown()
    except cleanbreak.Interrupted:
        raised.append("shutdown")
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except cleanbreak.Interrupted:
        raised.append("later")
    restored = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    print(json.dumps({{"fired": fired, "raised": raised, "restored": restored}}))
"""


@pytest.mark.parametrize(
    "after", ["result", "submit again", "shutdown", "map", "drop-in get", "drop-in map_async"]
)
def test_the_signal_that_brings_back_a_put_off_interrupted_never_reaches_another_handler(
    tmp_path: Path, after: str
) -> None:
    done, out = _run_child(tmp_path / "late.py", _LATE, after=after)
    assert "Traceback" not in done.stderr, done.stderr
    assert out["fired"], out
    # Once, from the call (or, left put off, from the wait after the shutdown): the Interrupted
    # a call raises for the stop takes the one put off, and a get() whose task the stop
    # cancelled raises it rather than CancelledError.
    # Nor may a call on the stopped pool swallow it and start the pool again ("submit again").
    expected = ["later"] if after == "shutdown" else ["call"]
    assert out["raised"] == expected, (out, done.stdout)
    assert "submitted again" not in done.stdout
    assert out["restored"], out
    assert done.returncode == 0, done.stderr
