"""Ctrl-C that lands in the caller's own code, not in a pool call: the body of the loop over a
map, or a callback that the garbage collector runs (a weakref's, a ``__del__``).

Without a ``with`` block, no pool call is there to gather the results when the handler raises
``Interrupted`` in such code, so the exception gathers them when its ``.completed`` is read,
once every worker is gone; and a drain that raised nothing while the loop body ran ends the map
with ``Interrupted`` (not with the rest of the map, nor a ``RuntimeError`` for the input it
could no longer send). An ``Interrupted`` raised in a callback would be printed as "Exception
ignored" and dropped: it is raised again once the callback has returned.

The child signals itself at a known point of its own code (``os.kill`` to itself runs the
handler at the next bytecode), after writing down which results had reached it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.tasks import GUARD

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time, weakref
    import cleanbreak

    api = mode = holder = where = ""  # set by main(): a worker imports this script too
    arrived = []  # the results that reached this process, as they were unpickled


    def received(i):
        arrived.append(i)
        return i


    class Receipt:
        def __init__(self, i):
            self.i = i

        def __reduce__(self):
            return (received, (self.i,))


    def task(i):
        time.sleep(0.005)
        return Receipt(i)


    class Trigger:
        pass


    def ctrl_c(_ref=None):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode
        for _ in range(1000):
            pass


    def job(pool):
        global trigger
        if api == "map_after_submit":
            # Futures from before, done and still held (a notebook keeps them in a
            # variable): they are not what the map's Interrupted keeps.
            earlier.extend(pool.submit(task, 1000 + i) for i in range(3))
            for future in earlier:
                future.result()
            del arrived[:]
        if api in ("map", "map_after_submit"):
            it = pool.map(task, range(200), chunksize=1)
        elif api == "imap_unordered":
            it = pool.imap_unordered(task, iter(range(200)), chunksize=1)
        else:
            it = (future.result() for future in [pool.submit(task, i) for i in range(200)])
        for value in it:
            got.append(value)
            if len(got) == 5:
                report["arrived"] = list(arrived)
                if where == "body":
                    ctrl_c()
                else:
                    trigger = None  # the weakref's callback runs now, and signals
            time.sleep(0.01)


    def main():
        global trigger, api, mode, holder, where
        api, mode, holder, where = sys.argv[1:5]
        trigger = Trigger()
        ref = weakref.ref(trigger, ctrl_c)
        try:
            if holder == "with":
                with cleanbreak.Pool(2, on_interrupt=mode) as pool:
                    job(pool)
            else:
                pool = cleanbreak.Pool(2, on_interrupt=mode)
                try:
                    job(pool)
                except BaseException as exc:
                    report["raised"] = type(exc).__name__  # by the pool call, not shutdown()
                    raise
                finally:
                    pool.shutdown()
            report["ended"] = "normally"
        except cleanbreak.Interrupted as exc:
            report["ended"] = "Interrupted"
            report["completed"] = sorted(exc.completed.items())
        except BaseException as exc:
            report["ended"] = type(exc).__name__ + ": " + str(exc)
        report["got"] = sorted(got)
        del ref


    got = []
    earlier = []
    report = {}
    trigger = None
    if __name__ == "__main__":
        main()
        print(json.dumps(report), flush=True)
    """
)


# A Ctrl-C that a callback the garbage collector runs sends (``trigger = None`` drops the last
# reference to a Trigger whose weakref calls ``ctrl_c``): the handler puts its Interrupted off.
TRIGGER = """
def ctrl_c(_ref=None):
    os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode
    for _ in range(1000):
        pass


class Trigger:
    pass
"""


def _with_trigger(script: str) -> str:
    return textwrap.dedent(script).replace("{trigger}", TRIGGER)


def _run(script: Path, text: str, *args: str) -> dict[str, Any]:
    """Run ``text`` as ``script`` with ``args``: its JSON report, once its stderr was empty."""
    script.write_text(text)
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=GUARD,
    )
    assert proc.stderr == "", proc.stderr  # nothing printed: no "Exception ignored"
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


# Every API and both modes with a pool held without a with block, where no pool call gathers
# the results; the with block, which gathers them itself, in terminate mode (the mode whose
# handler raises in the caller's code).
CASES = [
    *[
        (api, mode, "held", where)
        for api in ("map", "imap_unordered", "submit")
        for mode in ("terminate", "drain")
        for where in ("body", "callback")
    ],
    *[(api, "terminate", "with", "callback") for api in ("map", "imap_unordered", "submit")],
    *[("map_after_submit", "terminate", holder, "body") for holder in ("held", "with")],
]


@pytest.mark.parametrize(("api", "mode", "holder", "where"), CASES)
def test_ctrl_c_in_the_callers_own_code_keeps_what_arrived(
    api: str, mode: str, holder: str, where: str, tmp_path: Path
) -> None:
    # A script (a file), so that its top-level ``received`` goes by reference and runs here,
    # in this process's own __main__, as each result arrives.
    report = _run(tmp_path / "child.py", CHILD, api, mode, holder, where)
    assert report["ended"] == "Interrupted", report
    assert report.get("raised", "Interrupted") == "Interrupted", report
    # Task i's result is i, and its index is i too (its input position, or the order of its
    # submission).
    completed = dict(report["completed"])
    assert all(k == v for k, v in completed.items()), report
    kept = set(report["got"]) | set(completed)
    assert set(report["arrived"]) <= kept, report


# The Interrupted put off (the signal came in a callback) and the stopped pool called again
# before it comes back: right after the callback, or with the callback run inside the call,
# after the pool's restart check (``_rearm``) and before its refusal (``_check_open``). The
# call raises it. (Before, the restart check waited for the stop, swallowed the signal that
# came back meanwhile and started the pool again, or the call refused with a RuntimeError.)
AGAIN = _with_trigger(
    """
    import json, os, signal, sys, weakref
    import cleanbreak
    from cleanbreak import _pool, _signals

    _signals._PUT_OFF_SECONDS = 0.5  # the signal comes back well after the next call


    {trigger}


    def main():
        where = sys.argv[1]
        report = {"raised": [], "submitted": False}
        pool = cleanbreak.Pool(2)
        backend = pool._backend
        assert pool.submit(abs, -1).result() == 1  # an idle pool: the signal raises at once
        trigger = Trigger()
        ref = weakref.ref(trigger, ctrl_c)
        if where == "inside":
            real = _pool.Pool._rearm

            def rearm(self):
                nonlocal trigger
                real(self)
                trigger = None  # the weakref's callback runs now, and signals

            _pool.Pool._rearm = rearm
        try:
            if where == "before":
                trigger = None
            pool.submit(abs, -2)
            report["submitted"] = True
        except BaseException as exc:
            report["raised"].append(type(exc).__name__ + ": " + str(exc))
        try:  # the signal that was to bring the Interrupted back raises nothing more
            _signals.wait_event(_signals.threading.Event(), 1.0)
        except BaseException as exc:
            report["raised"].append("later: " + type(exc).__name__)
        report["restarted"] = pool._backend is not backend
        pool.shutdown()
        del ref
        print(json.dumps(report), flush=True)


    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("where", ["before", "inside"])
def test_a_call_on_the_stopped_pool_raises_the_interrupted_put_off(
    where: str, tmp_path: Path
) -> None:
    report = _run(tmp_path / "again.py", AGAIN, where)
    assert report["raised"] == ["Interrupted: interrupted by SIGINT"], report
    assert not report["submitted"], report
    assert not report["restarted"], report


# The same through the drop-in: its apply_async raises the Interrupted put off, and leaves no
# result behind that close(); join() would wait for for ever.
AGAIN_DROP_IN = _with_trigger(
    """
    import json, os, signal, sys, threading, weakref
    from cleanbreak import _pool, _signals
    from cleanbreak.multiprocessing import Pool

    _signals._PUT_OFF_SECONDS = 0.5  # the signal comes back well after the next call


    {trigger}


    if __name__ == "__main__":
        report = {"raised": []}
        pool = Pool(2)
        assert pool.apply(abs, (-1,)) == 1
        trigger = Trigger()
        ref = weakref.ref(trigger, ctrl_c)
        if sys.argv[1] == "between":  # the Ctrl-C comes once the task is submitted, before
            real = _pool._TaskFuture.add_done_callback  # apply_async hears of its end

            def add_done_callback(self, fn):
                _pool._TaskFuture.add_done_callback = real
                ctrl_c()
                real(self, fn)

            _pool._TaskFuture.add_done_callback = add_done_callback
        try:
            if sys.argv[1] == "put off":
                trigger = None  # the weakref's callback runs now, and signals
            pool.apply_async(abs, (-2,))
        except BaseException as exc:
            report["raised"].append(type(exc).__name__)
        pool.close()
        joined = threading.Event()
        threading.Thread(target=lambda: (pool.join(), joined.set()), daemon=True).start()
        report["joined"] = joined.wait(10)  # a deadlock guard: join() returns at once
        print(json.dumps(report), flush=True)
        os._exit(0)
    """
)


@pytest.mark.parametrize("when", ["put off", "between"])
def test_the_drop_ins_apply_async_raises_the_interrupted_put_off_and_join_returns(
    tmp_path: Path, when: str
) -> None:
    report = _run(tmp_path / "again.py", AGAIN_DROP_IN, when)
    assert report == {"raised": ["Interrupted"], "joined": True}, report


# A Ctrl-C while the next call waits for the last stop to end (the stop of an Interrupted raised
# in the caller's own code, whose results nobody read): the wait takes it in its stride, but it
# is that call's, which raises Interrupted and starts nothing (before, the pool started again
# and ran the task). The worker ignores SIGTERM, so that the stop lasts its grace period.
DURING_THE_SETTLE = textwrap.dedent(
    """
    import json, os, signal
    import cleanbreak

    read_end, write_end = os.pipe()  # the workers (forked) write to it


    def stubborn():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # killed after the grace period
        os.write(write_end, b"s")
        signal.pause()


    def ran():
        os.write(write_end, b"r")


    if __name__ == "__main__":
        report = {"raised": []}
        pool = cleanbreak.Pool(1, mp_context="fork")
        pool.submit(stubborn)
        assert os.read(read_end, 1) == b"s"  # it runs
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode
            for _ in range(10**6):
                pass  # the caller's own code
        except cleanbreak.Interrupted:
            report["raised"].append("first")
        backend = pool._backend
        real_wait = backend.wait

        def wait(*args):  # the next call's wait for the stop: a Ctrl-C comes in it
            backend.wait = real_wait
            os.kill(os.getpid(), signal.SIGINT)
            return real_wait(*args)

        backend.wait = wait
        try:
            pool.submit(ran)
            report["submitted"] = True
        except cleanbreak.Interrupted:
            report["raised"].append("second")
        pool.shutdown()
        os.close(write_end)
        report["ran"] = os.read(read_end, 10).decode()
        print(json.dumps(report), flush=True)
    """
)


def test_a_ctrl_c_while_the_next_call_waits_for_the_stop_is_that_calls(tmp_path: Path) -> None:
    report = _run(tmp_path / "settle.py", DURING_THE_SETTLE)
    assert report == {"raised": ["first", "second"], "ran": ""}, report


# A Ctrl-C in the moment between the last stop's end, which gave the signal handlers back, and
# the restart of a stopped pool in its next call, which puts cleanbreak's in place again: the
# call raises Interrupted (not Python's own KeyboardInterrupt), and the pool stays usable: the
# call after it starts it again. (Before, the pool was left with no signal on a finished
# backend, and every later call failed.)
BEFORE_THE_RESTART = textwrap.dedent(
    """
    import json, os, signal
    import cleanbreak
    from cleanbreak import _pool

    if __name__ == "__main__":
        report = {"raised": []}
        pool = cleanbreak.Pool(2)
        assert pool.submit(abs, -1).result() == 1
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode
            for _ in range(10**6):
                pass  # the caller's own code
        except cleanbreak.Interrupted:
            report["raised"].append("first")
        real = _pool.Pool._start

        def start(self, journal):  # the restart: a Ctrl-C comes just before it
            _pool.Pool._start = real
            os.kill(os.getpid(), signal.SIGINT)
            real(self, journal)

        _pool.Pool._start = start
        try:
            pool.submit(abs, -2)
        except BaseException as exc:
            report["raised"].append(type(exc).__name__)
        report["next"] = pool.submit(abs, -3).result()
        pool.shutdown()
        print(json.dumps(report), flush=True)
    """
)


def test_a_ctrl_c_just_before_a_stopped_pool_starts_again_leaves_it_usable(
    tmp_path: Path,
) -> None:
    report = _run(tmp_path / "restart.py", BEFORE_THE_RESTART)
    assert report == {"raised": ["first", "Interrupted"], "next": 3}, report


# The signal that brings an Interrupted put off back comes while the first touch of
# ``cleanbreak.map`` (or ``Pool``) imports the pool's modules, where signals are only recorded
# (``_signals.collecting``, widened here): the touch raises that Interrupted, and nothing of it is
# left behind (before, the next pool call raised it a second time, and the next real Ctrl-C was
# then taken for its signal and ignored).
PUT_OFF_THEN_FIRST_TOUCH = _with_trigger(
    """
    import json, os, signal, time, weakref
    import cleanbreak
    from cleanbreak import _signals

    _signals._PUT_OFF_SECONDS = 0.1


    {trigger}


    if __name__ == "__main__":
        report = {"raised": []}
        pool = cleanbreak.Pool(2)
        assert pool.submit(abs, -1).result() == 1
        trigger = Trigger()
        ref = weakref.ref(trigger, ctrl_c)
        trigger = None  # the weakref's callback runs now, and signals
        put_off = _signals._put_off
        with _signals.collecting() as caught:  # as the first touch does, for 0.3 s
            time.sleep(0.3)
        report["caught"] = [s.name for s in caught]
        report["the one put off"] = _signals.early_interrupt(caught[0]) is put_off
        report["next"] = pool.submit(abs, -2).result()  # starts the stopped pool again
        future = pool.submit(time.sleep, 30)
        try:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, while the task runs
            future.result()
        except cleanbreak.Interrupted:
            report["raised"].append("Interrupted")
        pool.shutdown()
        print(json.dumps(report), flush=True)
    """
)


def test_an_interrupted_put_off_that_comes_back_in_a_first_touch_is_raised_once(
    tmp_path: Path,
) -> None:
    report = _run(tmp_path / "touch.py", PUT_OFF_THEN_FIRST_TOUCH)
    assert report == {
        "raised": ["Interrupted"],
        "caught": ["SIGINT"],
        "the one put off": True,
        "next": 2,
    }, report
