"""A Ctrl-C whose handler would run inside the import system's own code is put off until that
code has returned (``_signals._in_finalizer``).

importlib takes the global import lock just before a ``try`` (``_imp.acquire_lock()``, then
``try: ... finally: _imp.release_lock()``): an exception raised between the two leaves the lock
held for good, and the next ``os.fork()`` or import in another thread waits for ever (a stress
run hung so, its manager thread in ``fork``). The child puts a stand-in for
``_imp.acquire_lock`` in place whose code counts as importlib's (its file name is importlib's),
which takes the real lock and then signals the process once: the handler runs right there,
where importlib would have no ``try`` yet. The import must go through, the ``Interrupted``
come a moment later in the caller's code, and the import lock be free.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tests.tasks import GUARD, run_script

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import _imp, json, os, signal, sys, tempfile, time
    import cleanbreak

    STAND_IN = '''
    def acquire_lock():
        real()
        if armed:
            armed.pop()
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode
    '''


    def main():
        folder = tempfile.mkdtemp()
        with open(os.path.join(folder, "freshly_imported.py"), "w") as f:
            f.write("X = 1\\n")
        sys.path.insert(0, folder)
        real = _imp.acquire_lock
        space = {"real": real, "armed": [True], "os": os, "signal": signal}
        exec(compile(STAND_IN, "<frozen importlib._bootstrap>", "exec"), space)
        report = {}
        try:
            with cleanbreak.Pool(2) as pool:
                pool.submit(abs, -1).result()
                _imp.acquire_lock = space["acquire_lock"]
                try:
                    import freshly_imported
                    report["imported"] = freshly_imported.X
                    for _ in range(2000):
                        time.sleep(0.001)
                    report["ended"] = "without Interrupted"
                finally:
                    _imp.acquire_lock = real
        except cleanbreak.Interrupted:
            report["ended"] = "Interrupted"
        report["import lock held"] = _imp.lock_held()
        print(json.dumps(report), flush=True)


    if __name__ == "__main__":
        main()
    """
)


def test_a_ctrl_c_in_importlib_code_is_raised_after_it(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = run_script(script, GUARD, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"imported": 1, "ended": "Interrupted", "import lock held": False}, report
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
