"""``cleanbreak demo --notebook``: the notebook it writes runs, stops at the interrupt button
keeping what finished, and finishes the job when its cell is run again."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cleanbreak._cli import count_primes
from tests.tasks import GUARD

from ._kernel import Kernel

pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, blocks: int) -> dict[str, str]:
    """Write the demo notebook with the command a user runs; its code cells, by id."""
    proc = subprocess.run(
        [sys.executable, "-m", "cleanbreak", "demo", "--notebook", "--blocks", str(blocks)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=GUARD,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cleanbreak-demo.ipynb" in proc.stdout
    notebook = json.loads((tmp_path / "cleanbreak-demo.ipynb").read_text())
    return {c["id"]: c["source"] for c in notebook["cells"] if c["cell_type"] == "code"}


def _primes(blocks: int) -> int:
    return sum(count_primes(b) for b in range(blocks))


def test_the_demo_notebook_runs_top_to_bottom(tmp_path: Path) -> None:
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    _write(tmp_path, 8)
    path = tmp_path / "cleanbreak-demo.ipynb"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    client = nbclient.NotebookClient(
        notebook, timeout=int(GUARD), resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    job = next(c for c in notebook.cells if c.get("id") == "job")
    texts = [o.get("text", "") for o in job.outputs if o.get("output_type") == "stream"]
    assert "".join(texts) == f"All 8 blocks: {_primes(8):,} primes.\n"
    assert not [o for o in job.outputs if o.get("name") == "stderr"], job.outputs


def test_the_interrupt_button_then_the_same_cell_again_finishes_the_job(tmp_path: Path) -> None:
    blocks = 24
    cells = _write(tmp_path, blocks)
    kernel = Kernel(tmp_path)
    try:
        kernel.ok(cells["task"])
        kernel.ok(cells["pool"])
        cell = kernel.start(cells["job"])
        _wait_recorded(tmp_path / "cleanbreak-demo.sqlite", 4)
        kernel.interrupt()
        kernel.wait(cell)
        assert cell.status == "ok", cell.summary()
        assert cell.stderr == "", cell.summary()
        kept = int(cell.stdout.split("kept ")[1].split(" ")[0])
        assert 4 <= kept < blocks, cell.stdout
        again = kernel.ok(cells["job"])
        assert again.stdout == f"All {blocks} blocks: {_primes(blocks):,} primes.\n"
        assert again.stderr == ""
        kernel.ok(cells["end"])
    finally:
        kernel.shutdown()


def _wait_recorded(path: Path, n: int) -> None:
    """Wait until the journal holds ``n`` results (the job is running): the handshake."""
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        if path.exists():
            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                    (count,) = conn.execute("SELECT count(*) FROM outcomes WHERE ok = 1").fetchone()
                conn.close()
            except sqlite3.Error:
                count = 0
            if count >= n:
                return
        time.sleep(0.01)
    raise AssertionError(f"the journal never held {n} results")
