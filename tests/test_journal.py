"""The journal, through the library: keys, reuse through every API, failures, and the errors
a journal that cannot be used gives. (``tests/system/test_run.py`` drives it from the shell,
with Ctrl-C and SIGKILL.)"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cleanbreak
from cleanbreak import Journal, JournalError
from cleanbreak._journal import BIG_VALUE, stable_digest
from tests import tasks
from tests.tasks import TaskError, logged_square, runs_of


@pytest.fixture
def runs(tmp_path: Path) -> str:
    folder = tmp_path / "runs"
    folder.mkdir()
    return str(folder)


@pytest.fixture
def journal(tmp_path: Path) -> str:
    return str(tmp_path / "run.sqlite")


def _rows(path: str) -> dict[int, int]:
    """ok → count, read straight from the file."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT ok, count(*) FROM outcomes GROUP BY ok").fetchall())


# ── keys ─────────────────────────────────────────────────────────────────────────────────────


def test_keys_tell_types_and_shapes_apart() -> None:
    values = [
        1,
        1.0,
        True,
        "1",
        b"1",
        (1,),
        [1],
        {1},
        {1: None},
        None,
        -0.0,
        0.0,
        (1, (2,)),
        (1, 2),
    ]
    digests = [stable_digest(v) for v in values]
    assert len(set(digests)) == len(values)
    assert stable_digest({"a": 1, "b": {2, 3}}) == stable_digest({"b": {3, 2}, "a": 1})


def test_keys_are_the_same_in_another_process() -> None:
    """Python's hash() is salted per process (it orders sets of strings differently); the
    journal's keys must not be."""
    value = {"words": {f"w{i}" for i in range(50)}, "n": [1, 2.5, None, b"x"], "t": ("a",)}
    code = (
        "from cleanbreak._journal import stable_digest;"
        "value = {'words': {f'w{i}' for i in range(50)}, 'n': [1, 2.5, None, b'x'], 't': ('a',)};"
        "print(stable_digest(value).hex())"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == stable_digest(value).hex()


# ── reuse through every API ──────────────────────────────────────────────────────────────────


def test_map_runs_only_what_the_journal_lacks(runs: str, journal: str) -> None:
    fn = functools.partial(logged_square, runs)
    with cleanbreak.Pool(2, journal=journal) as pool:
        assert list(pool.map(fn, range(10))) == [x * x for x in range(10)]
    assert runs_of(runs) == dict.fromkeys(range(10), 1)
    assert stat.S_IMODE(os.stat(journal).st_mode) == 0o600
    with cleanbreak.Pool(2, journal=journal) as pool:
        assert list(pool.map(fn, range(15))) == [x * x for x in range(15)]
        assert pool.journal is not None and pool.journal.reused == 10
    assert runs_of(runs) == dict.fromkeys(range(15), 1)  # 0..9 did not run again


def test_imap_unordered_and_module_map_and_submit_reuse(runs: str, journal: str) -> None:
    fn = functools.partial(logged_square, runs)
    assert cleanbreak.map(fn, range(6), workers=2, journal=journal) == [x * x for x in range(6)]
    with cleanbreak.Pool(2, journal=journal) as pool:
        assert sorted(pool.imap_unordered(fn, range(8))) == sorted(x * x for x in range(8))
        futures = [pool.submit(fn, x) for x in range(10)]
        assert [f.result() for f in futures] == [x * x for x in range(10)]
        assert pool.journal is not None and pool.journal.reused == 6 + 8
    assert cleanbreak.map(fn, range(10), workers=2, journal=journal) == [x * x for x in range(10)]
    assert runs_of(runs) == dict.fromkeys(range(10), 1)


def test_a_submitted_task_is_keyed_by_its_arguments(runs: str, journal: str) -> None:
    with cleanbreak.Pool(2, journal=journal) as pool:
        assert pool.submit(tasks.combine, 1, 2, scale=3).result() == 9
        assert pool.submit(tasks.combine, 1, 2, scale=4).result() == 12
    with cleanbreak.Pool(2, journal=journal) as pool:
        done = pool.submit(tasks.combine, 1, 2, scale=3)
        assert done.done() and done.result() == 9  # from the journal, at once
        assert pool.cancel(done) is False
        assert pool.submit(tasks.combine, 1, 3, scale=3).result() == 12


def test_key_names_tasks_instead_of_their_arguments(runs: str, journal: str) -> None:
    fn = functools.partial(logged_square, runs)
    with cleanbreak.Pool(2, journal=journal) as pool:
        assert list(pool.map(fn, range(4), key=lambda x: f"item-{x}")) == [0, 1, 4, 9]
    with cleanbreak.Pool(2, journal=journal) as pool:
        # Same names, so the recorded results come back, whatever the arguments are now.
        assert list(pool.map(fn, [7, 7, 7, 7], key=lambda _x: "item-2")) == [4, 4, 4, 4]
    assert runs_of(runs) == dict.fromkeys(range(4), 1)


def test_key_without_a_journal_is_refused(fs_pool: cleanbreak.Pool) -> None:
    with pytest.raises(ValueError, match="pass journal= too"):
        fs_pool.map(tasks.square, range(3), key=str)


def test_a_key_that_fails_is_raised_in_its_place(runs: str, journal: str) -> None:
    def key(x: int) -> int:
        if x == 3:
            raise LookupError("no name for 3")
        return x

    fn = functools.partial(logged_square, runs)
    with cleanbreak.Pool(2, journal=journal) as pool:
        got = []
        with pytest.raises(LookupError, match="no name for 3"):
            for value in pool.map(fn, range(6), key=key):
                got.append(value)
        assert got == [0, 1, 4]


# ── failures ─────────────────────────────────────────────────────────────────────────────────


def test_failures_are_recorded_and_run_again_by_default(runs: str, journal: str) -> None:
    fn = functools.partial(logged_square, runs)
    with cleanbreak.Pool(2, journal=journal) as pool:
        out = list(pool.map(fn, [1, -2, 3], return_exceptions=True))
    assert out[0] == 1 and out[2] == 9 and isinstance(out[1], TaskError)
    assert _rows(journal) == {1: 2, 0: 1}
    info = Journal.status(journal)
    assert (info.done, info.failed) == (2, 1)
    kind, message, tb = info.failures[0]
    assert kind == "tests.tasks.TaskError" and message == "negative input -2"
    assert "in logged_square" in tb and tb.rstrip().endswith("TaskError: negative input -2")
    with cleanbreak.Pool(2, journal=journal) as pool:  # the failed one runs again
        list(pool.map(fn, [1, -2, 3], return_exceptions=True))
    assert runs_of(runs) == {1: 1, -2: 2, 3: 1}


def test_skip_failed_gives_the_recorded_failure(runs: str, journal: str) -> None:
    fn = functools.partial(logged_square, runs)
    with cleanbreak.Pool(2, journal=journal) as pool:
        list(pool.map(fn, [-1, 2], return_exceptions=True))
    with cleanbreak.Pool(2, journal=Journal(journal, skip_failed=True)) as pool:
        out = list(pool.map(fn, [-1, 2], return_exceptions=True))
    assert isinstance(out[0], TaskError) and str(out[0]) == "negative input -1"
    assert "in logged_square" in str(out[0].__cause__)
    assert any("skip_failed" in note for note in out[0].__notes__)
    assert out[1] == 4
    assert runs_of(runs) == {-1: 1, 2: 1}


def test_a_worker_death_is_recorded_as_the_tasks_failure(journal: str) -> None:
    with cleanbreak.Pool(2, journal=journal) as pool:
        out = list(pool.map(tasks.exit_on, [1, 2, 3], [2, 2, 2], return_exceptions=True))
    assert out[0] == 1 and out[2] == 9
    assert isinstance(out[1], cleanbreak.TaskAborted)
    assert Journal.status(journal).failed == 1


def test_fresh_starts_over(runs: str, journal: str) -> None:
    fn = functools.partial(logged_square, runs)
    cleanbreak.map(fn, range(3), workers=2, journal=journal)
    cleanbreak.map(fn, range(3), workers=2, journal=Journal(journal, fresh=True))
    assert runs_of(runs) == dict.fromkeys(range(3), 2)


# ── a journal that cannot be used ────────────────────────────────────────────────────────────


def test_a_journal_in_use_is_refused(journal: str) -> None:
    with cleanbreak.Pool(1, journal=journal) as pool:
        list(pool.map(tasks.square, range(3)))
        with pytest.raises(JournalError, match="in use by another pool of this process"):
            cleanbreak.Pool(1, journal=journal)
        code = (
            "import sys, cleanbreak\n"
            "try:\n"
            f"    cleanbreak.Journal({journal!r}).open()\n"
            "except cleanbreak.JournalError as e:\n"
            "    print(e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], check=False, capture_output=True, text=True
        )
        assert f"is in use by another run (pid {os.getpid()})" in out.stdout, out
    cleanbreak.map(tasks.square, range(3), workers=1, journal=journal)  # released


def test_a_journal_of_another_function_is_refused(journal: str) -> None:
    cleanbreak.map(tasks.square, range(3), workers=1, journal=journal)
    with pytest.raises(JournalError, match=r"holds the results of tests.tasks:square, not "):
        cleanbreak.map(tasks.identity, range(3), workers=1, journal=journal)
    with (
        cleanbreak.Pool(1, journal=journal) as pool,
        pytest.raises(JournalError, match="give each function its own journal"),
    ):
        pool.submit(tasks.identity, 1)
    assert cleanbreak.map(tasks.identity, [5], workers=1, journal=Journal(journal, fresh=True)) == [
        5
    ]


def test_what_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a database\n" * 100)
    with pytest.raises(JournalError, match=r"cannot use .* as a journal"):
        cleanbreak.Pool(1, journal=text)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('format', 'something-else')")
    conn.close()
    with pytest.raises(JournalError, match="not a cleanbreak journal"):
        cleanbreak.Pool(1, journal=other)
    with pytest.raises(JournalError, match="does not exist; create it first"):
        cleanbreak.Pool(1, journal=tmp_path / "no" / "such" / "folder.sqlite")
    with pytest.raises(TypeError, match="journal must be a path"):
        cleanbreak.Pool(1, journal=3)  # type: ignore[arg-type]
    assert text.read_text().startswith("hello")  # nothing was written to it


def test_a_journal_of_another_user_is_never_opened(
    journal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cleanbreak.map(tasks.square, range(2), workers=1, journal=journal)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(JournalError, match="belongs to another user"):
        cleanbreak.Pool(1, journal=journal)


def test_a_result_that_does_not_pickle_still_reaches_the_caller(
    journal: str, capfd: pytest.CaptureFixture[str]
) -> None:
    journal_obj = Journal(journal)
    journal_obj.open()
    try:
        journal_obj.bind("x:y")
        journal_obj.record(b"k" * 16, lambda: None)  # a lambda does not pickle
        assert journal_obj.flush(10)
    finally:
        journal_obj.close()
    assert "a result was not journaled" in capfd.readouterr().err


# ── scale ────────────────────────────────────────────────────────────────────────────────────


def test_resuming_a_long_lazy_input_holds_neither_the_input_nor_the_journal(journal: str) -> None:
    n = 40_000
    cleanbreak.map(tasks.square, range(n), workers=2, journal=journal)

    def lazy() -> Iterator[int]:
        yield from range(n)

    tracemalloc.start()
    try:
        with cleanbreak.Pool(2, journal=journal) as pool:
            total = sum(pool.imap_unordered(tasks.square, lazy()))
            reused = pool.journal.reused if pool.journal is not None else 0
            _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == sum(x * x for x in range(n)) and reused == n
    # Holding the 40,000 results or keys would take well over 4 MB (it peaks near 0.1 MB).
    assert peak < 2_000_000, f"peak {peak / 1e6:.1f} MB"


def test_a_failure_never_replaces_a_recorded_result(journal: str) -> None:
    """The same task twice in one run, once failing: the result is what the journal keeps."""
    j = Journal(journal)
    j.open()
    try:
        j.bind("x:y")
        j.record(b"a" * 16, 42)
        assert j.flush(10)
        j.record_failure(b"a" * 16, cleanbreak.WorkerDied(-9, 1234))
        j.record_failure(b"b" * 16, cleanbreak.WorkerDied(-9, 1234))
        assert j.flush(10)
        j.record(b"b" * 16, 7)  # a result replaces a failure: the task ran again
        assert j.flush(10)
        assert j.lookup([b"a" * 16, b"b" * 16]) == {b"a" * 16: (42, None), b"b" * 16: (7, None)}
    finally:
        j.close()
    assert _rows(journal) == {1: 2}


def test_a_value_over_sqlites_limit_is_skipped_and_the_rest_kept(
    journal: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from cleanbreak import _journal

    real = _journal._connect

    def small(path: str) -> sqlite3.Connection:
        conn = real(path)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000)  # as if 1 GB were 10 kB
        return conn

    monkeypatch.setattr(_journal, "_connect", small)
    j = Journal(journal)
    j.open()
    try:
        j.bind("x:y")
        j.record(b"a" * 16, 1)
        j.record(b"b" * 16, b"x" * 20_000)
        j.record(b"c" * 16, 3)
        assert j.flush(10)
    finally:
        j.close()
    assert _rows(journal) == {1: 2}
    assert "a result was not journaled: string or blob too big" in capfd.readouterr().err


def test_the_writers_queue_is_bounded(journal: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results that come faster than the disk takes them (tiny tasks) make the pool wait,
    instead of piling up in memory."""
    from cleanbreak import _journal

    monkeypatch.setattr(_journal, "MAX_QUEUED_ROWS", 10)
    release = threading.Event()
    real = Journal._commit

    def held(self: Journal, conn: sqlite3.Connection, batch: list[Any]) -> None:
        release.wait(tasks.GUARD)
        real(self, conn, batch)

    monkeypatch.setattr(Journal, "_commit", held)
    j = Journal(journal)
    j.open()
    recorded: list[int] = []
    over: list[int] = []

    def produce() -> None:
        for i in range(50):
            j.record(i.to_bytes(16, "big"), i)
            if j._queued - j._written > 10:
                over.append(i)
            recorded.append(i)

    try:
        j.bind("x:y")
        producer = threading.Thread(target=produce)
        producer.start()
        deadline = time.monotonic() + tasks.GUARD  # handshake: 10 queued, then it waits
        while len(recorded) < 10 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert recorded == list(range(10))
        release.set()
        producer.join(tasks.GUARD)
        assert j.flush(tasks.GUARD)
    finally:
        release.set()
        j.close()
    assert not over and recorded == list(range(50))
    assert _rows(journal) == {1: 50}


# ── large results: files beside the journal ──────────────────────────────────────────────────


def _big(counter: Path) -> functools.partial[bytes]:
    """A task that returns 2 MiB (past BIG_VALUE) and writes a line to ``counter`` per run."""
    from tests import fault_tasks

    return functools.partial(fault_tasks.large_then_die, str(counter), -1)


def test_large_results_are_files_beside_the_journal(tmp_path: Path, journal: str) -> None:
    counter = tmp_path / "runs"
    first = cleanbreak.map(_big(counter), range(4), workers=2, journal=journal)
    folder = Path(journal + ".d")
    files = sorted(folder.iterdir())
    assert len(files) == 4 and all(f.name.endswith(".pickle") for f in files), files
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    assert os.path.getsize(journal) < BIG_VALUE  # the results are not in the B-tree
    assert Journal.status(journal).done == 4
    # Run again: every result comes back from its file, and nothing runs.
    again = cleanbreak.map(_big(counter), range(4), workers=2, journal=journal)
    assert again == first and len(counter.read_text().split()) == 4


def _parent_pickles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the results this process pickles for the journal (the parent's path)."""
    sizes: list[int] = []
    real = Journal.record

    def record(self: Journal, key: bytes, value: Any) -> None:
        sizes.append(len(pickle.dumps(value, protocol=5)))
        real(self, key, value)

    monkeypatch.setattr(Journal, "record", record)
    return sizes


def test_the_workers_write_large_results_and_the_parent_pickles_none(
    tmp_path: Path, journal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker writes its large results to the folder itself; the parent only renames
    them into place (it would otherwise pickle each one again, and write it, in one thread)."""
    sizes = _parent_pickles(monkeypatch)
    counter = tmp_path / "runs"
    with cleanbreak.Pool(2, journal=journal) as pool:
        first = list(pool.map(_big(counter), range(6)))
    assert sizes == []
    folder = Path(journal + ".d")
    assert sorted(f.name.endswith(".pickle") for f in folder.iterdir()) == [True] * 6
    assert {stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()} == {0o600}
    again = cleanbreak.map(_big(counter), range(6), workers=2, journal=journal)
    assert again == first and len(counter.read_text().split()) == 6


def test_the_parent_writes_what_a_worker_could_not(
    tmp_path: Path, journal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder removed while the pool runs: the workers cannot write there until the
    parent, recording their results itself, has made it again. And a file that is gone
    before the parent renames it: the parent records that result itself too."""
    sizes = _parent_pickles(monkeypatch)
    counter = tmp_path / "runs"
    folder = Path(journal + ".d")
    with cleanbreak.Pool(1, journal=journal) as pool:
        first = list(pool.map(_big(counter), range(1)))
        shutil.rmtree(folder)
        first += list(pool.map(_big(counter), range(1, 4)))
    assert sizes and min(sizes) >= BIG_VALUE, sizes  # the first after the removal at least
    assert len(list(folder.iterdir())) == 3  # the first result's file went with the folder

    real = Journal.record_spilled

    def vanished(self: Journal, key: bytes, name: str) -> bool:
        os.unlink(os.path.join(self.folder, name))
        return real(self, key, name)

    monkeypatch.setattr(Journal, "record_spilled", vanished)
    sizes.clear()
    # Item 0 runs again (its file went with the folder), and items 4 and 5 run.
    again = cleanbreak.map(_big(counter), range(6), workers=2, journal=journal)
    assert again[:4] == first and len(counter.read_text().split()) == 7
    assert len(sizes) == 3 and min(sizes) >= BIG_VALUE, sizes
    assert len(list(folder.iterdir())) == 6
    assert cleanbreak.map(_big(counter), range(6), workers=2, journal=journal) == again
    assert len(counter.read_text().split()) == 7


def test_a_file_a_killed_worker_left_half_written_is_removed_at_close(
    tmp_path: Path, journal: str
) -> None:
    counter = tmp_path / "runs"
    folder = Path(journal + ".d")
    with cleanbreak.Pool(1, journal=journal) as pool:
        list(pool.map(_big(counter), range(1)))
        (folder / ".w99999-1.tmp").write_bytes(b"half")  # what a SIGKILL mid-write leaves
    assert [f.name.endswith(".pickle") for f in folder.iterdir()] == [True]
    cleanbreak.map(tasks.square, range(2), workers=1, journal=Journal(journal, fresh=True))
    assert not folder.exists()  # emptied, and an empty folder goes when the journal closes


def test_fresh_removes_the_files_and_open_removes_what_no_row_names(
    tmp_path: Path, journal: str
) -> None:
    counter = tmp_path / "runs"
    cleanbreak.map(_big(counter), range(2), workers=1, journal=journal)
    folder = Path(journal + ".d")
    # What a SIGKILL can leave: a file renamed into place whose row was not committed, and a
    # file still under its temporary name.
    (folder / ("ab" * 16 + ".pickle")).write_bytes(b"x")
    (folder / ".cd.pickle.tmp").write_bytes(b"x")
    cleanbreak.map(_big(counter), range(2), workers=1, journal=journal)
    assert len(list(folder.iterdir())) == 2
    assert len(counter.read_text().split()) == 2
    cleanbreak.map(tasks.square, range(2), workers=1, journal=Journal(journal, fresh=True))
    assert not folder.exists()  # emptied, and an empty folder goes when the journal closes


def test_a_result_whose_file_is_gone_runs_again(tmp_path: Path, journal: str) -> None:
    counter = tmp_path / "runs"
    first = cleanbreak.map(_big(counter), range(3), workers=1, journal=journal)
    next(Path(journal + ".d").iterdir()).unlink()
    assert cleanbreak.map(_big(counter), range(3), workers=1, journal=journal) == first
    assert len(counter.read_text().split()) == 4


def test_a_folder_of_large_results_that_is_not_the_users_is_refused(
    tmp_path: Path, journal: str
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, journal + ".d")
    with pytest.raises(JournalError, match=r"is not a folder of yours.*remove it"):
        cleanbreak.Pool(1, journal=journal)
