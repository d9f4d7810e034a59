"""The pool is a good neighbour with signal handlers.

Handlers go in only from the main thread and only over the defaults; a handler the user put in
place is left alone, before, during and after the pool; the defaults come back afterwards. The
in-process tests run the pool inside pytest's own (main-thread) process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

import cleanbreak

from ._harness import METHODS, TIMEOUT, assert_cleaned_up
from .conftest import StartChild

DEFAULTS: dict[signal.Signals, Any] = {
    signal.SIGINT: signal.default_int_handler,
    signal.SIGTERM: signal.SIG_DFL,
}


def _user_handler(signum: int, frame: FrameType | None) -> None:
    """A handler of the user's own; these tests never let it run."""


@pytest.fixture
def default_handlers() -> Iterator[None]:
    """Start from the default SIGINT and SIGTERM handlers, with no other pool live; put
    pytest's handlers back afterwards. (A shared pool that another module's tests left open in
    this process would keep cleanbreak's handler in place after the test's own pool closed: it
    is hidden from the handler while the test runs.)"""
    from cleanbreak import _signals

    assert threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in DEFAULTS}
    others, chained = list(_signals._listeners), dict(_signals._saved)
    _signals._listeners.clear()
    _signals._saved.clear()
    for sig, handler in DEFAULTS.items():
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        _signals._listeners[:] = others
        _signals._saved.clear()
        _signals._saved.update(chained)


def _handlers() -> dict[signal.Signals, Any]:
    return {sig: signal.getsignal(sig) for sig in DEFAULTS}


@pytest.mark.usefixtures("default_handlers")
@pytest.mark.parametrize("method", METHODS)
def test_defaults_are_replaced_while_open_and_restored_after(method: str) -> None:
    with cleanbreak.Pool(1, mp_context=method) as pool:
        assert pool.submit(abs, -3).result(timeout=TIMEOUT) == 3
        during = _handlers()
        assert during[signal.SIGINT] is not signal.default_int_handler
        assert during[signal.SIGTERM] not in (signal.SIG_DFL, signal.SIG_IGN)
    assert _handlers() == DEFAULTS


@pytest.mark.usefixtures("default_handlers")
@pytest.mark.parametrize("method", METHODS)
def test_defaults_are_restored_after_an_interrupt(method: str) -> None:
    """A real SIGINT to this process while a task runs: Interrupted, then the defaults."""
    try:
        with cleanbreak.Pool(1, mp_context=method) as pool:
            fut = pool.submit(time.sleep, 1000)
            os.kill(os.getpid(), signal.SIGINT)
            fut.result(timeout=TIMEOUT)
    except cleanbreak.Interrupted as exc:
        assert exc.signal == signal.SIGINT
    except KeyboardInterrupt:  # pragma: no cover - only when the pool's handler is missing
        pytest.fail("SIGINT raised a plain KeyboardInterrupt: the pool's handler was not in place")
    else:  # pragma: no cover
        pytest.fail("the SIGINT did not interrupt the pool")
    assert _handlers() == DEFAULTS


@pytest.mark.usefixtures("default_handlers")
@pytest.mark.parametrize("method", METHODS)
def test_users_handler_installed_before_is_left_alone(method: str) -> None:
    signal.signal(signal.SIGINT, _user_handler)
    with cleanbreak.Pool(1, mp_context=method) as pool:
        assert pool.submit(abs, -3).result(timeout=TIMEOUT) == 3
        assert signal.getsignal(signal.SIGINT) is _user_handler
    assert signal.getsignal(signal.SIGINT) is _user_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.usefixtures("default_handlers")
@pytest.mark.parametrize("method", METHODS)
def test_users_handler_installed_while_open_is_not_clobbered(method: str) -> None:
    with cleanbreak.Pool(1, mp_context=method) as pool:
        assert pool.submit(abs, -3).result(timeout=TIMEOUT) == 3
        signal.signal(signal.SIGINT, _user_handler)
        signal.signal(signal.SIGTERM, _user_handler)
    assert signal.getsignal(signal.SIGINT) is _user_handler
    assert signal.getsignal(signal.SIGTERM) is _user_handler


@pytest.mark.usefixtures("default_handlers")
def test_pool_made_outside_the_main_thread_installs_nothing() -> None:
    seen: list[dict[signal.Signals, Any]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with cleanbreak.Pool(1, mp_context="forkserver") as pool:
                assert pool.submit(abs, -3).result(timeout=TIMEOUT) == 3
                seen.append(_handlers())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert errors == []
    assert seen == [DEFAULTS]
    assert _handlers() == DEFAULTS


@pytest.mark.parametrize("api", ["submit", "map"])
@pytest.mark.parametrize("method", METHODS)
def test_users_handler_that_raises_still_stops_the_pool(
    start_child: StartChild, method: str, api: str
) -> None:
    """The user's SIGINT handler raises KeyboardInterrupt: the pool left it in place, and
    still turns the KeyboardInterrupt it raised into a clean stop."""
    child = start_child(method=method, layout="qqq" + "gggg" + "qq", api=api, user_handler=True)
    child.wait_for(
        lambda c: c.indices("recv") >= {0, 1, 2} and len(c.indices("grandchild")) == 2,
        "the quick results and both blocking tasks",
    )

    sent, report = child.ctrl_c()
    assert report["sigint_handler_is_users"], report["sigint_handler"]
    assert report["sigterm_handler"] == repr(signal.SIG_DFL)
    kept = child.kept()
    child.drain_events()
    # The quick results, and nothing else: through map, the two quick tasks at the end may
    # have run too, on a worker that came free while the tasks before them waited behind a
    # blocking one (tasks start in about the order given: see the README). Every result the
    # parent had received is kept.
    assert {0, 1, 2} <= kept.keys() <= {0, 1, 2, 7, 8}
    assert kept == {i: 10 * i for i in child.indices("recv")}
    assert child.started_after(sent) == []
    assert_cleaned_up(child, "user's SIGINT handler")
