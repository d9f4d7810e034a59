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
