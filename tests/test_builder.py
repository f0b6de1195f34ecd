"""The part writer: fixed-size parts, uploaded concurrently, returned in order."""

from __future__ import annotations

import random
import threading
import time

import pytest

from moonbatch.workers.providers.moondream.answers import Part
from moonbatch.workers.providers.moondream.upload import PartWriter, ordered_map


class Recorder:
    def __init__(self, fail_at: int | None = None):
        self.sent: dict[int, bytes] = {}
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.fail_at = fail_at
        self.rng = random.Random(7)

    def __call__(self, number: int, data: bytes) -> Part:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            delay = self.rng.uniform(0, 0.02)
        time.sleep(delay)  # parts finish out of order
        with self.lock:
            self.active -= 1
            if number == self.fail_at:
                raise OSError(f"part {number} failed")
            self.sent[number] = data
        return Part(partNumber=number, etag=f'"{number}"')


@pytest.mark.parametrize("concurrency", [1, 3])
def test_parts_are_fixed_size_and_in_order(concurrency):
    rec = Recorder()
    writer = PartWriter(1000, rec, concurrency=concurrency)
    stream = b"".join(bytes([i % 251]) * (37 + i * 13 % 900) for i in range(60))
    pos = 0
    for i in range(60):
        n = 37 + i * 13 % 900
        writer.write(stream[pos:pos + n])
        pos += n
    parts = writer.close()
    assert [p.part_number for p in parts] == list(range(1, len(parts) + 1))
    sizes = [len(rec.sent[p.part_number]) for p in parts]
    assert all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000
    assert b"".join(rec.sent[p.part_number] for p in parts) == stream
    assert writer.bytes == len(stream)
    assert rec.peak <= concurrency
    if concurrency > 1:
        assert rec.peak > 1  # uploads really overlapped


@pytest.mark.parametrize("sizes", [[1000] * 5, [2500, 10, 3490], [999, 1, 1000, 4001], [1] * 2500])
def test_writes_across_and_on_part_boundaries(sizes):
    """A write that ends a part exactly, one that spans several parts, and byte-sized ones:
    every part is whole bytes, exactly the part size but the last, and the stream is intact."""
    rec = Recorder()
    writer = PartWriter(1000, rec, concurrency=2)
    stream = random.Random(3).randbytes(sum(sizes))
    pos = 0
    for n in sizes:
        writer.write(stream[pos:pos + n])
        pos += n
    parts = writer.close()
    sent = [rec.sent[p.part_number] for p in parts]
    assert all(type(d) is bytes for d in sent)
    assert [len(d) for d in sent] == [1000] * (len(stream) // 1000) + (
        [len(stream) % 1000] if len(stream) % 1000 else [])
    assert b"".join(sent) == stream and writer.bytes == len(stream)


def test_empty_stream_sends_nothing():
    rec = Recorder()
    assert PartWriter(10, rec, concurrency=2).close() == [] and rec.sent == {}


def test_a_failed_part_is_raised():
    writer = PartWriter(10, Recorder(fail_at=2), concurrency=2)
    with pytest.raises(OSError, match="part 2 failed"):
        for _ in range(10):
            writer.write(b"x" * 10)
        writer.close()


def test_ordered_map_keeps_order_and_bounds_the_window():
    seen = []

    def slow(x):
        time.sleep(random.Random(x).uniform(0, 0.005))
        seen.append(x)
        return x * 2

    assert list(ordered_map(slow, range(50), workers=4, window=6)) == [x * 2 for x in range(50)]
