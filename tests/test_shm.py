"""Large buffers travel out of band through shared memory, intact, and no segment is left
behind (issue 4, part 3). The leak checks after Ctrl-C and after the parent is SIGKILLed are in
``tests/system/test_shm_cleanup.py``."""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

import cleanbreak
from cleanbreak import _manager, _shm
from tests import tasks
from tests.tasks import GUARD, MiB


def _local(pool: cleanbreak.Pool) -> _manager.LocalBackend:
    return cast(_manager.LocalBackend, pool._backend)


BIG = 2 * _shm.THRESHOLD  # above the threshold: out of band


def segments(prefix: str | None) -> list[str]:
    assert prefix is not None
    return sorted(n for n in os.listdir(_shm.SHM_DIR) if n.startswith(prefix))


def busy(prefix: str | None) -> list[str]:
    """The pool's segments, but the spares that were read and wait to be written again."""
    assert prefix is not None
    return [n for n in segments(prefix) if not _is_free_spare(n[len(prefix) :], n)]


def _is_free_spare(tail: str, name: str) -> bool:
    if not tail.split("-", 1)[1].startswith("s"):
        return False
    try:
        with open(os.path.join(_shm.SHM_DIR, name), "rb") as f:
            return f.read(8) in (bytes(8), b"")
    except FileNotFoundError:  # removed since the listing: not busy either
        return True


def pipe_bytes(packer: _shm.Packer) -> memoryview:
    """What a packed part sends through the pipe, as its receiver gets it."""
    return memoryview(b"".join(bytes(c) for c in packer.chunks))


def prefix_of(pool: cleanbreak.Pool) -> str:
    prefix = _local(pool)._segments.prefix
    assert prefix is not None, "shared memory is not in use"
    return prefix


def wait_until(check: Any, what: str) -> None:
    """A bounded wait for a condition that has no event to wait on (a file appearing)."""
    assert tasks.wait_for_condition(check, GUARD), f"timed out waiting for {what}"


@pytest.fixture
def layouts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The layout of every result part the parent loads: where its large payloads were."""
    seen: list[Any] = []
    real = _shm.load

    def spy(data: memoryview, layout: Any) -> Any:
        seen.append(layout)
        return real(data, layout)

    monkeypatch.setattr(_manager, "load", spy)
    yield seen


@pytest.fixture
def helpers(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Three helper threads for large copies, whatever the CPUs of this machine."""
    made = _shm._Helpers(3)
    monkeypatch.setattr(_shm, "_helpers_of", (os.getpid(), made))
    return made


@pytest.fixture
def segs() -> Iterator[_shm.Segments]:
    """A pool's segments, made in this process; every one of them is removed afterwards."""
    made = _shm.Segments.new_pool()
    yield made
    made.purge()


# ── round trips ──────────────────────────────────────────────────────────────────────────────


def test_large_bytes_bytearray_and_str_arrive_intact_both_ways(
    pool: cleanbreak.Pool, layouts: list[Any]
) -> None:
    blob = tasks.make_blob(BIG + 123, 1)
    values: list[Any] = [blob, bytearray(blob), blob.decode("latin-1")]
    for value in values:
        back = pool.submit(tasks.echo, value).result(timeout=GUARD)
        assert type(back) is type(value)
        assert back == value
        got = pool.submit(tasks.kind_and_digest, value).result(timeout=GUARD)
        assert got == tasks.kind_and_digest(value)
    # Each large result came as a hole in the pipe stream, read from a segment.
    holes = [layout[2] for layout in layouts if layout is not None]
    assert len(holes) == 3
    assert all(len(h) == 1 and h[0][1] >= BIG for h in holes), holes
    assert busy(prefix_of(pool)) == []


@pytest.mark.parametrize("order", ["C", "F"])
def test_numpy_arrays_arrive_intact_both_ways(
    fs_pool: cleanbreak.Pool, order: str, layouts: list[Any]
) -> None:
    a = tasks.array(BIG // 8, 2, order)
    assert fs_pool.submit(tasks.array_digest, a).result(timeout=GUARD) == tasks.array_digest(a)
    back = fs_pool.submit(tasks.array, BIG // 8, 3, order).result(timeout=GUARD)
    assert tasks.array_digest(back) == tasks.array_digest(tasks.array(BIG // 8, 3, order))
    # The array's buffer came out of band, in a segment of its own.
    oob = [layout[3] for layout in layouts if layout is not None]
    assert len(oob) == 1 and len(oob[0]) == 1 and oob[0][0][1] == a.nbytes, oob


def test_a_non_contiguous_array_and_a_read_only_one(fs_pool: cleanbreak.Pool) -> None:
    a = tasks.array(BIG // 4, 4)[::2]
    assert not a.flags.c_contiguous
    assert fs_pool.submit(tasks.array_digest, a).result(timeout=GUARD) == tasks.array_digest(a)
    ro = np.frombuffer(tasks.make_blob(BIG, 5), dtype=np.uint8)
    assert not ro.flags.writeable
    back = fs_pool.submit(tasks.identity, ro).result(timeout=GUARD)
    assert tasks.array_digest(back) == tasks.array_digest(ro)


def test_nested_payloads_and_pickle_buffers(fs_pool: cleanbreak.Pool) -> None:
    blob = tasks.make_blob(BIG, 6)
    value = {
        "name": "sample",
        "raw": [blob, b"small", {"deep": (bytearray(blob), tasks.array(BIG // 8, 7))}],
        "buffer": tasks.big_buffer(BIG, 8),
        "many": [tasks.make_blob(_shm.THRESHOLD, s) for s in range(5)],
    }
    back = fs_pool.submit(tasks.identity, value).result(timeout=GUARD)
    assert back["name"] == "sample"
    assert back["raw"][0] == blob and type(back["raw"][0]) is bytes
    assert back["raw"][1] == b"small"
    assert back["raw"][2]["deep"][0] == bytearray(blob)
    assert tasks.array_digest(back["raw"][2]["deep"][1]) == tasks.array_digest(
        tasks.array(BIG // 8, 7)
    )
    assert back["buffer"] == tasks.big_buffer(BIG, 8)
    assert back["many"] == value["many"]
    assert busy(prefix_of(fs_pool)) == []


def test_a_large_map_with_chunks_of_large_items(fs_pool: cleanbreak.Pool) -> None:
    items = [tasks.make_blob(BIG, seed) for seed in range(12)]
    got = list(fs_pool.map(tasks.echo, items, chunksize=4, timeout=GUARD))
    assert [tasks.digest(g) for g in got] == [tasks.digest(i) for i in items]
    assert busy(prefix_of(fs_pool)) == []


# ── no copy, held once ───────────────────────────────────────────────────────────────────────


def _mapping_of(address: int) -> str:
    """The line of /proc/self/maps that holds ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span = line.split()[0]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return line.strip()
    raise AssertionError(f"{address:#x} is in no mapping")


def test_a_large_array_result_is_not_copied_in_the_parent(fs_pool: cleanbreak.Pool) -> None:
    a = fs_pool.submit(tasks.array, BIG // 8, 9).result(timeout=GUARD)
    # Its memory is the worker's segment itself, mapped (and already unlinked: "(deleted)").
    line = _mapping_of(a.ctypes.data)
    assert f"{_shm.SHM_DIR}/{prefix_of(fs_pool)}" in line and "(deleted)" in line, line
    assert line.split()[1].endswith("p"), f"not a private mapping: {line}"
    assert a.flags.writeable
    a[0] = 42  # a private mapping: the write stays in this process
    assert a[0] == 42
    assert busy(prefix_of(fs_pool)) == []


def test_a_large_bytes_result_is_read_straight_into_its_object(
    fs_pool: cleanbreak.Pool, layouts: list[Any]
) -> None:
    size = 32 * MiB
    got = fs_pool.submit(tasks.blob, size, 10).result(timeout=GUARD)
    assert tasks.digest(got) == tasks.digest(tasks.make_blob(size, 10))
    # The pipe carried a few hundred bytes of pickle; the 32 MiB were a hole, read from the
    # segment into the new bytes object and nowhere else.
    [layout] = [layout for layout in layouts if layout is not None]
    stream, _token, holes, oob = layout
    assert stream is not None and holes == [(holes[0][0], size)] and oob == []
    assert holes[0][0] < 1024


# ── spares: stream segments written again ────────────────────────────────────────────────────


def test_a_worker_writes_its_next_large_result_into_the_segment_it_freed(
    layouts: list[Any],
) -> None:
    sizes = [BIG * 3, BIG, BIG * 2]  # longer, shorter, longer again than what the spare holds
    with cleanbreak.Pool(1, mp_context="forkserver") as pool:
        for seed, size in enumerate(sizes):
            got = pool.submit(tasks.blob, size, seed).result(timeout=GUARD)
            assert tasks.digest(got) == tasks.digest(tasks.make_blob(size, seed))
            name = [layout for layout in layouts if layout is not None][-1][0]
            # What was past the message just read was given back.
            assert os.path.getsize(os.path.join(_shm.SHM_DIR, name)) <= _shm.HEADER + size + 4096
    streams = [(layout[0], layout[1]) for layout in layouts if layout is not None]
    assert len(streams) == 3
    assert len({name for name, _ in streams}) == 1, streams  # one segment, three messages
    assert len({token for _, token in streams}) == 3 and all(t for _, t in streams)


def test_a_spare_keeps_no_more_than_spare_max_once_read(
    monkeypatch: pytest.MonkeyPatch, segs: _shm.Segments
) -> None:
    monkeypatch.setattr(_shm, "SPARE_MAX", 3 * MiB)
    for size, kept in ((2 * MiB, True), (4 * MiB, False)):
        value = tasks.make_blob(size, size)
        packer = _shm.Packer(segs).pack(value)
        pipe = pipe_bytes(packer)
        assert _shm.load(pipe, packer.layout) == value
        [name] = segments(segs.prefix)
        held = os.path.getsize(os.path.join(_shm.SHM_DIR, name)) - _shm.HEADER
        assert held == (size if kept else 0), (size, held)
    assert busy(segs.prefix) == []


def test_a_spare_that_was_not_freed_is_not_written_again(segs: _shm.Segments) -> None:
    taken = []
    for _ in range(_shm.SPARES):
        name, fd, token = segs.stream()
        os.close(fd)
        assert token
        taken.append(name)
    assert len(set(taken)) == _shm.SPARES  # none was free: each is a new one
    extra, fd, token = segs.stream()
    os.close(fd)
    assert token == 0 and extra not in taken  # past the limit: a one-off segment
    _shm.unlink(extra)
    _shm.free(taken[-1])
    again, fd, token = segs.stream()
    os.close(fd)
    assert again == taken[-1] and token


def test_a_dead_receiver_loses_only_the_message_it_held(segs: _shm.Segments) -> None:
    name, fd, first = segs.stream()
    os.close(fd)
    _shm.free(name)  # read by the worker that then died ...
    same, fd, second = segs.stream()  # ... and written again, for another one
    os.close(fd)
    assert same == name
    _shm.remove_unread([(name, first)])
    assert segments(segs.prefix) == [name]  # it carries the second message now
    _shm.remove_unread([(name, second)])
    assert segments(segs.prefix) == []  # its receiver died before reading it


def test_a_recycled_worker_takes_its_spares_with_it() -> None:
    with cleanbreak.Pool(1, mp_context="forkserver", max_tasks_per_worker=1) as pool:
        prefix = prefix_of(pool)
        for seed in range(4):
            got = pool.submit(tasks.echo, tasks.make_blob(BIG, seed)).result(timeout=GUARD)
            assert tasks.digest(got) == tasks.digest(tasks.make_blob(BIG, seed))

        def only_live_makers() -> bool:
            live = {str(os.getpid()), *(str(pid) for pid in pool._backend.pids)}
            return {n[len(prefix) :].split("-")[0] for n in segments(prefix)} <= live

        # Each worker ran one task and was replaced; the spares it wrote its result into went
        # with it, and the parent's spare was written again for each new worker.
        wait_until(only_live_makers, "the spares of replaced workers to go")
        assert busy(prefix) == []
        assert len(segments(prefix)) <= 2


def test_a_full_tmpfs_sheds_the_free_spares_and_keeps_the_unread_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    segs = _shm.Segments.new_pool(spares=3)
    try:
        blobs = [tasks.make_blob(BIG, seed) for seed in range(3)]
        read = _shm.Packer(segs).pack(blobs[0])
        unread = _shm.Packer(segs).pack(blobs[1])  # its receiver has not got to it yet
        pipe = pipe_bytes(read)
        assert _shm.load(pipe, read.layout) == blobs[0]  # free again
        assert read.layout is not None and unread.layout is not None
        assert len(segments(segs.prefix)) == 2

        real = _shm._write_all

        def full_past_header(fd: int, data: memoryview, offset: int) -> None:
            if offset >= _shm.HEADER:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd, data, offset)

        monkeypatch.setattr(_shm, "_write_all", full_past_header)
        packer = _shm.Packer(segs).pack(blobs[2])  # it takes the free spare, and fails
        monkeypatch.setattr(_shm, "_write_all", real)
        assert packer.layout is None  # the payload stays in the pipe ...
        assert pickle.loads(pipe_bytes(packer)) == blobs[2]
        # ... the unread message is intact, and the spare it tried is free again.
        assert segments(segs.prefix) == sorted([str(read.layout[0]), str(unread.layout[0])])
        pipe = pipe_bytes(unread)
        assert _shm.load(pipe, unread.layout) == blobs[1]
        assert busy(segs.prefix) == []
        # Made full again while both are free: both go.
        monkeypatch.setattr(_shm, "_write_all", full_past_header)
        third = _shm.Packer(segs).pack(blobs[2])
        assert third.layout is None
        assert len(segments(segs.prefix)) == 1  # only the one it tried, emptied and free
        assert busy(segs.prefix) == []
    finally:
        segs.purge()


@pytest.mark.parametrize("kept", [0, 3 * MiB, 9 * MiB, 15 * MiB])
def test_a_segment_cut_short_fails_the_load_and_reads_nothing_past_it(
    kept: int, segs: _shm.Segments, helpers: Any
) -> None:
    # Cut inside the lead to the first huge-page boundary, or inside a later slice, of the
    # caller's part or of a helper's.
    value = tasks.make_blob(20 * MiB, 6)
    packer = _shm.Packer(segs).pack(value)
    assert packer.layout is not None and packer.layout[0] is not None
    os.truncate(os.path.join(_shm.SHM_DIR, packer.layout[0]), _shm.HEADER + kept)
    with pytest.raises(pickle.UnpicklingError, match="cut short"):
        _shm.load(pipe_bytes(packer), packer.layout)
    assert busy(segs.prefix) == []


def test_a_load_that_fails_still_frees_the_spare(segs: _shm.Segments) -> None:
    value = [tasks.make_blob(BIG, 4), tasks.array(BIG // 8, 5)]
    packer = _shm.Packer(segs).pack(value)
    assert packer.layout is not None
    stream, _token, _holes, oob = packer.layout
    _shm.unlink(oob[0][0])  # the array's segment is gone: the load fails before reading
    pipe = pipe_bytes(packer)
    with pytest.raises(FileNotFoundError):
        _shm.load(pipe, packer.layout)
    assert stream is not None and busy(segs.prefix) == []


def test_a_receiver_never_reads_another_message_from_a_spare(segs: _shm.Segments) -> None:
    first = _shm.Packer(segs).pack(tasks.make_blob(BIG, 6))
    assert first.layout is not None
    _shm.free(str(first.layout[0]))  # wrongly freed before it was read ...
    second = _shm.Packer(segs).pack(tasks.make_blob(BIG, 7))  # ... and written again
    assert second.layout is not None and second.layout[0] == first.layout[0]
    pipe = pipe_bytes(first)
    with pytest.raises(pickle.UnpicklingError, match="holds another message"):
        _shm.load(pipe, first.layout)
    assert busy(segs.prefix) == [first.layout[0]]  # left to the second message's reader


# ── huge pages, where they pay ───────────────────────────────────────────────────────────────


def _run_advice(advice: Any, cost: dict[bool, int], copies: int) -> list[bool]:
    """Choose for ``copies`` copies, each costing ``cost[huge]`` ns per byte."""
    chosen = []
    for _ in range(copies):
        huge = advice.choose()
        advice.record(huge, cost[huge] * 1000, 1000)
        chosen.append(huge)
    return chosen


def test_huge_pages_are_asked_for_while_they_are_cheaper() -> None:
    advice = _shm._Advice()
    chosen = _run_advice(advice, {True: 1, False: 3}, 64)
    # Each way is tried once; then huge pages, but for one copy in EXPLORE (16) that checks
    # the other way still costs more.
    assert [n for n, huge in enumerate(chosen, 1) if not huge] == [2, 16, 32, 48, 64]
    # The host takes the memory back: huge pages now cost more than small ones.
    later = _run_advice(advice, {True: 10, False: 4}, 64)
    assert later[-32:].count(True) == 32 // _shm._Advice.EXPLORE
    # And memory is at hand again.
    again = _run_advice(advice, {True: 1, False: 3}, 64)
    assert again[-32:].count(False) == 32 // _shm._Advice.EXPLORE


def test_large_copies_are_timed_slice_by_slice_and_small_ones_are_not(
    monkeypatch: pytest.MonkeyPatch,
    segs: _shm.Segments,
) -> None:
    seen: dict[int, list[int]] = {}

    class Spy(_shm._Advice):
        def record(self, huge: bool, ns: int, nbytes: int) -> None:
            seen.setdefault(size, []).append(nbytes)

    advised: list[tuple[int, int]] = []
    if _shm._madvise_huge() is not None:  # Linux: see where huge pages are asked for
        monkeypatch.setattr(_shm, "_madvise", (ctypes, lambda *span: advised.append(span)))
    monkeypatch.setattr(_shm, "_ADVICE", Spy())
    for size in (BIG, 8 * MiB, 20 * MiB):
        value = tasks.make_blob(size, size)
        packer = _shm.Packer(segs).pack(value)
        pipe = pipe_bytes(packer)
        assert _shm.load(pipe, packer.layout) == value
    # Below two huge pages a copy is not timed. Above, the bytes up to the destination's first
    # huge-page boundary are copied untimed, then each slice of up to _SLICE bytes is timed.
    assert BIG not in seen
    (one,) = seen[8 * MiB]
    assert 6 * MiB < one <= 8 * MiB
    first, second, last = sorted(seen[20 * MiB], reverse=True)  # slices copied in parallel
    assert first == second == _shm._SLICE
    assert 2 * MiB < last <= 4 * MiB
    assert 20 * MiB - (first + second + last) < 2 * MiB  # the lead, below one huge page
    # Huge pages are asked for in whole huge pages of the destination (Spy chose them each time).
    assert advised and all(a % (2 * MiB) == 0 and n % (2 * MiB) == 0 for a, n in advised)


# ── large copies shared out between threads ───────────────────────────────────────────────────


def _memfd(size: int, seed: int) -> tuple[int, bytes]:
    data = tasks.make_blob(size, seed)
    fd = os.memfd_create("cleanbreak-test")
    os.write(fd, data)
    return fd, data


@pytest.mark.parametrize("size", [50 * MiB, 50 * MiB + 12345, 2 * _shm.PART - 1])
@pytest.mark.parametrize("misalign", [0, 1, 4095, 1 << 20])
def test_a_large_copy_is_shared_out_between_threads_and_lands_whole(
    monkeypatch: pytest.MonkeyPatch, helpers: Any, size: int, misalign: int
) -> None:
    threads: set[str] = set()

    class Spy(_shm._Advice):
        def record(self, huge: bool, ns: int, nbytes: int) -> None:
            threads.add(threading.current_thread().name)

    monkeypatch.setattr(_shm, "_ADVICE", Spy())
    handed: list[object] = []  # the parts handed to helpers (one helper may take two)
    submit = _shm._Helpers.submit

    def counted(self: Any, fn: Any) -> Any:
        handed.append(fn)
        return submit(self, fn)

    monkeypatch.setattr(_shm._Helpers, "submit", counted)
    fd, data = _memfd(size, size + misalign)
    try:
        room = bytearray(size + (4 << 20))
        # A destination at every offset from a huge-page boundary (bytearray memory is not
        # aligned: shift it by how far it is from one, then by `misalign`).
        base = -ctypes.addressof(ctypes.c_char.from_buffer(room)) % (2 * MiB) + misalign
        dest = memoryview(room)[base : base + size]
        assert _shm._copy(fd, dest, 0) == size
        assert dest == data
        # Short of the end: what there is, and no more.
        assert _shm._copy(fd, memoryview(bytearray(size)), 1000) == size - 1000
    finally:
        os.close(fd)
    if size >= 50 * MiB:  # two copies of four parts, 8 MiB or more each: the caller's and three
        # helpers' (a helper slow to wake may find its part taken by another helper)
        assert len(handed) == 6 and "MainThread" in threads and len(threads) >= 2
    else:  # under 2 * PART: two threads would have less than PART each
        assert threads == {"MainThread"} and not handed


def test_a_copy_waits_for_its_helpers_even_when_it_fails(
    monkeypatch: pytest.MonkeyPatch, helpers: Any
) -> None:
    fd, _data = _memfd(32 * MiB, 1)
    entered, gate = threading.Event(), threading.Event()
    real = os.preadv

    def preadv(f: int, buffers: Any, offset: int) -> int:
        if f != fd:
            return real(f, buffers, offset)
        if threading.current_thread().name.startswith("cleanbreak-copy"):
            entered.set()
            assert gate.wait(GUARD)
            return real(f, buffers, offset)
        raise OSError(errno.EIO, "the caller's part fails")

    monkeypatch.setattr(os, "preadv", preadv)
    failed: list[BaseException] = []

    def copy() -> None:
        try:
            _shm._copy(fd, memoryview(bytearray(32 * MiB)), 0)
        except OSError as exc:
            failed.append(exc)

    copier = threading.Thread(target=copy)
    copier.start()
    try:
        assert entered.wait(GUARD)
        # The caller's own part failed at once, but a helper still writes into the
        # destination: the copy may neither return nor raise until it is done.
        copier.join(0.5)
        assert copier.is_alive() and not failed
    finally:
        gate.set()
        copier.join(GUARD)
        os.close(fd)
    assert not copier.is_alive()
    assert [e.errno for e in failed if isinstance(e, OSError)] == [errno.EIO]


def _main_thread_waits() -> bool:
    """Whether the main thread is blocked in ``Event.wait`` (in ``_Helpers.wait``)."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return bool(names) and names[0] == "wait" and "_copy" in names


def test_a_signal_handler_that_raises_does_not_cut_the_wait_for_helpers(
    monkeypatch: pytest.MonkeyPatch, helpers: Any
) -> None:
    class Alarm(Exception):
        pass

    fd, _data = _memfd(32 * MiB, 3)
    handled, gate = threading.Event(), threading.Event()
    real = os.preadv
    main = threading.main_thread().ident or 0

    def preadv(f: int, buffers: Any, offset: int) -> int:
        if f == fd and threading.current_thread().name.startswith("cleanbreak-copy"):
            # Once the caller waits for this part, a signal handler raises in its thread.
            assert tasks.wait_for_condition(_main_thread_waits)
            signal.pthread_kill(main, signal.SIGUSR1)
            assert gate.wait(GUARD)
        return real(f, buffers, offset)

    def handler(signum: int, frame: Any) -> None:
        handled.set()
        raise Alarm

    def open_gate() -> None:
        # The caller must still wait after the handler raised; then this helper goes on.
        assert handled.wait(GUARD)
        time.sleep(0.3)  # a window in which a caller that stopped waiting would return
        gate.set()

    monkeypatch.setattr(os, "preadv", preadv)
    previous = signal.signal(signal.SIGUSR1, handler)
    opener = threading.Thread(target=open_gate)
    opener.start()
    try:
        with pytest.raises(Alarm):
            _shm._copy(fd, memoryview(bytearray(32 * MiB)), 0)
        assert gate.is_set(), "the copy raised while a helper still wrote into its memory"
    finally:
        gate.set()
        opener.join(GUARD)
        signal.signal(signal.SIGUSR1, previous)
        os.close(fd)


def test_bytes_after_a_short_part_do_not_count(
    monkeypatch: pytest.MonkeyPatch, helpers: Any
) -> None:
    # Should the caller's part come up short while a helper's reads in full (the segment
    # shrank and grew again meanwhile), the bytes read are only those up to the gap.
    fd, _data = _memfd(32 * MiB, 4)
    real = os.preadv

    def preadv(f: int, buffers: Any, offset: int) -> int:
        if f == fd and threading.current_thread() is threading.main_thread():
            return real(f, [memoryview(buffers[0])[:1000]], offset)
        return real(f, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    try:
        assert _shm._copy(fd, memoryview(bytearray(32 * MiB)), 0) == 1000
    finally:
        os.close(fd)


def test_without_threads_to_spare_a_copy_is_done_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    real = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name.startswith("cleanbreak-copy") and started:
            raise RuntimeError("can't start new thread")
        started.append(self.name)
        real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(_shm, "_helpers_of", (0, None))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert _shm._helpers() is None
    fd, data = _memfd(32 * MiB, 5)
    try:
        dest = bytearray(32 * MiB)
        assert _shm._copy(fd, memoryview(dest), 0) == len(data) and dest == data
    finally:
        os.close(fd)


def test_a_forked_child_copies_with_helpers_of_its_own(helpers: Any) -> None:
    parents = _shm._helpers()
    assert parents is helpers
    fd, data = _memfd(32 * MiB, 2)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            signal.alarm(int(GUARD))  # the parent's helper threads are not here: a copy
            mine = _shm._helpers()  # handed to them would wait for ever
            dest = bytearray(len(data))
            ok = _shm._copy(fd, memoryview(dest), 0) == len(data) and dest == data
            code = 0 if ok and mine is not parents else 1
        finally:
            os._exit(code)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ── falling back to the pipe ─────────────────────────────────────────────────────────────────


def test_without_dev_shm_everything_goes_through_the_pipe(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_shm, "SHM_DIR", str(tmp_path / "missing"))
    with cleanbreak.Pool(1, mp_context="fork") as pool:
        assert _local(pool)._segments.prefix is None
        blob = tasks.make_blob(BIG, 11)
        assert pool.submit(tasks.echo, blob).result(timeout=GUARD) == blob
        a = tasks.array(BIG // 8, 12)
        back = pool.submit(tasks.identity, a).result(timeout=GUARD)
        assert tasks.array_digest(back) == tasks.array_digest(a)


def test_a_full_tmpfs_keeps_the_payload_in_the_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: memoryview, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with cleanbreak.Pool(1, mp_context="forkserver") as pool:
        prefix = prefix_of(pool)
        # The parent's writes fail (the worker's, in its own process, do not).
        monkeypatch.setattr(_shm, "_write_all", full)
        monkeypatch.setattr(_shm, "_said_full", False)
        blob = tasks.make_blob(BIG, 13)
        a = tasks.array(BIG // 8, 14)
        # The user hears of it once, with what to do; the payloads arrive all the same.
        with pytest.warns(RuntimeWarning, match=r"/dev/shm has no room .*--shm-size") as said:
            assert pool.submit(tasks.kind_and_digest, blob).result(timeout=GUARD) == (
                "bytes",
                tasks.digest(blob),
            )
            assert pool.submit(tasks.array_digest, a).result(timeout=GUARD) == (
                tasks.array_digest(a)
            )
        assert len([w for w in said if "has no room" in str(w.message)]) == 1
        assert segments(prefix) == []


def test_a_failed_pickle_leaves_no_segment() -> None:
    segs = _shm.Segments.new_pool()
    value = [tasks.make_blob(BIG, 15), tasks.array(BIG // 8, 16), lambda: None]
    try:
        with pytest.raises((pickle.PicklingError, AttributeError)):
            _shm.Packer(segs).pack(value)
        # The array's segment went; the spare the bytes went into is free to be written again.
        assert busy(segs.prefix) == [] and len(segments(segs.prefix)) == 1
    finally:
        segs.purge()
    assert segments(segs.prefix) == []


# ── no segment left behind ───────────────────────────────────────────────────────────────────


def test_no_segment_is_left_after_a_normal_finish(start_method: str) -> None:
    with cleanbreak.Pool(2, mp_context=start_method) as pool:
        prefix = prefix_of(pool)
        items = [tasks.make_blob(BIG, seed) for seed in range(6)]
        for item, back in zip(items, pool.map(tasks.echo, items, chunksize=1), strict=True):
            assert back == item
            # Received means unlinked, or freed for its sender to write again.
        futures = [pool.submit(tasks.array, BIG // 8, seed) for seed in range(4)]
        assert [tasks.array_digest(f.result(timeout=GUARD)) for f in futures] == [
            tasks.array_digest(tasks.array(BIG // 8, seed)) for seed in range(4)
        ]
    assert segments(prefix) == []


def test_a_dead_worker_leaves_no_segment_it_was_sent(tmp_path: Path) -> None:
    started = str(tmp_path / "started")
    big = tasks.make_blob(BIG, 17)
    with cleanbreak.Pool(1, mp_context="forkserver") as pool:
        prefix = prefix_of(pool)
        parent = f"{prefix}{os.getpid()}-"
        results = pool.imap_unordered(tasks.hold_or_len, [("hold", started), big], chunksize=1)
        # The worker runs the first item; the second, sent ahead to it, waits in its pipe and
        # its payload in a segment.
        assert tasks.wait_for_path(started)
        wait_until(lambda: any(n.startswith(parent) for n in segments(prefix)), "the segment")
        [sent] = segments(prefix)
        os.kill(pool._backend.pids[0], 9)
        with pytest.raises(cleanbreak.WorkerDied):
            next(results)
        # Handled before the task failed: the segment its worker never read is gone.
        assert sent not in segments(prefix)
        assert pool.submit(tasks.hold_or_len, big).result(timeout=GUARD) == len(big)
        assert busy(prefix) == []


def test_a_dead_worker_leaves_no_segment_it_made(tmp_path: Path) -> None:
    started = str(tmp_path / "started")
    with cleanbreak.Pool(1, mp_context="forkserver") as pool:
        prefix = prefix_of(pool)
        fut = pool.submit(tasks.die_after_making_a_segment, started)
        with pytest.raises(cleanbreak.WorkerDied):
            fut.result(timeout=GUARD)
        assert os.path.exists(started)
        # Handled before the future failed: the worker's segment went with it.
        assert segments(prefix) == []
        assert pool.submit(tasks.square, 3).result(timeout=GUARD) == 9


def test_a_new_pool_removes_the_segments_of_a_dead_one() -> None:
    ns = _shm._namespace()
    dead_pid = _a_dead_pid()
    stale = os.path.join(_shm.SHM_DIR, f"cb-{ns}-{dead_pid}-0badc0de-{dead_pid}-1")
    live = os.path.join(_shm.SHM_DIR, f"cb-{ns}-{os.getpid()}-0badc0de-{os.getpid()}-1")
    other_ns = os.path.join(_shm.SHM_DIR, f"cb-1-{dead_pid}-0badc0de-{dead_pid}-1")
    for path in (stale, live, other_ns):
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        with cleanbreak.Pool(1, mp_context="fork"):
            pass
        assert not os.path.exists(stale)
        assert os.path.exists(live)  # its pool's parent (this process) is alive
        assert os.path.exists(other_ns)  # another pid namespace: not ours to judge
    finally:
        for path in (stale, live, other_ns):
            if os.path.exists(path):
                os.unlink(path)


def _a_dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
