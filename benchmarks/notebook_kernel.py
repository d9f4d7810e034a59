"""A real IPython kernel, driven as a notebook front end drives it, for measurement 13.

``Kernel`` starts ``python -m ipykernel_launcher`` with this Python through
``jupyter_client``'s ``KernelManager`` (over Unix sockets), runs cells in it with
``execute_interactive`` and collects what each cell sent back: its status, the text it
printed, its error and the value of its last expression. The kernel runs in a session of its
own (``jupyter_client`` starts it with ``start_new_session``, so that its interrupt reaches the
whole process group), so a scan of that session finds every worker and helper the cell's pools
started, also after the kernel is gone; ``close()`` kills what is left there.

It needs ``ipykernel`` and ``jupyter_client`` (in cleanbreak's ``test`` extra). A small driver
of its own, rather than the tests' ``tests/system/_kernel.py``, so that the benchmarks do not
import the test suite.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import session_members

START_TIMEOUT = 60.0  # for the kernel to answer its first message


def available() -> str:
    """'' when a kernel can be driven here, else what is missing."""
    missing = [m for m in ("ipykernel", "jupyter_client") if importlib.util.find_spec(m) is None]
    return ", ".join(missing)


@dataclass
class CellResult:
    """What one cell sent back."""

    status: str = ""  # "ok", "error", or "timeout" (the cell did not finish in time)
    stdout: str = ""
    stderr: str = ""
    error: str = ""  # "ename: evalue" of the error the cell ended with
    value: Any = None  # its last expression, as a Python literal (None if it had none)
    messages: list[str] = field(default_factory=list)  # iopub message types, in order

    def why(self) -> str:
        """One line on what went wrong, for a report."""
        if self.status == "timeout":
            return "the cell did not finish in time"
        text = self.error or self.stderr.strip() or f"status {self.status!r}"
        return " ".join(text.split())[:300]


class Kernel:
    """One IPython kernel in ``cwd``, with a fresh IPython profile folder (no startup files)."""

    def __init__(self, cwd: Path) -> None:
        from jupyter_client.manager import KernelManager

        self._dir = Path(tempfile.mkdtemp(prefix="cbnb-"))  # short: a socket path is < 108 B
        env = dict(os.environ)
        env.pop("PYTHONSTARTUP", None)
        env["IPYTHONDIR"] = str(self._dir / "ipython")
        env["JUPYTER_PLATFORM_DIRS"] = "1"  # jupyter_core's own future default, no warning
        self.manager = KernelManager(
            transport="ipc", connection_file=str(self._dir / "kernel.json")
        )
        self.manager.ip = str(self._dir / "ipc")
        spec = self.manager.kernel_spec
        assert spec is not None
        spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        self.started = time.monotonic()
        # The kernel's own output, and what its children write there (a worker's traceback),
        # to a file rather than the runner's stderr: ``last_output()`` reads it.
        self._log = self._dir / "kernel.log"
        with open(self._log, "wb") as sink:
            self.manager.start_kernel(
                cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
            )
        provisioner: Any = self.manager.provisioner
        self.pid = int(provisioner.process.pid)
        self.client = self.manager.client()
        self.client.start_channels()
        try:
            self.client.wait_for_ready(timeout=START_TIMEOUT)
        except BaseException:
            self.close()
            raise
        self.ready = time.monotonic()

    def run(self, code: str, timeout: float) -> CellResult:
        """Run one cell to its end (at most ``timeout`` seconds) and return what it sent."""
        cell = CellResult()

        def hook(msg: dict[str, Any]) -> None:
            kind = msg["msg_type"]
            content = msg["content"]
            cell.messages.append(kind)
            if kind == "stream":
                if content["name"] == "stdout":
                    cell.stdout += content["text"]
                else:
                    cell.stderr += content["text"]
            elif kind == "error":
                cell.error = f"{content['ename']}: {content['evalue']}"
            elif kind == "execute_result":
                text = content["data"].get("text/plain", "")
                try:
                    cell.value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    cell.value = text

        try:
            reply = self.client.execute_interactive(code, timeout=timeout, output_hook=hook)
        except TimeoutError:
            cell.status = "timeout"
            return cell
        cell.status = str(reply["content"]["status"])
        if cell.status == "error" and not cell.error:
            content = reply["content"]
            cell.error = f"{content.get('ename')}: {content.get('evalue')}"
        return cell

    def last_output(self) -> str:
        """The last line the kernel, or a process it started, wrote to its stdout or stderr."""
        try:
            lines = self._log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")[:300]

    def processes(self) -> list[str]:
        """What runs in the kernel's session now, besides the kernel: one name for each
        process (its workers, and helpers such as a fork server or a resource tracker)."""
        names = []
        for proc in session_members(self.pid, exclude=self.pid):
            try:
                command = " ".join(proc.cmdline())
                parent = proc.ppid()
            except Exception:
                continue
            if "resource_tracker" in command:
                names.append("resource tracker")
            elif "forkserver" in command:
                names.append("fork server" if parent == self.pid else "fork server's child")
            elif "loky" in command:
                names.append("loky worker")
            elif parent == self.pid:
                names.append("child of the kernel")
            else:
                names.append("other process")
        return sorted(names)

    def close(self) -> None:
        """Kill the kernel and whatever is left in its session.

        Killed, not asked to shut down: ipykernel's shutdown ends the kernel's children first,
        with SIGTERM and then rising delays, and a resource tracker (which multiprocessing
        starts for forkserver and spawn pools, and so cleanbreak's) ignores SIGTERM, so a
        polite shutdown takes seconds. Nothing is timed here; ``processes()`` before this
        says what was left.
        """
        with contextlib.suppress(Exception):
            self.client.stop_channels()
        with contextlib.suppress(Exception):
            self.manager.shutdown_kernel(now=True)
        deadline = time.monotonic() + 5
        while (left := session_members(self.pid)) and time.monotonic() < deadline:
            for proc in left:
                with contextlib.suppress(Exception):
                    proc.kill()
            time.sleep(0.02)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
