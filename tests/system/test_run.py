"""``cleanbreak run`` and ``cleanbreak status``, driven from the shell as a user would: Ctrl-C
to the process group and run again, SIGKILL to the parent and run again, SIGKILL at random
moments in a loop, every bad input, the exit statuses and the progress display."""

from __future__ import annotations

import json
import os
import pickle
import pty
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cleanbreak import Journal, JournalError
from cleanbreak._journal import Keyer
from tests import cli_tasks

from ._harness import session_of

GUARD = 60.0  # seconds: only a deadlock guard
ROOT = Path(__file__).resolve().parents[2]
KILL_RUNS = int(os.environ.get("CLEANBREAK_KILL_RUNS", "4"))


@dataclass
class Job:
    """One job's files: its input (``n`` integers), log folder, journal and output."""

    tmp: Path
    n: int

    def __post_init__(self) -> None:
        self.input = self.tmp / "in.txt"
        self.input.write_text("".join(f"{x}\n" for x in range(self.n)))
        self.log = self.tmp / "log"
        self.log.mkdir(exist_ok=True)
        self.journal = self.tmp / "j.sqlite"
        self.output = self.tmp / "out.jsonl"

    def argv(self, *extra: str, target: str = "tests.cli_tasks:logged") -> list[str]:
        return [
            sys.executable,
            "-m",
            "cleanbreak",
            "run",
            target,
            str(self.input),
            "--journal",
            str(self.journal),
            "--output",
            str(self.output),
            "--workers",
            "2",
            *extra,
        ]

    def env(self, seconds: float) -> dict[str, str]:
        return dict(
            os.environ,
            RUN_LOG=str(self.log),
            RUN_SECONDS=str(seconds),
            PYTHONPATH=str(ROOT),
            XDG_CACHE_HOME=str(self.tmp / "cache"),
        )

    def start(self, *extra: str, seconds: float = 0.02) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*extra),
            cwd=ROOT,
            env=self.env(seconds),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def runs(self) -> dict[int, int]:
        return cli_tasks.runs_of(str(self.log))

    def wait_started(self, count: int) -> None:
        """Handshake: until ``count`` tasks have started."""
        deadline = time.monotonic() + GUARD
        while len(os.listdir(self.log)) < count:
            assert time.monotonic() < deadline, "the tasks did not start"
            time.sleep(0.005)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.output.read_text().splitlines()]

    def committed(self) -> dict[int, int]:
        """Every result in the journal, by input, read straight from the file; checks that
        the file is sound and that each value is right."""
        keys = {Keyer(cli_tasks.logged, None, star=False).item(x): x for x in range(self.n)}
        with sqlite3.connect(self.journal) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            try:
                rows = conn.execute("SELECT key, ok, value FROM outcomes").fetchall()
            except sqlite3.OperationalError:  # killed before the table was made
                rows = []
        conn.close()
        out: dict[int, int] = {}
        for key, ok, blob in rows:
            assert ok == 1
            x = keys[key]
            out[x] = pickle.loads(blob)
            assert out[x] == x * x
        return out


_session = session_of


def _wait_session_empty(pid: int) -> None:
    deadline = time.monotonic() + GUARD
    while _session(pid):
        assert time.monotonic() < deadline, f"processes left: {_session(pid)}"
        time.sleep(0.01)


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=GUARD)
    finally:
        for left in _session(proc.pid):
            left.kill()


def _check_complete(job: Job) -> None:
    records = job.records()
    assert sorted(r["input"] for r in records) == list(range(job.n))  # one each
    assert all(r["result"] == r["input"] ** 2 for r in records)


# ── Ctrl-C, SIGKILL, and the run after ───────────────────────────────────────────────────────


@pytest.mark.parametrize("mode", ["terminate", "drain"])
def test_ctrl_c_then_the_same_command_finishes_the_job(tmp_path: Path, mode: str) -> None:
    job = Job(tmp_path, 100)
    proc = job.start("--on-interrupt", mode)
    job.wait_started(30)
    os.killpg(proc.pid, signal.SIGINT)
    _out, err = _finish(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("interrupted: ") and summary.endswith(
        "; run the same command to resume"
    ), err
    _wait_session_empty(proc.pid)
    committed = job.committed()
    first = job.runs()
    assert 30 - 2 <= len(committed) < job.n  # 30 started, 2 may have been running
    # What finished is in the output too.
    assert {r["input"] for r in job.records()} == set(committed)

    again = job.start("--on-interrupt", mode)
    _out, err = _finish(again)
    assert again.returncode == 0, err
    assert f"({len(committed)} of them from the journal)" in err
    _check_complete(job)
    runs = job.runs()
    assert set(runs) == set(range(job.n))
    twice = {x for x, count in runs.items() if count > 1}
    # Only the tasks that were running at the signal ran twice (none in drain mode); nothing
    # recorded ran again.
    assert len(twice) <= (2 if mode == "terminate" else 0), twice
    assert not twice & set(committed)
    assert all(runs[x] == first[x] for x in committed)


def test_sigkill_to_the_parent_then_the_same_command_finishes_the_job(tmp_path: Path) -> None:
    job = Job(tmp_path, 100)
    proc = job.start()
    job.wait_started(60)
    os.kill(proc.pid, signal.SIGKILL)
    _finish(proc)
    _wait_session_empty(proc.pid)  # the workers go by themselves
    committed = job.committed()
    first = job.runs()
    assert committed, "nothing was committed in the time 60 tasks took"

    again = job.start()
    _out, err = _finish(again)
    assert again.returncode == 0, err
    _check_complete(job)
    runs = job.runs()
    assert all(runs[x] == first[x] for x in committed)  # nothing committed ran again


def _wait_for_commits(job: Job, before: int, proc: subprocess.Popen[str]) -> None:
    """Until the journal holds more than ``before`` results (a deadlock guard bounds it)."""
    deadline = time.monotonic() + GUARD
    while _committed_count(job) <= before:
        assert proc.poll() is None and time.monotonic() < deadline, "no result was committed"
        time.sleep(0.005)


def _committed_count(job: Job) -> int:
    """How many results the journal holds (0 before the run has made its tables)."""
    try:
        return Journal.status(job.journal).done
    except (JournalError, OSError):
        return 0


def test_sigkill_at_random_moments_never_corrupts_or_loses_a_committed_result(
    tmp_path: Path,
) -> None:
    # 3,000 tasks of 1 ms: the kills land long before the end (a run killed at a random
    # moment does at most some 1,100, one killed after its first commit some 300; most do a
    # few hundred), and the last run, which finishes the job, stays short.
    job = Job(tmp_path, 3_000)
    rng = random.Random(int(os.environ.get("CLEANBREAK_STRESS_SEED", "0")) or None)
    seen: dict[int, int] = {}
    counts = {"killed": 0, "finished": 0, "lost": 0, "grew": 0}
    for run in range(KILL_RUNS):
        proc = job.start(seconds=0.001)
        if run % 2:
            # Every other kill lands while results come in: once this run has committed one,
            # at a random moment within the next 0.1 s.
            _wait_for_commits(job, len(seen), proc)
            time.sleep(rng.uniform(0.0, 0.1))
        else:
            time.sleep(rng.uniform(0.0, 0.8))  # a random moment: startup, running, committing
        os.kill(proc.pid, signal.SIGKILL)
        _finish(proc)
        counts["finished" if proc.returncode == 0 else "killed"] += 1
        _wait_session_empty(proc.pid)
        now = job.committed()  # the file is sound, and every value is right
        counts["lost"] += len(set(seen) - set(now))
        counts["grew"] += len(now) > len(seen)
        seen = now
    print(f"\n{KILL_RUNS} SIGKILLs at random moments: {counts}, {len(seen)} results committed")
    assert counts["lost"] == 0
    assert counts["grew"] >= KILL_RUNS // 2  # the kills did land while results came in
    last = job.start(seconds=0.001)
    _out, err = _finish(last)
    assert last.returncode == 0, err
    _check_complete(job)


# ── outcomes, exit statuses, status ──────────────────────────────────────────────────────────


def _run(
    tmp_path: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = dict(
        os.environ,
        RUN_LOG=str(tmp_path / "log"),
        RUN_SECONDS="0",
        PYTHONPATH=str(ROOT),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    (tmp_path / "log").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "cleanbreak", *args],
        check=False,
        cwd=ROOT,
        env={**base, **(env or {})},
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=GUARD,
    )


def test_failures_exit_1_and_status_shows_them(tmp_path: Path) -> None:
    inputs = tmp_path / "in.txt"
    inputs.write_text("1\n-2\n\n3\n-4\n")
    first = _run(tmp_path, "run", "tests.cli_tasks:logged", str(inputs))
    assert first.returncode == 1, first.stderr
    records = [json.loads(line) for line in first.stdout.splitlines()]
    assert sorted(r["input"] for r in records) == [-4, -2, 1, 3]  # the blank line is skipped
    errors = {r["input"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {-2, -4}
    assert errors[-2]["type"] == "ValueError" and errors[-2]["message"] == "negative input -2"
    assert 'in logged\n    raise ValueError(f"negative input {x}")' in errors[-2]["traceback"]
    journal = first.stderr.splitlines()[0].removeprefix("cleanbreak: journal ")
    assert journal.startswith(str(tmp_path / "cache" / "cleanbreak" / "journals"))
    assert "2 tasks failed; see their tracebacks with: cleanbreak status" in first.stderr

    status = _run(tmp_path, "status", journal)
    assert status.returncode == 0
    assert "outcomes: 2 done, 2 failed of 4 inputs" in status.stdout
    assert status.stdout.count("ValueError: negative input") == 4  # headline and traceback

    # Run again: the failures run again (and fail again); --skip-failed keeps them instead.
    again = _run(tmp_path, "run", "tests.cli_tasks:logged", str(inputs))
    assert again.returncode == 1
    kept = _run(tmp_path, "run", "tests.cli_tasks:logged", str(inputs), "--skip-failed")
    assert kept.returncode == 1
    assert "(4 of them from the journal)" in kept.stderr
    assert cli_tasks.runs_of(str(tmp_path / "log")) == {1: 1, 3: 1, -2: 2, -4: 2}
    fresh = _run(tmp_path, "run", "tests.cli_tasks:logged", str(inputs), "--fresh")
    assert fresh.returncode == 1
    assert cli_tasks.runs_of(str(tmp_path / "log")) == {1: 2, 3: 2, -2: 3, -4: 3}


def test_stdin_json_and_text_lines(tmp_path: Path) -> None:
    lines = '7\n"seven"\n[1, 2]\n{"a": null}\nnot json, just text\n2.5\ntrue\n'
    done = _run(tmp_path, "run", "tests.cli_tasks:describe", "-", stdin=lines)
    assert done.returncode == 0, done.stderr
    got = {json.dumps(r["input"]): r["result"] for r in map(json.loads, done.stdout.splitlines())}
    assert got == {
        "7": {"type": "int", "value": 7},
        '"seven"': {"type": "str", "value": "seven"},
        "[1, 2]": {"type": "list", "value": [1, 2]},
        '{"a": null}': {"type": "dict", "value": {"a": None}},
        '"not json, just text"': {"type": "str", "value": "not json, just text"},
        "2.5": {"type": "float", "value": 2.5},
        "true": {"type": "bool", "value": True},
    }


def test_sigterm_exits_143(tmp_path: Path) -> None:
    job = Job(tmp_path, 200)
    proc = job.start()
    job.wait_started(10)
    os.kill(proc.pid, signal.SIGTERM)
    _out, err = _finish(proc)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: ")
    _wait_session_empty(proc.pid)


def test_a_reader_that_goes_away_stops_the_run_quietly(tmp_path: Path) -> None:
    """``cleanbreak run ... | head -1``: the pipe breaks; exit as SIGPIPE would, no traceback."""
    job = Job(tmp_path, 2000)
    argv = [a for a in job.argv() if a not in ("--output", str(job.output))]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=job.env(0.001),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = json.loads(proc.stdout.readline())
    assert first["result"] == first["input"] ** 2
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    proc.wait(GUARD)
    assert proc.returncode == 128 + signal.SIGPIPE, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("stopped: "), err
    _wait_session_empty(proc.pid)


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cleanbreak", "--version"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.startswith("cleanbreak 0.")


# ── bad input ────────────────────────────────────────────────────────────────────────────────


def _bad_cases(tmp: Path, make_files: bool = True) -> Iterator[tuple[str, list[str], str]]:
    good = tmp / "in.txt"
    binary = tmp / "binary.txt"
    if make_files:
        good.write_text("1\n2\n")
        binary.write_bytes(b"1\n\xff\xfe\x00\n")
    run = ["run", "tests.cli_tasks:logged"]
    yield "no such module", ["run", "no_such_module:f", str(good)], "cannot import module"
    yield "no such function", ["run", "tests.cli_tasks:nope", str(good)], "has no function"
    yield "not a function", ["run", "tests.cli_tasks:NOT_A_FUNCTION", str(good)], "not a function"
    yield "module fails", ["run", "tests.cli_broken:f", str(good)], "broken on purpose"
    yield "no colon", ["run", "tests.cli_tasks", str(good)], "is not MODULE:FUNCTION"
    yield "no input file", [*run, str(tmp / "missing.txt")], "No such file or directory"
    yield "input is a folder", [*run, str(tmp)], "cannot read input file"
    yield "not text", [*run, str(binary)], "is not UTF-8 text"
    yield "workers 0", [*run, str(good), "--workers", "0"], "--workers: must be at least 1"
    yield "timeout -1", [*run, str(good), "--timeout", "-1"], "--timeout: must be a number"
    yield "retries x", [*run, str(good), "--retries", "x"], "--retries: expected a whole"
    yield "on-interrupt", [*run, str(good), "--on-interrupt", "x"], "invalid choice: 'x'"
    yield "unknown option", [*run, str(good), "--bogus"], "unrecognized arguments: --bogus"
    yield "missing input", run, "the following arguments are required: INPUT_FILE"
    yield "output folder", [*run, str(good), "--output", str(tmp / "no/x")], "cannot write output"
    yield "journal folder", [*run, str(good), "--journal", str(tmp / "no/j")], "does not exist"
    yield "status of nothing", ["status", str(tmp / "none.sqlite")], "cannot read journal"
    yield "status of text", ["status", str(good)], "is not a cleanbreak journal"


BAD_CASES = [case[0] for case in _bad_cases(Path("ids"), make_files=False)]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    _name, args, expect = next(c for c in _bad_cases(tmp_path) if c[0] == case)
    done = _run(tmp_path, *args)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("cleanbreak"), lines[0]
    assert expect in lines[0], lines[0]


def test_a_journal_in_use_or_of_another_function_gets_one_line(tmp_path: Path) -> None:
    inputs = tmp_path / "in.txt"
    inputs.write_text("1\n")
    journal = tmp_path / "j.sqlite"
    holder = Journal(journal)
    holder.open()
    try:
        done = _run(
            tmp_path, "run", "tests.cli_tasks:logged", str(inputs), "--journal", str(journal)
        )
    finally:
        holder.close()
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"cleanbreak run: error: journal {journal} is in use by another run (pid {os.getpid()}): "
        "wait for it to finish, or pass another journal path"
    )
    ok = _run(tmp_path, "run", "tests.cli_tasks:logged", str(inputs), "--journal", str(journal))
    assert ok.returncode == 0, ok.stderr
    other = _run(
        tmp_path, "run", "tests.cli_tasks:describe", str(inputs), "--journal", str(journal)
    )
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert (
        lines[-1].startswith("cleanbreak run: error: journal ")
        and "holds the results of" in (lines[-1])
    )
    assert "Traceback" not in other.stderr


# ── the progress display ─────────────────────────────────────────────────────────────────────


def test_progress_is_a_live_bar_on_a_terminal(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    job = Job(tmp_path, 60)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        job.argv(),
        cwd=ROOT,
        env=dict(job.env(0.02), COLUMNS="120"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + GUARD
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        proc.wait(GUARD)
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    text = seen.decode("utf-8", "replace")
    assert proc.returncode == 0, text
    assert "━" in text and "failed" in text and "ETA" in text, text  # rich's bar, redrawn
    assert "done: 60 done, 0 failed" in text, text


def test_progress_is_plain_lines_in_a_log(tmp_path: Path) -> None:
    job = Job(tmp_path, 100)
    proc = job.start(seconds=0.005)
    _out, err = _finish(proc)
    assert proc.returncode == 0, err
    lines = err.strip().splitlines()
    plain = [line for line in lines if line.startswith("tests.cli_tasks:logged: ")]
    assert plain and all("/100 done, 0 failed, " in line for line in plain), err
    assert "\x1b" not in err  # no terminal codes in a log
    assert lines[-1].startswith("done: 100 done, 0 failed in "), err
