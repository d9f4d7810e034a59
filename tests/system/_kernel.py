"""A real IPython kernel, driven as a notebook front end drives it (``jupyter_client``).

``Kernel`` starts one with this Python (``ipykernel``), runs cells in it and collects what
the cell showed: the text it printed (stdout and stderr, the workers' included, since ipykernel
forwards the kernel's file descriptors), the error it ended with, and the displays it sent.
``interrupt()`` is the notebook's interrupt button: ``KernelManager.interrupt_kernel()``,
which sends SIGINT to the kernel's process group.

Every wait is bounded by a deadlock guard, never used to synchronise: a cell that must be
interrupted at a known moment prints a marker, and the test waits for that marker.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

GUARD = 60.0  # deadlock guard for a cell, or for a kernel to start
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cell:
    """What a cell sent back while it ran."""

    msg_id: str
    status: str = ""  # "ok" or "error", from the execute reply
    stdout: str = ""
    stderr: str = ""
    error: dict[str, Any] | None = None  # ename, evalue, traceback (the error message)
    displays: list[dict[str, Any]] = field(default_factory=list)  # display and update messages
    result: dict[str, Any] | None = None  # the execute_result's data
    messages: list[dict[str, Any]] = field(default_factory=list)  # every iopub message
    done: bool = False  # the kernel went idle after it

    @property
    def text(self) -> str:
        """The cell's result as text (``text/plain`` of its last expression)."""
        assert self.result is not None, f"the cell returned nothing: {self.summary()}"
        return str(self.result.get("text/plain", ""))

    def value(self) -> Any:
        """The cell's last expression, as a Python literal."""
        import ast

        return ast.literal_eval(self.text)

    def summary(self) -> str:
        error = self.error or {}
        tb = "\n".join(error.get("traceback", []))
        return (
            f"status {self.status!r}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}\n"
            f"error: {error.get('ename')}: {error.get('evalue')}\n{tb}"
        )


class Kernel:
    """One IPython kernel process, started with this Python in ``cwd``."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        from jupyter_client.manager import KernelManager  # the test extra has it

        environ = dict(os.environ)
        # The kernel imports the tests' own modules (and cleanbreak, from where pytest does).
        environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(ROOT / "src"), *filter(None, [environ.get("PYTHONPATH")])]
        )
        environ.pop("PYTEST_CURRENT_TEST", None)
        environ.update(env or {})
        # Over Unix sockets (over TCP the kernel warns on its stderr), in a folder with a
        # short name: a socket's path may not be longer than 107 bytes.
        self._sockets = tempfile.mkdtemp(prefix="cbk-")
        self.manager = KernelManager(
            transport="ipc", connection_file=os.path.join(self._sockets, "kernel.json")
        )
        self.manager.ip = os.path.join(self._sockets, "ipc")
        spec = self.manager.kernel_spec
        assert spec is not None
        spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        self.manager.start_kernel(cwd=str(cwd), env=environ)
        self.client = self.manager.client()
        self.client.start_channels()
        try:
            self.client.wait_for_ready(timeout=GUARD)
        except BaseException:
            self.shutdown()
            raise
        self._cells: dict[str, Cell] = {}

    @property
    def pid(self) -> int:
        provisioner: Any = self.manager.provisioner
        return int(provisioner.process.pid)

    def alive(self) -> bool:
        return bool(self.manager.is_alive())

    def start(self, code: str) -> Cell:
        """Send a cell to run; it runs while the test goes on (see ``wait``)."""
        msg_id = self.client.execute(code, store_history=True)
        cell = Cell(msg_id)
        self._cells[msg_id] = cell
        return cell

    def run(self, code: str, timeout: float = GUARD) -> Cell:
        """Run a cell to its end."""
        return self.wait(self.start(code), timeout)

    def ok(self, code: str, timeout: float = GUARD) -> Cell:
        """Run a cell that must succeed."""
        cell = self.run(code, timeout)
        assert cell.status == "ok", cell.summary()
        return cell

    def wait_for_output(self, cell: Cell, marker: str, timeout: float = GUARD) -> None:
        """Wait until the cell has printed ``marker`` (a handshake with the cell)."""
        deadline = time.monotonic() + timeout
        while marker not in cell.stdout:
            assert not cell.done, f"the cell ended before printing {marker!r}: {cell.summary()}"
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} from the cell: {cell.summary()}"
            self._pump(left)

    def wait(self, cell: Cell, timeout: float = GUARD) -> Cell:
        """Wait until the kernel is idle after the cell and its reply has come."""
        deadline = time.monotonic() + timeout
        while not cell.done:
            left = deadline - time.monotonic()
            assert left > 0, f"the cell did not finish: {cell.summary()}"
            self._pump(left)
        while not cell.status:
            left = deadline - time.monotonic()
            assert left > 0, f"no reply to the cell: {cell.summary()}"
            try:
                reply = self.client.get_shell_msg(timeout=left)
            except queue.Empty:
                continue
            owner = self._cells.get(reply["parent_header"].get("msg_id"))
            if owner is not None:
                owner.status = reply["content"]["status"]
        return cell

    def _pump(self, timeout: float) -> None:
        """Take one iopub message (waiting at most ``timeout``) and file it with its cell."""
        try:
            msg = self.client.get_iopub_msg(timeout=min(timeout, 1.0))
        except queue.Empty:
            return
        cell = self._cells.get(msg["parent_header"].get("msg_id"))
        if cell is None:
            return
        kind = msg["msg_type"]
        content = msg["content"]
        cell.messages.append(msg)
        if kind == "stream":
            if content["name"] == "stdout":
                cell.stdout += content["text"]
            else:
                cell.stderr += content["text"]
        elif kind == "error":
            cell.error = content
        elif kind in ("display_data", "update_display_data"):
            cell.displays.append(msg)
        elif kind == "execute_result":
            cell.result = content["data"]
        elif kind == "status" and content["execution_state"] == "idle":
            cell.done = True

    def interrupt(self) -> int:
        """Press the interrupt button; returns the moment it was pressed (monotonic ns)."""
        sent = time.monotonic_ns()
        self.manager.interrupt_kernel()
        return sent

    def descendants(self) -> list[psutil.Process]:
        """The kernel's child processes, and theirs (its workers, its fork server)."""
        try:
            return list(psutil.Process(self.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return []

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.client.stop_channels()
        with contextlib.suppress(Exception):
            self.manager.shutdown_kernel(now=True)
        shutil.rmtree(self._sockets, ignore_errors=True)
