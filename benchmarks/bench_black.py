"""Measurement 12: a real client, black, with ``cleanbreak.Pool`` in its executor's place.

black formats files in parallel through asyncio's ``loop.run_in_executor`` on a
``ProcessPoolExecutor``, one task per file. Here black formats the first ``FILES`` modules of
this Python's standard library (sorted by name), a fresh copy each time, on ``--workers``
processes, as shipped (``stock``) and with ``cleanbreak.Pool`` put in the executor's place
(``black_client.py``); the output of the two must be byte for byte the same. Beside it, a
microbenchmark: 100 tasks that busy-wait 50 ms through ``run_in_executor``, which shows the
cost per ``submit`` task. Each (form, job, repetition) runs in a fresh process, the forms in
turn; the time is from making the executor to the end of its shutdown, a fresh pool each time
(no warm-up).
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from common import Section, Settings, fmt_ratio, fmt_seconds, median, progress, rotated

FILES, FILES_QUICK = 168, 40
CLIENT = Path(__file__).with_name("black_client.py")
FORMS = ("stock", "cleanbreak")


def _sources(count: int) -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))[:count]


def _run(form: str, workers: int, job: str, folder: Path | None) -> dict[str, float]:
    argv = [sys.executable, str(CLIENT), form, str(workers), job]
    if folder is not None:
        argv.append(str(folder))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{form} {job}: exit {done.returncode}: {done.stderr[-400:]}")
    out: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors and len(match) == len(names)


def run_black(settings: Settings) -> Section:
    import importlib.util

    section = Section(
        name="black",
        title="12. A real client: black through run_in_executor",
        intro=__doc__.split("\n\n", 1)[1].strip().replace("\n", " ") if __doc__ else "",
        header=["Job", "stock `ProcessPoolExecutor`", "`cleanbreak.Pool`", "cleanbreak vs stock"],
    )
    if importlib.util.find_spec("black") is None:
        section.rows.append(["black", "not measured (pip install black)", "—", "—"])
        return section
    files = _sources(FILES_QUICK if settings.quick else FILES)
    reps = settings.repetitions(3, 1)
    times: dict[tuple[str, str], list[float]] = {}
    identical = True
    with tempfile.TemporaryDirectory(prefix="cb-black-") as tmp:
        for rep in range(reps):
            outputs: dict[str, Path] = {}
            for form in rotated(FORMS, rep):
                folder = Path(tmp) / f"{form}-{rep}"
                folder.mkdir()
                for src in files:
                    shutil.copy(src, folder / src.name)
                seconds = _run(form, settings.workers, "black", folder)["seconds"]
                times.setdefault(("black", form), []).append(seconds)
                outputs[form] = folder
                progress(f"  black rep {rep + 1}/{reps} {form}: {fmt_seconds(seconds)}")
            identical = identical and _same(outputs["stock"], outputs["cleanbreak"])
            for folder in outputs.values():
                shutil.rmtree(folder)
            for form in rotated(FORMS, rep):
                got = _run(form, settings.workers, "micro", None)
                times.setdefault(("micro", form), []).append(got["seconds"])
                for what in ("first_start", "median_gap"):
                    times.setdefault((what, form), []).append(got[what])
                progress(
                    f"  micro rep {rep + 1}/{reps} {form}: {fmt_seconds(got['seconds'])}, first "
                    f"task at {got['first_start'] * 1e3:.1f} ms, median gap between two tasks "
                    f"{got['median_gap'] * 1e3:.2f} ms"
                )
    jobs = {
        "black": f"black on {len(files)} standard-library files",
        "micro": "100 tasks of 50 ms (busy) through `run_in_executor`",
    }
    for job, label in jobs.items():
        stock = median(times[(job, "stock")])
        cb = median(times[(job, "cleanbreak")])
        section.rows.append([label, fmt_seconds(stock), fmt_seconds(cb), fmt_ratio(stock / cb)])
    ms = {key: median(values) * 1e3 for key, values in times.items()}
    section.notes.append(
        "Where the microbenchmark's time goes (medians): the first task started "
        f"{ms[('first_start', 'cleanbreak')]:.1f} ms after `Pool()` was called, against "
        f"{ms[('first_start', 'stock')]:.1f} ms for the stock executor; between a task's end "
        "and the next task's start in the same worker, a median "
        f"{ms[('median_gap', 'cleanbreak')]:.2f} ms, against "
        f"{ms[('median_gap', 'stock')]:.2f} ms (a `submit` task is sent only to an idle "
        "worker, so that `Future.cancel()` works until it starts: each waits for the parent's "
        "round trip)."
    )
    section.notes.append(
        f"Medians of {reps} fresh runs each on {settings.workers} workers; a ratio above 1.00x "
        "means cleanbreak took less time. black's output was "
        + ("byte for byte the same" if identical else "NOT the same")
        + " with both executors."
    )
    return section
