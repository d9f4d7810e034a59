"""A Ctrl-C whose handler would run as ``threading.Condition.__enter__`` returns, its lock taken,
is put off until the ``with`` block is entered; one whose handler would run as
``Condition.__exit__`` begins, before it releases the lock, is put off too
(``_signals._in_condition_step``).

``Condition.__enter__`` is Python code around a C acquire: an exception raised as the acquire
returns leaves ``__enter__`` with the lock held and the ``with`` block never entered, so nothing
releases it. A stress run of the drop-in hung so: the main thread's ``add_done_callback`` (under
``apply_async``) left a future's condition taken, and the manager waited for it for ever as it
set the result. The child makes a condition over a stand-in lock whose ``__enter__`` is a C call
that signals the process (the handler runs in ``Condition.__enter__``'s frame, as the real
acquire returns), and says whether it holds the lock then. Held: the ``Interrupted`` comes in the
``with`` block and ``__exit__`` runs. Not held (a signal while the acquire still waits): it is
raised at once, out of ``__enter__``, as before.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from pathlib import Path
from types import FrameType

import pytest

from cleanbreak import _signals
from tests.tasks import GUARD, run_script

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import functools, json, os, signal, sys, threading, time
    import cleanbreak

    HELD = {held}


    class SignalsOnEnter:
        # A C call: the handler runs in the caller's frame, Condition.__enter__, as it returns.
        __enter__ = staticmethod(functools.partial(os.kill, os.getpid(), signal.SIGINT))

        def __init__(self):
            self.exited = False

        def acquire(self, *args):
            return True

        def release(self):
            pass

        def _is_owned(self):
            return HELD

        def __exit__(self, *exc):
            self.exited = True


    def main():
        report = {{"where": "before"}}
        lock = SignalsOnEnter()
        condition = threading.Condition(lock)
        try:
            with cleanbreak.Pool(1) as pool:
                pool.submit(abs, -1).result()
                with condition:
                    report["where"] = "in the with block"
                    for _ in range(2000):
                        time.sleep(0.001)
                report["where"] = "after it, without Interrupted"
        except cleanbreak.Interrupted:
            report["ended"] = "Interrupted"
        report["exited"] = lock.exited
        print(json.dumps(report), flush=True)


    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("held", [True, False])
def test_a_ctrl_c_as_a_condition_is_entered_is_raised_inside_the_with_block(
    tmp_path: Path, held: bool
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(held=held))
    proc = run_script(script, GUARD, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if held:
        expected = {"where": "in the with block", "ended": "Interrupted", "exited": True}
    else:
        expected = {"where": "before", "ended": "Interrupted", "exited": False}
    assert report == expected, report
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("kind", ["Lock", "RLock"])
def test_a_ctrl_c_as_a_condition_is_left_is_put_off_until_its_lock_is_released(kind: str) -> None:
    # The handler runs as ``Condition.__exit__`` is entered, its lock still held: raised there,
    # the Interrupted would leave the lock taken for good (the drop-in's stress test hung so,
    # about once in 400 to 800 runs of 1,000 round trips). The frame is taken where the handler
    # would get it, at the call's start; there it must count as a place to put the raise off,
    # and no longer once the lock is released.
    condition = threading.Condition(getattr(threading, kind)())
    seen: list[tuple[FrameType, bool, bool]] = []

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        if event == "call" and frame.f_code is threading.Condition.__exit__.__code__:
            owned = condition._is_owned()  # type: ignore[attr-defined]
            seen.append((frame, _signals._in_finalizer(frame), owned))

    sys.setprofile(profile)
    try:
        with condition:
            pass
    finally:
        sys.setprofile(None)
    assert [(put_off, owned) for _frame, put_off, owned in seen] == [(True, True)]
    assert not _signals._in_finalizer(seen[0][0])  # released since
