"""Payload size never deadlocks, and large payloads arrive intact (contract 4).

Large buffers normally travel through shared memory (``tests/test_shm.py``); the tests that
take a ``transport`` also run with it switched off, as on a system without ``/dev/shm``, so that
the pipes alone carry 200 MB each way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest

import cleanbreak
from cleanbreak import _shm
from cleanbreak._manager import LocalBackend
from tests import tasks
from tests.tasks import GUARD, MiB


def _pool(workers: int, transport: str) -> Iterator[cleanbreak.Pool]:
    """A forkserver pool that moves large buffers through shared memory, or its pipes only."""
    if transport == "shm":
        yield from tasks.shared_pool(workers, "forkserver")
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_shm, "SHM_DIR", "/nonexistent/cleanbreak-test")
        pool = cleanbreak.Pool(workers, mp_context="forkserver")
    assert cast(LocalBackend, pool._backend)._segments.prefix is None
    yield pool
    assert tasks.shutdown_within(pool, GUARD)


@pytest.fixture(scope="module", params=["shm", "pipe"])
def transport(request: pytest.FixtureRequest) -> Iterator[cleanbreak.Pool]:
    yield from _pool(2, request.param)


@pytest.fixture(scope="module", params=["shm", "pipe"])
def one_worker(request: pytest.FixtureRequest) -> Iterator[cleanbreak.Pool]:
    yield from _pool(1, request.param)


def test_a_200_mb_result(transport: cleanbreak.Pool) -> None:
    size = 200 * MiB
    result = transport.submit(tasks.blob, size, 1).result(timeout=GUARD)
    assert len(result) == size
    assert tasks.digest(result) == tasks.digest(tasks.make_blob(size, 1))


def test_a_200_mb_argument(transport: cleanbreak.Pool) -> None:
    data = tasks.make_blob(200 * MiB, 2)
    got = transport.submit(tasks.blob_digest, data).result(timeout=GUARD)
    assert got == (len(data), tasks.digest(data))


def test_large_results_from_several_workers_at_once(transport: cleanbreak.Pool) -> None:
    size = 60 * MiB
    results = transport.map(tasks.blob, [size] * 4, range(10, 14), chunksize=1, timeout=GUARD)
    for seed, result in zip(range(10, 14), results, strict=True):
        assert len(result) == size
        assert tasks.digest(result) == tasks.digest(tasks.make_blob(size, seed))


def test_large_arguments_and_results_cross_in_both_directions(one_worker: cleanbreak.Pool) -> None:
    # One worker holds two map units (prefetch): it writes a large result while the parent is
    # still writing it the next large argument. Neither side may wait for the other.
    blobs = [tasks.make_blob(32 * MiB, seed) for seed in (20, 21, 22)]
    results = one_worker.map(tasks.echo, blobs, chunksize=1, timeout=GUARD)
    for b, result in zip(blobs, results, strict=True):
        assert tasks.digest(result) == tasks.digest(b)


def test_a_large_map_chunk_of_medium_items(fs_pool: cleanbreak.Pool) -> None:
    # 32 items of 1 MiB in one unit: 32 MiB in one frame each way.
    items = [tasks.make_blob(MiB, seed) for seed in range(32)]
    results = list(fs_pool.map(tasks.echo, items, chunksize=32, timeout=GUARD))
    assert [tasks.digest(r) for r in results] == [tasks.digest(b) for b in items]


def test_many_small_results_in_one_chunk(fs_pool: cleanbreak.Pool) -> None:
    results = list(fs_pool.map(tasks.square, range(100_000), chunksize=20_000, timeout=GUARD))
    assert results == [x * x for x in range(100_000)]
