"""A cluster started as a user would start one on two machines: ``dask scheduler`` and two
``dask worker`` processes, each from Dask's own command line. A client connects through the
address, maps, and is Ctrl-C'd; the cluster must be idle after, and still serve a plain
``Client.map``. ``cleanbreak run --dask`` runs a job on it from the shell."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cleanbreak import _dask
from tests import dask_tasks, tasks

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

GUARD = 60.0
ROOT = Path(__file__).resolve().parents[2]
DASK = Path(sys.executable).parent / "dask"
CHILD = Path(__file__).parent / "scripts" / "dask_child.py"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory, distributed: Any) -> Iterator[str]:
    if not DASK.exists():
        pytest.skip("the dask command is not installed")
    tmp = tmp_path_factory.mktemp("cluster")
    info = tmp / "scheduler.json"
    procs: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> None:
        with open(tmp / f"log{len(procs)}", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [str(DASK), *argv],
                    env=_env(),
                    cwd=ROOT,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            )

    try:
        start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(info))  # fmt: skip
        deadline = time.monotonic() + GUARD
        while not info.exists() or not info.read_text().strip():
            assert time.monotonic() < deadline, (tmp / "log0").read_text()
            time.sleep(0.05)
        addr = str(json.loads(info.read_text())["address"])
        for _ in range(2):
            start("worker", addr, "--nworkers", "1", "--nthreads", "1", "--no-dashboard")
        with distributed.Client(addr, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=GUARD)
        yield addr
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_ctrl_c_leaves_the_cluster_idle_and_serving(
    address: str, tmp_path: Path, distributed: Any
) -> None:
    folder = tmp_path / "marks"
    folder.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), address, str(folder), "--seconds", "0.5"],
        env=_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + GUARD
        while len(dask_tasks.marks(str(folder), "end")) < 2:  # handshake: results came in
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        sent = time.monotonic_ns()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=GUARD)
        took = (time.monotonic_ns() - sent) / 1e9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert took < 5.0, took
    report = json.loads(out)
    kept = {v[0] for v in report["yielded"]} | {int(k) for k in report["completed"]}
    ends = dask_tasks.marks(str(folder), "end")
    assert {i for i, t in ends.items() if t < sent - 1_000_000} <= kept
    assert not [i for i, t in ends.items() if t > sent + 100_000_000]  # stopped, not run out
    with distributed.Client(address, set_as_default=False) as client:
        deadline = time.monotonic() + GUARD
        while True:
            running = client.run(_dask.running_here)
            if not any(client.processing().values()) and not any(running.values()):
                break
            assert time.monotonic() < deadline, (client.processing(), running)
            time.sleep(0.02)
        assert client.gather(client.map(tasks.square, range(10))) == [x * x for x in range(10)]


def test_cleanbreak_run_on_the_cluster(address: str, tmp_path: Path) -> None:
    inputs = tmp_path / "in.txt"
    inputs.write_text("".join(f"{x}\n" for x in range(20)))
    out = tmp_path / "out.jsonl"
    env = dict(_env(), XDG_CACHE_HOME=str(tmp_path / "c"))
    # The workers' environment is theirs (no RUN_LOG there): a function that needs none.
    argv = [sys.executable, "-m", "cleanbreak", "run", "tests.cli_tasks:describe", str(inputs)]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, "--dask", address, *extra],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=GUARD,
            check=False,
        )

    done = run("--output", str(out))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["input"] for r in records) == list(range(20))
    assert all(r["result"] == {"type": "int", "value": r["input"]} for r in records)
    bad = run("--workers", "2")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "cleanbreak run: error: --workers is for a local pool; with --dask the cluster's "
        "workers run the tasks: drop --workers"
    ]
