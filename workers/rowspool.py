"""Row spools: a shard's rows (item index → row bytes) kept in a local temporary file instead of
memory, so that a worker's peak memory does not grow with the shard (``bench memory``).

- ``RowSpool``: a round's rows, as ``merge.merge_round`` makes them and ``merge.fill_cached``
  adds to them: a mapping backed by an unnamed temporary file (rows appended as they come,
  in any order) and 12 bytes per item (an 8-byte offset, a 4-byte length);
- ``ShardRows``: a shard's final rows in plan order, one JSONL temporary file
  (``merge.compose``), read back in chunks and uploaded as a file (``write_shard``);
- ``put_round_rows`` / ``iter_stored_lines``: a round's stored rows (``rows.jsonl``,
  ``<index>\\t<row>`` lines, ``merge.encode_round``'s format) written from a spool and read back
  in chunks, never as one bytes object;
- ``read_chunks`` / ``newline_pieces``: a local file read in chunks, and chunks cut into pieces
  that end at a newline (the lines above, and the Batch API's spooled result files).

Local files only (the system's temporary directory); the stores are written through ``Store``.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import ItemsView, Iterable, Iterator, MutableMapping, Sequence, ValuesView
from typing import IO, Any, TypeVar

from moonbatch.workers.storage import Store

CHUNK = 2**20  # bytes read (or fetched with one ranged GET) at a time
_BUFFER = 2**18  # write buffer of a spool's file

_Self = TypeVar("_Self", bound="_TempFileBacked")


class _TempFileBacked:
    """Owner of ``self._file``, an unnamed temporary file (deleted when closed or collected);
    a context manager that closes it."""

    def __init__(self) -> None:
        # A buffer smaller than the merge's writes (~1 MB of rows at a time, ``add_lines``):
        # those go to the file as they are, not copied into the buffer first (measured: 0.16
        # us/row of writing with a 1 MB buffer, 0.11 with 256 kB); single rows are still
        # buffered.
        self._file: IO[bytes] = tempfile.TemporaryFile(buffering=_BUFFER)

    def close(self) -> None:
        """Delete the file."""
        self._file.close()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RowSpool(_TempFileBacked, MutableMapping[int, bytes]):
    """Rows of items ``0 .. n - 1`` in an unnamed temporary file (deleted when closed or
    collected); ``spool[i]`` reads item ``i``'s row back (one ``pread``). Setting a row again
    appends the new bytes (the old ones stay in the file, unreferenced). Iteration is in item
    order. Memory: 12 bytes per item, whatever the rows' size."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self._fd = self._file.fileno()
        self._offset = array("q", [-1]) * n
        self._length = array("i", [0]) * n
        self._end = 0
        self._count = 0
        # The file's bytes up to here can be read with pread. Not a flush before every read:
        # fill_cached reads a row, adds one, reads... (a write per row, twice the time).
        self._flushed = 0

    def __len__(self) -> int:
        return self._count

    def add(self, i: int, row: bytes) -> bool:
        """Set item ``i``'s row (``spool[i] = row``); returns True (the merge's slot marker)."""
        if self._offset[i] < 0:
            self._count += 1
        self._offset[i] = self._end
        self._length[i] = n = len(row)
        self._file.write(row)
        self._end += n
        return True

    __setitem__ = add  # type: ignore[assignment]

    def add_packed(self, indices: Sequence[int], ends: Sequence[int], data: bytes | bytearray
                   ) -> None:
        """Set the rows of items ``indices`` (distinct) to the rows packed back to back in
        ``data``: row ``k`` is ``data[ends[k - 1]:ends[k]]`` (from 0 for the first), in one
        write, the offsets set by numpy (the merge's rows come by the thousand: a Python call
        and write per row would cost a fifth of the merge)."""
        import numpy as np

        n = len(indices)
        if len(ends) != n or (n and ends[-1] != len(data)):
            raise ValueError("ends do not match the indices and the data")
        if not n:
            return
        stop = np.fromiter(ends, np.int64, n)
        start = np.empty_like(stop)
        start[0] = 0
        start[1:] = stop[:-1]
        self._add_spans(np.fromiter(indices, np.int64, n), start, stop, data)

    def add_lines(self, indices: Any, data: bytes) -> None:
        """Set the rows of items ``indices`` (distinct; a sequence or a numpy array of ints) to
        the lines of ``data``, one row per line, each line ending with ``\n`` (not part of the
        row; e.g. ``msgspec``'s ``encode_lines``), in one write."""
        import numpy as np

        idx = np.asarray(indices, np.int64)
        stop = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
        if len(stop) != len(idx) or (len(data) and (not len(stop) or stop[-1] != len(data) - 1)):
            raise ValueError("the lines do not match the indices")
        if not len(idx):
            return
        start = np.empty_like(stop)
        start[0] = 0
        start[1:] = stop[:-1] + 1
        self._add_spans(idx, start, stop, data)

    def _add_spans(self, idx: Any, start: Any, stop: Any, data: bytes | bytearray) -> None:
        """Items ``idx``'s rows are ``data[start[k]:stop[k]]`` (numpy arrays); ``data`` is
        appended to the file."""
        import numpy as np

        offset = np.frombuffer(self._offset, np.int64)
        self._count += int(np.count_nonzero(offset[idx] < 0))
        offset[idx] = start + self._end
        np.frombuffer(self._length, np.int32)[idx] = stop - start
        self._file.write(data)
        self._end += len(data)

    def __getitem__(self, i: int) -> bytes:
        try:
            off = self._offset[i] if i >= 0 else -1
        except (IndexError, TypeError):
            raise KeyError(i) from None
        if off < 0:
            raise KeyError(i)
        n = self._length[i]
        if off + n > self._flushed:
            self._flush()
        return os.pread(self._fd, n, off)

    def __contains__(self, i: object) -> bool:
        return i.__class__ is int and 0 <= i < len(self._offset) and self._offset[i] >= 0  # type: ignore[operator]

    def __delitem__(self, i: int) -> None:
        if i not in self:
            raise KeyError(i)
        self._offset[i] = -1
        self._count -= 1

    def __iter__(self) -> Iterator[int]:
        return (i for i, off in enumerate(self._offset) if off >= 0)

    def items(self) -> ItemsView[int, bytes]:
        """``(item index, row)`` in item order, each row read with one ``pread`` (a map of the
        file would keep every page it touched resident: the rows are in arrival order)."""
        return _Items(self)

    def values(self) -> ValuesView[bytes]:
        """The rows in item order (see ``items``)."""
        return _Values(self)

    def _flush(self) -> None:
        self._file.flush()
        self._flushed = self._end

    def _iter_items(self) -> Iterator[tuple[int, bytes]]:
        self._flush()
        fd, lengths, pread = self._fd, self._length, os.pread
        for i, off in enumerate(self._offset):
            if off >= 0:
                yield i, pread(fd, lengths[i], off)

    def keep_only(self, keep: Iterable[int]) -> None:
        """Drop every row whose item is not in ``keep``."""
        wanted = set(keep)
        for i in [i for i in self if i not in wanted]:
            del self[i]

    def snapshot(self) -> RowSpool:
        """A read-only copy of the rows as they are now, sharing the file (rows added or
        replaced later do not show in it: the file is only appended to). Valid while this
        spool is open; closing either closes both."""
        self._flush()  # the copy only reads: it never flushes
        copy = RowSpool.__new__(RowSpool)
        copy._file, copy._fd = self._file, self._fd
        copy._offset, copy._length = array("q", self._offset), array("i", self._length)
        copy._end = copy._flushed = self._end
        copy._count = self._count
        return copy

    def write_stored(self, out: IO[bytes]) -> None:
        """Write the rows in item order to ``out`` as a round's stored rows (``<index>\\t<row>``
        lines: ``merge.encode_round``'s bytes for the same rows)."""
        buf: list[bytes] = []
        size = 0
        for i, row in self._iter_items():
            line = b"%d\t%b\n" % (i, row)
            buf.append(line)
            size += len(line)
            if size >= CHUNK:
                out.write(b"".join(buf))
                buf, size = [], 0
        out.write(b"".join(buf))


class _Items(ItemsView):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[Any]:
        return self._mapping._iter_items()  # type: ignore[attr-defined, no-any-return]


class _Values(ValuesView):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[Any]:
        return (row for _, row in self._mapping._iter_items())  # type: ignore[attr-defined]


class ShardRows(_TempFileBacked):
    """A shard's final rows in plan order: one JSONL temporary file (a row per line) and its
    number of rows. ``len()`` and iteration (row bytes, without the newline, read in chunks)
    let a writer take it where it takes a sequence of rows; ``file()`` is the JSONL itself,
    rewound, for an upload."""

    def __init__(self) -> None:
        super().__init__()
        self._n = 0

    def append(self, row: bytes) -> None:
        """Add the next row (JSON bytes, no newline)."""
        self._file.write(row)
        self._file.write(b"\n")
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[bytes]:
        self._file.flush()
        return _lines(read_chunks(self._file.fileno(), CHUNK))  # pread: the file does not move

    def file(self) -> IO[bytes]:
        """The JSONL file (``len(self)`` lines), positioned at its start."""
        self._file.flush()
        self._file.seek(0)
        return self._file


def read_chunks(fd: int, size: int, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
    """The bytes of the file open as ``fd`` from ``offset`` for ``length`` bytes (None: to its
    end), ``size`` bytes at a time (the last chunk shorter), read with ``pread``: the file's
    position does not move. Stops early at the end of the file. Raises ``OSError``."""
    end = None if length is None else offset + length
    while end is None or offset < end:
        data = os.pread(fd, size if end is None else min(size, end - offset), offset)
        if not data:
            return
        offset += len(data)
        yield data
        del data  # not held while the next chunk is read


def newline_pieces(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """A byte stream given in chunks (cut anywhere) → the same bytes in pieces that each end
    with ``\\n`` (about a chunk's size: one chunk's bytes up to its last newline, after what
    the chunk before left over), but the last piece, which is what follows the stream's last
    newline (if anything). Holds at most a chunk and the line it was cut in."""
    rest = b""
    for data in chunks:
        cut = data.rfind(b"\n") + 1
        if not cut:  # inside a line longer than a chunk
            rest += data
            continue
        # One copy at most (a chunk that ends at its newline, after none left over: none).
        piece = b"".join((rest, memoryview(data)[:cut])) if rest or cut < len(data) else data
        # A chunk cut inside a line: the line's start waits for the next chunk.
        rest = data[cut:]
        del data  # the dels: no chunk held past its use (peak ~ 3 chunks)
        yield piece
        del piece
    if rest:
        yield rest


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The non-empty lines of a byte stream given in chunks (cut anywhere), without their line
    ends; the stream's last line, after its last ``\\n``, only if it is not blank."""
    for piece in newline_pieces(chunks):
        lines = piece.splitlines()
        if not piece.endswith(b"\n") and not lines[-1].strip():  # the stream's end
            lines.pop()
        del piece
        for line in lines:
            if line:
                yield line
        del lines


def put_round_rows(store: Store, key: str, rows: RowSpool, *, if_absent: bool = False,
                   keep: bool = False) -> IO[bytes] | bool:
    """Store a round's rows at ``key`` in the stored-rows format (``RowSpool.write_stored``),
    through a temporary file; see ``Store.put`` for ``if_absent`` and the result. ``keep``:
    return that file instead, at its start, when this call stored it (what the object holds
    now, for ``iter_kept_lines``; the caller closes it), else False."""
    f = tempfile.TemporaryFile(buffering=2**20)
    try:
        rows.write_stored(f)
        f.flush()
        f.seek(0)
        stored = store.put(key, f, if_absent=if_absent)
        if keep and stored:
            f.seek(0)
            kept, f = f, None
            return kept
        return stored
    finally:
        if f is not None:
            f.close()


def iter_kept_lines(f: IO[bytes]) -> Iterator[bytes]:
    """The lines of a round's stored rows kept by ``put_round_rows`` (as ``iter_stored_lines``
    gives the stored object's), read ``CHUNK`` bytes at a time."""
    return _lines(iter(lambda: f.read(CHUNK), b""))


def iter_stored_lines(store: Store, key: str) -> Iterator[bytes]:
    """The lines of the object at ``key`` (a round's stored rows), fetched ``CHUNK`` bytes at a
    time. Raises ``NotFound`` (before yielding anything) if it does not exist."""
    first = store.get_range(key, 0, CHUNK)

    def chunks() -> Iterator[bytes]:
        data, offset = first, 0
        while data:
            yield data
            if len(data) < CHUNK:
                return
            offset += len(data)
            data = store.get_range(key, offset, CHUNK)

    return _lines(chunks())


__all__ = ["CHUNK", "RowSpool", "ShardRows", "iter_kept_lines", "iter_stored_lines", "newline_pieces",
           "put_round_rows", "read_chunks"]
