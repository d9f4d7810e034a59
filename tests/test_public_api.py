"""The public surface: names, types, the exception hierarchy, typing marker."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import pickle
import signal
import subprocess
import sys
import tomllib
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import cleanbreak

EXPECTED_ALL = {
    "BrokenPool",
    "CleanbreakError",
    "Interrupted",
    "Journal",
    "JournalError",
    "JournalStatus",
    "Pool",
    "RemoteTraceback",
    "SerializationError",
    "TaskAborted",
    "TaskOptions",
    "TaskOptionsView",
    "TaskTimeout",
    "WorkerDied",
    "__version__",
    "default_workers",
    "map",
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(cleanbreak.__all__) == EXPECTED_ALL
    assert len(cleanbreak.__all__) == len(EXPECTED_ALL), "duplicates in __all__"


@pytest.mark.parametrize("name", sorted(EXPECTED_ALL))
def test_every_public_name_is_importable(name: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"from cleanbreak import {name}", namespace)
    assert namespace[name] is getattr(cleanbreak, name)


def test_star_import_gives_the_public_api() -> None:
    namespace: dict[str, Any] = {}
    exec("from cleanbreak import *", namespace)
    assert namespace.keys() >= EXPECTED_ALL


def test_pool_is_an_executor() -> None:
    assert issubclass(cleanbreak.Pool, Executor)


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        (cleanbreak.Interrupted, KeyboardInterrupt),
        (cleanbreak.WorkerDied, BrokenProcessPool),
        (cleanbreak.WorkerDied, cleanbreak.CleanbreakError),
        (cleanbreak.BrokenPool, BrokenProcessPool),
        (cleanbreak.BrokenPool, cleanbreak.CleanbreakError),
        (cleanbreak.SerializationError, pickle.PicklingError),
        (cleanbreak.SerializationError, cleanbreak.CleanbreakError),
        (cleanbreak.TaskAborted, cleanbreak.CleanbreakError),
        (cleanbreak.TaskTimeout, TimeoutError),
        (cleanbreak.TaskTimeout, cleanbreak.CleanbreakError),
        (cleanbreak.JournalError, cleanbreak.CleanbreakError),
        (cleanbreak.CleanbreakError, Exception),
        (cleanbreak.RemoteTraceback, Exception),
    ],
)
def test_exception_hierarchy(cls: type[BaseException], base: type[BaseException]) -> None:
    assert issubclass(cls, base)


def test_interrupted_is_not_an_exception() -> None:
    # ``except Exception`` around a map must not swallow Ctrl-C.
    assert not issubclass(cleanbreak.Interrupted, Exception)
    assert not issubclass(cleanbreak.TaskAborted, KeyboardInterrupt)


def test_py_typed_ships() -> None:
    assert importlib.resources.files("cleanbreak").joinpath("py.typed").is_file()
    # ... and the build puts it in the wheel.
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["cleanbreak"]


def test_version_matches_the_distribution() -> None:
    assert cleanbreak.__version__ == importlib.metadata.version("cleanbreak")


def test_default_workers_is_the_usable_cpu_count() -> None:
    n = cleanbreak.default_workers()
    assert isinstance(n, int)
    assert n >= 1
    assert n == len(os.sched_getaffinity(0))


def test_pool_defaults_to_default_workers() -> None:
    with cleanbreak.Pool() as pool:
        assert pool.workers == cleanbreak.default_workers()


@pytest.mark.parametrize("workers", [1, 3])
def test_pool_reports_its_worker_count(workers: int) -> None:
    with cleanbreak.Pool(workers, mp_context="fork") as pool:
        assert pool.workers == workers


@pytest.mark.parametrize(
    "exc",
    [
        cleanbreak.WorkerDied(-signal.SIGKILL, 1234, 5),
        cleanbreak.WorkerDied(3, 1234, None),
        cleanbreak.TaskAborted("SystemExit", "3"),
        cleanbreak.TaskTimeout(2.5, 1234, 7),
        cleanbreak.SerializationError("result", "no"),
        cleanbreak.Interrupted(signal.SIGTERM, {0: "a"}, total=3),
        cleanbreak.RemoteTraceback("Traceback ..."),
    ],
    ids=repr,
)
def test_errors_survive_pickling(exc: BaseException) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert vars(copy) == vars(exc)


def test_worker_died_names_the_exit_code_or_signal() -> None:
    by_signal = cleanbreak.WorkerDied(-signal.SIGKILL, 1234, 5)
    assert by_signal.signal == signal.SIGKILL
    assert by_signal.exitcode == -signal.SIGKILL
    assert "SIGKILL" in str(by_signal)
    assert "1234" in str(by_signal)
    by_code = cleanbreak.WorkerDied(3, 1234)
    assert by_code.signal is None
    assert "code 3" in str(by_code)


def test_the_core_imports_without_third_party_packages(tmp_path: Path) -> None:
    """Only the standard library: rich (the cli extra) is imported when a bar is drawn."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'rich', 'numpy', 'psutil'}:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import cleanbreak, cleanbreak._cli\n"
        "from cleanbreak._progress import Progress\n"
        "p = Progress(lambda: (1, 0, 0), 2, stream=open(__import__('os').devnull, 'w'))\n"
        "p.stop('done')\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_a_first_use_imports_nothing_it_does_not_need(tmp_path: Path) -> None:
    """A program's first pool, through each face, imports neither ``typing`` (about 3 ms: the
    modules name it only under ``if TYPE_CHECKING:``) nor the modules only some pools use."""
    script = tmp_path / "first.py"
    script.write_text(
        "import sys\n"
        "def inc(x):\n"
        "    return x + 1\n"
        "if __name__ == '__main__':\n"
        "    from cleanbreak.multiprocessing import Pool\n"
        "    with Pool(2) as p:\n"
        "        assert p.map(inc, range(100)) == list(range(1, 101))\n"
        "        assert p.apply_async(inc, (1,)).get() == 2\n"
        "    import cleanbreak\n"
        "    assert cleanbreak.map(inc, range(10), workers=2, mp_context='fork') == list(\n"
        "        range(1, 11))\n"
        "    with cleanbreak.Pool(2, mp_context='fork') as pool:\n"
        "        assert pool.submit(inc, 1).result() == 2\n"
        "        assert list(pool.map(inc, range(10))) == list(range(1, 11))\n"
        "    heavy = ['typing', 'dataclasses', 'ctypes', 'sqlite3', 'asyncio',\n"
        "             'cleanbreak._journal', 'cleanbreak._progress', 'cleanbreak._dask']\n"
        "    print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], check=False, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "[]", (out.stdout, out.stderr)
