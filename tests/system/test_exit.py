"""How the process ends (issue 9, points 5, 7, 10 and 12): an uncaught ``Interrupted`` ends it
as an uncaught ``KeyboardInterrupt`` would, so a shell loop stops; a further Ctrl-C while it
exits changes nothing; ``submit`` from an atexit handler fails at once; and a script that
starts a pool without the ``__main__`` guard is told so, in one line."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tasks import run_script

from ._harness import EXIT_GUARD, METHODS, TIMEOUT, Child
from .conftest import StartCommand

SCRIPT = Path(__file__).parent / "scripts" / "exit_child.py"
PYTHON = [sys.executable, str(SCRIPT)]


def _blocked(child: Child) -> bool:
    return child.indices("start") == {0, 1}


def _one_traceback(child: Child, sig: str) -> None:
    err = child.stderr()
    assert err.count("Traceback") == 1, err
    assert f"Interrupted: interrupted by {sig}" in err, err
    assert "Exception ignored" not in err, err


@pytest.mark.parametrize("how", ["sigint-group", "sigterm-parent"])
@pytest.mark.parametrize("method", METHODS)
def test_an_uncaught_interrupted_ends_the_process_as_killed_by_the_signal(
    start_command: StartCommand, tmp_path: Path, method: str, how: str
) -> None:
    """Killed by SIGINT after Ctrl-C (by SIGTERM after SIGTERM), as CPython ends on an
    uncaught KeyboardInterrupt; and first the atexit handlers ran, stdout was flushed, and a
    file left open got its data."""
    out = tmp_path / "left-open.txt"
    child = start_command(PYTHON, "uncaught", f"--method={method}", f"--out-file={out}")
    child.wait_for(_blocked, "both tasks to block")

    child.send(how)
    status = child.wait_exit()

    sig = signal.SIGINT if how == "sigint-group" else signal.SIGTERM
    assert status == -sig, child.output()
    assert (child.tmp / "stdout").read_text() == "buffered atexit ran\n"
    assert out.read_text() == "unflushed"
    _one_traceback(child, sig.name)


@pytest.mark.parametrize("method", METHODS)
def test_a_shell_loop_stops_at_ctrl_c(start_command: StartCommand, method: str) -> None:
    """``for f in ...; do python script.py; done``: bash goes on to the next round unless its
    child died of SIGINT. After Ctrl-C, the loop stops in its first round."""
    loop = 'for i in 1 2 3; do "$@"; echo "next $i"; done'
    child = start_command(["bash", "-c", loop, "bash", *PYTHON], "uncaught", f"--method={method}")
    child.wait_for(_blocked, "both tasks of the first round to block")
    python = child.of("parent")[0].int(0)
    child.wait_parent_asleep(pid=python)

    child.send("sigint-group", asleep=False)
    status = child.wait_exit()

    assert status == -signal.SIGINT, child.output()
    assert "next" not in (child.tmp / "stdout").read_text(), child.output()
    child.drain_events()
    assert len(child.of("parent")) == 1, "a second round started"


@pytest.mark.parametrize("mode", ["uncaught", "caught"])
def test_a_second_ctrl_c_while_the_process_exits_changes_nothing(
    start_command: StartCommand, mode: str
) -> None:
    """The first Ctrl-C stops the pool; the second comes while an atexit handler runs. It
    prints nothing, and the exit status is the first one's."""
    child = start_command(PYTHON, mode, "--park-atexit")
    child.wait_for(_blocked, "both tasks to block")
    child.send("sigint-group")
    child.wait_for(lambda c: bool(c.of("atexit")), "the process to run its atexit handlers")

    child.ctrl_c_handled()
    child.release(1)
    status = child.wait_exit()

    assert status == (-signal.SIGINT if mode == "uncaught" else 130), child.output()
    assert "atexit ran" in (child.tmp / "stdout").read_text()
    err = child.stderr()
    assert "Exception ignored" not in err and "KeyboardInterrupt\n" not in err, err
    if mode == "uncaught":
        _one_traceback(child, "SIGINT")
    else:
        assert "Traceback" not in err, err


def test_a_third_ctrl_c_while_the_process_exits_ends_it_at_once(
    start_command: StartCommand,
) -> None:
    """Someone who presses Ctrl-C again and again while the exit hangs (here, an atexit
    handler that waits for ever) gets the process ended, as killed by the first signal."""
    child = start_command(PYTHON, "caught", "--park-atexit")
    child.wait_for(_blocked, "both tasks to block")
    child.send("sigint-group")
    child.wait_for(lambda c: bool(c.of("atexit")), "the process to run its atexit handlers")

    child.ctrl_c_handled()
    child.send("sigint-group")
    status = child.wait_exit()

    assert status == -signal.SIGINT, child.output()
    assert "Exception ignored" not in child.stderr(), child.output()


@pytest.mark.parametrize("order", ["first", "last"])
def test_submit_from_an_atexit_handler_raises_runtime_error(order: str, tmp_path: Path) -> None:
    """As ``ProcessPoolExecutor`` does, whichever order the handlers were registered in; a
    future that would never finish would hang the exit of a caller that waits for it."""
    proc = subprocess.run(
        [*PYTHON, f"atexit-submit-{order}", "--events", "/dev/null", "--release", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    expected = "runtime-error: cannot schedule new futures after interpreter shutdown"
    assert proc.stdout.strip() == expected, (proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stderr


NO_GUARD = """\
    import cleanbreak

    def double(x):
        return 2 * x

    try:
        print({call})
    except cleanbreak.BrokenPool as exc:
        # Uncaught, its notes would be printed after it: it has none, so its fix stays last.
        print(f"BrokenPool: {{exc}}{{getattr(exc, '__notes__', '')}}")
"""


def _one_clean_line(tmp_path: Path, script: str) -> list[str]:
    """Run ``script`` as a main module; it must exit 0, print one line and nothing on stderr."""
    path = tmp_path / "unguarded.py"
    path.write_text(script)
    proc = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=EXIT_GUARD * 3,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return lines


@pytest.mark.parametrize("method", METHODS)
def test_a_pool_started_without_the_main_guard_says_what_to_do(method: str, tmp_path: Path) -> None:
    """Under forkserver and spawn, every worker imports the main module: a script that starts
    its pool at module level starts one in each worker too. The pool says, in one line, to put
    it under the guard; no worker prints a traceback. Under fork the script just works."""
    call = f"cleanbreak.map(double, range(4), workers=2, mp_context={method!r})"
    lines = _one_clean_line(tmp_path, textwrap.dedent(NO_GUARD.format(call=call)))
    if method == "fork":
        assert lines == ["[0, 2, 4, 6]"]
    else:
        assert lines[0].startswith("BrokenPool: "), lines
        assert 'if __name__ == "__main__":' in lines[0], lines
        assert lines[0].endswith("in every worker)"), lines  # the fix is its last word


# Calls whose run goes on queueing units after the pool broke (many chunks, a journal), and
# the other faces: each must end with the same line, not "the pool has shut down".
CALLS = {
    "map-many": "cleanbreak.map(double, range(5000), workers=2)[:4]",
    "map-journal": "cleanbreak.map(double, range(5000), workers=2, journal='j.db')[:4]",
    "pool-map": "list(cleanbreak.Pool(2).map(double, range(5000), chunksize=1))[:4]",
    "imap-unordered": "sum(cleanbreak.Pool(2).imap_unordered(double, range(5000)))",
    "submit": "cleanbreak.Pool(2).submit(double, 1).result()",
}


@pytest.mark.parametrize("call", CALLS)
def test_every_call_of_an_unguarded_module_says_what_to_do(call: str, tmp_path: Path) -> None:
    lines = _one_clean_line(tmp_path, textwrap.dedent(NO_GUARD.format(call=CALLS[call])))
    assert lines[0].startswith("BrokenPool: "), lines
    assert lines[0].endswith("in every worker)"), lines


PRELOAD_MAIN = """\
    import multiprocessing.spawn as _spawn

    # What Python 3.13.8 and later do: the fork server imports the main module first (it did
    # not before, as it looked for the wrong key; gh-126631).
    _real = _spawn.get_preparation_data


    def _with_main_path(name):
        data = _real(name)
        if "init_main_from_path" in data:
            data["main_path"] = data["init_main_from_path"]
        return data


    _spawn.get_preparation_data = _with_main_path
"""


def test_a_fork_server_that_imports_the_unguarded_module_says_what_to_do(
    tmp_path: Path,
) -> None:
    """Where the fork server itself imports the main module (Python 3.13.8 and later), the
    unguarded script's pool stops the fork server, not a worker: the pool says the same."""
    call = "cleanbreak.map(double, range(4), workers=2, mp_context='forkserver')"
    body = textwrap.dedent(PRELOAD_MAIN) + textwrap.dedent(NO_GUARD.format(call=call))
    lines = _one_clean_line(tmp_path, body)
    assert lines[0].startswith("BrokenPool: "), lines
    assert 'if __name__ == "__main__":' in lines[0], lines


FORK_SERVER_MASK = """\
    import multiprocessing as mp
    import signal
    from multiprocessing import resource_tracker

    import cleanbreak


    def blocked(queue):
        queue.put(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))


    if __name__ == "__main__":
        # Already running, as after any use of shared memory: starting it would unblock the
        # signals in the thread that starts the fork server and hide what this tests.
        resource_tracker.ensure_running()
        with cleanbreak.Pool(1, mp_context="forkserver") as pool:
            assert pool.submit(abs, -1).result() == 1
        ctx = mp.get_context("forkserver")
        queue = ctx.Queue()
        proc = ctx.Process(target=blocked, args=(queue,))
        proc.start()
        print(queue.get(timeout=30))
        proc.join()
"""


def test_the_fork_server_is_left_with_the_mask_a_process_has(tmp_path: Path) -> None:
    """The fork server is the whole process's. Started by cleanbreak, it must not hand
    blocked signals to the processes it forks for anyone else (they could not be
    terminated)."""
    script = tmp_path / "mask.py"
    script.write_text(textwrap.dedent(FORK_SERVER_MASK))
    proc = run_script(script, TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)
