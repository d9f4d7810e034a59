"""Workers reuse the memory their tasks free, and give back what piles up (``_heap``)."""

from __future__ import annotations

import time
from typing import Any

import pytest

import cleanbreak
from cleanbreak import _heap
from tests import tasks
from tests.tasks import GUARD, MiB

glibc = pytest.mark.skipif(
    not _heap._glibc_at_least(2, 33), reason="the worker heap is tuned on glibc 2.33+ only"
)


def _move_a_large_payload(pool: cleanbreak.Pool, way: str) -> None:
    """Send the worker a large argument, or have it return a large result."""
    if way == "argument":
        data = tasks.make_blob(_heap.LARGE, 1)
        assert pool.submit(tasks.blob_digest, data).result(timeout=GUARD)[0] == len(data)
    else:
        assert len(pool.submit(tasks.blob, _heap.LARGE, 1).result(timeout=GUARD)) == _heap.LARGE


@glibc
@pytest.mark.parametrize("start_method", ["forkserver", "spawn", "fork"])
def test_large_blocks_come_from_the_heap_once_a_large_payload_moved(start_method: str) -> None:
    with cleanbreak.Pool(1, mp_context=start_method) as pool:
        # Payloads below LARGE, or none: glibc's defaults (large blocks mapped on their own).
        assert len(pool.submit(tasks.blob, _heap.LARGE - 1, 1).result(timeout=GUARD)) > 0
        assert pool.submit(tasks.block_in_heap, 40 * MiB).result(timeout=GUARD) is False
        _move_a_large_payload(pool, "result")
        assert pool.submit(tasks.block_in_heap, 40 * MiB).result(timeout=GUARD) is True


@glibc
@pytest.mark.parametrize("way", ["argument", "result"])
def test_reuse_memory_false_leaves_the_allocator_alone(way: str) -> None:
    for reuse in (True, False):
        with cleanbreak.Pool(1, reuse_memory=reuse) as pool:
            _move_a_large_payload(pool, way)
            future = pool.submit(tasks.block_in_heap, 40 * MiB)
            assert future.result(timeout=GUARD) is reuse, f"reuse_memory={reuse}"


@glibc
def test_a_worker_keeps_what_its_task_freed_for_the_next_one() -> None:
    # 40 MiB: above glibc's own 32 MiB limit for blocks it keeps, below KEEP.
    size = 40 * MiB
    for reuse in (True, False):
        with cleanbreak.Pool(1, reuse_memory=reuse) as pool:
            _move_a_large_payload(pool, "argument")
            held = pool.submit(tasks.rss_held_after_free, size).result(timeout=GUARD)
            assert held >= size * 0.9 if reuse else held < size * 0.1, f"reuse_memory={reuse}"


@glibc
def test_memory_freed_below_a_block_in_use_goes_back_after_the_unit() -> None:
    size = 300 * MiB
    with cleanbreak.Pool(1) as pool:
        _move_a_large_payload(pool, "result")
        stuck = pool.submit(tasks.free_below_a_pinned_block, size).result(timeout=GUARD)
        after = pool.submit(tasks.rss).result(timeout=GUARD)
    # The 300 MiB freed below the pinned block was still held when the task returned; the
    # worker gave its pages back before the next unit.
    assert stuck - after >= size - 2 * _heap.KEEP


@glibc
def test_an_idle_worker_gives_back_what_a_put_off_count_would_have() -> None:
    size = 300 * MiB
    with cleanbreak.Pool(1) as pool:
        _move_a_large_payload(pool, "result")
        pid = pool.submit(tasks.getpid_of_worker).result(timeout=GUARD)
        pool.submit(tasks.free_below_a_pinned_block, size).result(timeout=GUARD)  # counted
        # Right after: the heap's top stays where it was, so the count after this unit is put
        # off (for up to a second) while the hole's pages come back.
        held = pool.submit(tasks.refill_the_hole, size).result(timeout=GUARD)
        # Idle, the worker counts before long, and gives them back.
        assert tasks.wait_for_condition(lambda: tasks.rss(pid) < held - size // 2)


def test_reuse_memory_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="reuse_memory must be True or False, got 'no'"):
        cleanbreak.Pool(1, reuse_memory="no")  # type: ignore[arg-type]


# ── when the worker counts its free bytes ────────────────────────────────────────────────────


class _FakeLibc:
    """The four glibc calls ``Heap`` makes, with a heap top and free bytes the test sets."""

    def __init__(self) -> None:
        self.top = 1000 * MiB
        self.free = 0
        self.counted = 0
        self.trims: list[int] = []
        libc = self

        class Info:
            @property
            def fordblks(self) -> int:
                return libc.free

        def mallinfo2() -> Info:
            libc.counted += 1
            return Info()

        def trim(pad: int) -> None:
            libc.trims.append(pad)

        # Plain functions: Heap sets their restype and argtypes, as on ctypes functions.
        self.mallinfo2: Any = mallinfo2
        self.sbrk: Any = lambda _n: libc.top
        self.malloc_trim: Any = trim


def test_the_free_bytes_are_counted_when_the_heap_moved_or_a_second_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ctypes

    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    libc = _FakeLibc()
    keep = 64 * MiB
    heap = _heap.Heap(libc, ctypes, keep)

    heap.tidy()  # nothing moved, no time passed: not counted
    libc.top += keep - 1
    heap.tidy()  # moved by less than keep: not counted
    assert libc.counted == 0
    libc.top += 1
    heap.tidy()  # moved by keep since the last count
    assert libc.counted == 1
    libc.top -= keep
    heap.tidy()  # shrunk by keep
    assert libc.counted == 2
    assert heap.due() is None  # that tidy() counted: none is put off
    now[0] += _heap.CHECK_EVERY - 0.25
    heap.tidy()
    assert libc.counted == 2
    assert heap.due() == pytest.approx(0.25)  # put off: due a second after the last count
    heap.tidy(now=True)  # the worker idled until then
    assert libc.counted == 3 and heap.due() is None
    now[0] += _heap.CHECK_EVERY
    heap.tidy()  # a second since the last count
    assert libc.counted == 4
    assert libc.trims == []  # nothing free

    libc.free = 2 * keep
    now[0] += _heap.CHECK_EVERY
    heap.tidy()
    assert libc.trims == []  # up to 2 * keep is kept
    libc.free = 2 * keep + 1
    now[0] += _heap.CHECK_EVERY
    heap.tidy()
    assert libc.trims == [keep]  # above it, all but keep at the top goes back
