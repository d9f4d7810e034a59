"""The parent's frame reader (``_wire.FrameReader``) against frames of every size, written in
pieces of every size: each frame comes back whole, once, in order."""

from __future__ import annotations

import os
import random
import select
import threading

from cleanbreak import _wire


def _write_in_pieces(fd: int, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    view = memoryview(data)
    while view:
        n = min(len(view), rng.choice([1, 7, 8, 9, 4096, 65535, 65536, 65537, 300_000]))
        written = os.write(fd, view[:n])
        view = view[written:]
    os.close(fd)


def test_frames_of_every_size_come_back_whole_and_in_order() -> None:
    rng = random.Random(11)
    sizes = [0, 1, 7, 8, 100, 65_527, 65_528, 65_529, 65_536, 70_000, 3_000_000]
    sizes += [rng.choice(sizes) for _ in range(300)]
    bodies = [rng.randbytes(n) for n in sizes]
    stream = b"".join(_wire.HEADER.pack(len(b)) + b for b in bodies)
    for seed in range(4):
        r, w = os.pipe()
        os.set_blocking(r, False)
        writer = threading.Thread(target=_write_in_pieces, args=(w, stream, seed))
        writer.start()
        reader = _wire.FrameReader(r)
        got: list[bytes] = []
        eof = False
        while not eof:
            assert select.select([r], [], [], 30.0)[0], "the reader waited for nothing"
            frames, eof = reader.read()
            got.extend(bytes(f) for f in frames)
        writer.join()
        os.close(r)
        assert len(got) == len(bodies)
        assert got == bodies


def _frames_of_many_parts(seed: int) -> list[list[bytes]]:
    """Frames of 1 to 40 parts each (more than one writev takes), of 0 bytes to 3 MB."""
    rng = random.Random(seed)
    sizes = [0, 1, 8, 4095, 4096, 65_536, 70_000, 1 << 20, 3_000_000]
    return [
        [rng.randbytes(rng.choice(sizes)) for _ in range(rng.choice([1, 2, 15, 16, 17, 40]))]
        for _ in range(12)
    ]


def _read_back(fd: int, into: list[list[bytes]]) -> None:
    """Read frames until end of file; closing ``fd`` then (or at an error) ends a writer's wait."""
    try:
        while (body := _wire.recv_frame(fd)) is not None:
            into.append([bytes(p) for p in _wire.split(body)[0]])
    finally:
        os.close(fd)


def test_a_frame_of_many_parts_goes_whole_through_either_writer() -> None:
    # The worker's send_frame blocks; the parent's FrameWriter writes what the pipe takes, as
    # select says it can. Both gather a frame's parts into writev calls and pick up after a
    # short write: every part must arrive once, whole, in order.
    for seed in range(3):
        frames = _frames_of_many_parts(seed)
        for blocking in (True, False):
            r, w = os.pipe()
            got: list[list[bytes]] = []
            reader = threading.Thread(target=_read_back, args=(r, got), daemon=True)
            reader.start()
            # In a thread of its own too: a writer that loops for ever fails the test.
            writer = threading.Thread(target=_write, args=(w, frames, blocking), daemon=True)
            writer.start()
            writer.join(60.0)
            assert not writer.is_alive(), "the writer never finished"
            reader.join(30.0)
            assert not reader.is_alive()
            assert got == frames


def _write(fd: int, frames: list[list[bytes]], blocking: bool) -> None:
    try:
        if blocking:
            for parts in frames:
                _wire.send_frame(fd, *parts)
            return
        os.set_blocking(fd, False)
        writer = _wire.FrameWriter(fd)
        for parts in frames:
            writer.put(*parts)
        writer.flush()
        while writer.pending:
            assert select.select([], [fd], [], 30.0)[1], "the pipe never drained"
            writer.flush()
    finally:
        os.close(fd)
