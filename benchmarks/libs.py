"""The libraries compared, and each one's ``map`` as its own documentation shows it.

Peer libraries are imported inside the functions that use them, so that a child process loads
only the library it measures, and a missing peer only empties its own rows.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

MP = "multiprocessing"
CF = "concurrent.futures"
LOKY = "loky"
PEBBLE = "pebble"
MPIRE = "mpire"
JOBLIB = "joblib"
CB = "cleanbreak"

LIBRARIES: tuple[str, ...] = (MP, CF, LOKY, PEBBLE, MPIRE, JOBLIB, CB)
_DISTRIBUTIONS = {
    LOKY: "loky",
    PEBBLE: "Pebble",
    MPIRE: "mpire",
    JOBLIB: "joblib",
    CB: "cleanbreak",
}

MapFn = Callable[[Callable[[Any], Any], list[Any]], list[Any]]


def available(lib: str) -> bool:
    return lib in (MP, CF) or importlib.util.find_spec(lib) is not None


def version(lib: str) -> str:
    if lib in (MP, CF):
        return f"stdlib (Python {sys.version.split()[0]})"
    try:
        return importlib.metadata.version(_DISTRIBUTIONS[lib])
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def pool_chunksize(n: int, workers: int) -> int:
    """The chunksize ``multiprocessing.Pool.map`` picks for ``n`` items: about 4 per worker."""
    return max(1, math.ceil(n / (workers * 4)))


@dataclass(frozen=True)
class Variant:
    """One way of calling one library's ``map``."""

    key: str
    lib: str
    label: str
    chunked: bool = False  # passes the chunksize Pool.map would pick (the peer's default is 1)
    fresh: bool = False  # the timed call starts (and stops) the workers itself
    # Too slow per call to run the full tiny-task count in the time budget: timed on this many
    # calls instead, and extrapolated.
    tiny_calls: int | None = None


MAP_VARIANTS: tuple[Variant, ...] = (
    Variant("mp", MP, "multiprocessing.Pool.map"),
    Variant("cf", CF, "ProcessPoolExecutor.map (chunksize=1, default)", tiny_calls=10_000),
    Variant("cf-chunk", CF, "ProcessPoolExecutor.map (chunksize as Pool.map)", chunked=True),
    Variant("loky", LOKY, "loky executor.map (chunksize=1, default)", tiny_calls=10_000),
    Variant("loky-chunk", LOKY, "loky executor.map (chunksize as Pool.map)", chunked=True),
    Variant("pebble", PEBBLE, "pebble ProcessPool.map (chunksize=1, default)", tiny_calls=20_000),
    Variant(
        "pebble-chunk",
        PEBBLE,
        "pebble ProcessPool.map (chunksize as Pool.map)",
        chunked=True,
        tiny_calls=400_000,
    ),
    Variant("mpire", MPIRE, "mpire WorkerPool.map", fresh=True, tiny_calls=400_000),
    Variant("joblib", JOBLIB, "joblib Parallel(n_jobs)(delayed(f)(x) …)", tiny_calls=400_000),
    Variant("cb", CB, "cleanbreak Pool.map"),
    Variant("cb-imap", CB, "cleanbreak Pool.imap_unordered"),
    Variant("cb-fn", CB, "cleanbreak.map", fresh=True),
)
VARIANTS = {v.key: v for v in MAP_VARIANTS}

# The variants that use each library's default chunking: for tasks long enough that chunking
# does not matter, and for payloads, where there are only a few items.
DEFAULT_VARIANTS: tuple[str, ...] = ("mp", "cf", "loky", "pebble", "mpire", "joblib", "cb", "cb-fn")


@contextmanager
def mapper(key: str, workers: int, chunksize: int) -> Iterator[MapFn]:
    """An open pool of ``workers`` for variant ``key``, and a ``map(fn, items) -> list``.

    ``chunksize`` is used only by the ``chunked`` variants. Each call returns every result.
    """
    variant = VARIANTS[key]
    cs = chunksize if variant.chunked else 1
    if key == "mp":
        import multiprocessing

        with multiprocessing.Pool(workers) as mp_pool:
            yield mp_pool.map
    elif key in ("cf", "cf-chunk"):
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as executor:
            yield lambda fn, items: list(executor.map(fn, items, chunksize=cs))
    elif key in ("loky", "loky-chunk"):
        from loky import get_reusable_executor

        loky_executor = get_reusable_executor(max_workers=workers)
        yield lambda fn, items: list(loky_executor.map(fn, items, chunksize=cs))
    elif key in ("pebble", "pebble-chunk"):
        from pebble import ProcessPool

        with ProcessPool(max_workers=workers) as pebble_pool:
            yield lambda fn, items: list(pebble_pool.map(fn, items, chunksize=cs).result())
    elif key == "mpire":
        from mpire.pool import WorkerPool

        with WorkerPool(n_jobs=workers) as mpire_pool:
            # Its default joins numpy results into one array; every other library returns a list.
            yield lambda fn, items: list(mpire_pool.map(fn, items, concatenate_numpy_output=False))
    elif key == "joblib":
        from joblib import Parallel, delayed

        def joblib_map(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
            run = Parallel(n_jobs=workers, backend="loky")
            return list(run(delayed(fn)(x) for x in items))

        yield joblib_map
    elif key in ("cb", "cb-imap"):
        import cleanbreak

        with cleanbreak.Pool(workers) as cb_pool:
            if key == "cb":
                yield lambda fn, items: list(cb_pool.map(fn, items))
            else:
                yield lambda fn, items: list(cb_pool.imap_unordered(fn, items))
    elif key == "cb-fn":
        import cleanbreak

        yield lambda fn, items: cleanbreak.map(fn, items, workers=workers)
    else:
        raise ValueError(f"unknown variant {key!r}")
