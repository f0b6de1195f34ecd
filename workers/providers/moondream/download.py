"""Downloader: a completed batch's result files, verified.

Output files sit behind presigned URLs that expire (seed 002, "Download results"), and a
download can be cut short or arrive garbled. Every file is checked after reading (each line a
JSON object with an integer ``line_index``); a file that fails is fetched again, and URLs that
stopped working (403/404/410) are renewed from a fresh status call. Nothing unverified is merged.
Verified files wait in a local temporary file (``ResultFiles``), so only the file being read is
in memory, whatever the batch's size.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator

import orjson

from moonbatch.workers.providers.moondream.answers import BatchStatus
from moonbatch.workers.providers.moondream.client import BatchClient
from moonbatch.workers.providers.moondream.errors import MoondreamError, TransientError
from moonbatch.workers.rowspool import newline_pieces, read_chunks

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DownloadStats:
    """What it took: files ``fetched``, ``corrupt`` reads thrown away, URL ``refreshes``."""

    fetched: int = 0
    corrupt: int = 0
    refreshes: int = 0


class ResultFiles:
    """A batch's verified result files, in output-index order, in an unnamed temporary file
    (deleted when closed or collected). Iterating yields each file's bytes in pieces of about
    ``chunk`` bytes cut after a newline (``rowspool.newline_pieces``: a small file ending with a
    newline in one piece), read back one at a time; ``len()`` is the number of files."""

    def __init__(self, chunk: int = 2**20) -> None:
        self._file = tempfile.TemporaryFile()
        self._spans: dict[int, tuple[int, int]] = {}  # output index → (offset, length)
        self._end = 0
        self.chunk = chunk

    def add(self, index: int, data: bytes) -> None:
        """Keep output ``index``'s bytes (replacing any kept before)."""
        os.pwrite(self._file.fileno(), data, self._end)
        self._spans[index] = (self._end, len(data))
        self._end += len(data)

    def clear(self) -> None:
        """Forget every file (to read them all again)."""
        self._spans.clear()
        self._file.truncate(0)
        self._end = 0

    def __len__(self) -> int:
        return len(self._spans)

    def __iter__(self) -> Iterator[bytes]:
        fd = self._file.fileno()
        for index in sorted(self._spans):
            offset, length = self._spans[index]
            yield from newline_pieces(read_chunks(fd, self.chunk, offset, length))

    def close(self) -> None:
        """Delete the temporary file."""
        self._file.close()


def verify_result_file(data: bytes) -> tuple[int, str | None]:
    """``(rows, problem)``: the number of result rows, and None if every non-empty line is a JSON
    object with an integer ``line_index``, else why not."""
    rows = 0
    for n, raw in enumerate(data.splitlines()):
        if not raw or raw.isspace():
            continue
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return rows, f"line {n} is not JSON"
        if not isinstance(row, dict) or not isinstance(row.get("line_index"), int):
            return rows, f"line {n} has no integer line_index"
        rows += 1
    return rows, None


def fetch_results(client: BatchClient, status: BatchStatus, *, max_tries: int = 6
                  ) -> tuple[ResultFiles, DownloadStats]:
    """Download and verify every output file of the completed batch ``status``, one at a time
    (each kept in a temporary file once verified: ``ResultFiles``).

    A file cut exactly at a line boundary still parses, so the rows are also counted against
    the batch's ``progress.total`` (``BatchStatus.total``; no check when the answer has none);
    too few rows means every file is read again. Returns the files in output-index order.
    Raises ``TransientError`` if a file still fails after ``max_tries`` reads (the task retries
    later, with fresh URLs).
    """
    expected = status.total or 0
    stats = DownloadStats()
    pending = {o.index for o in status.outputs}
    files = ResultFiles()
    rows: dict[int, int] = {}  # output index → verified rows
    tries: dict[int, int] = {}
    while pending:
        urls = {o.index: o for o in status.outputs}
        refresh = False
        for index in sorted(pending):
            tries[index] = tries.get(index, 0) + 1
            if tries[index] > max_tries:
                raise TransientError(f"download of output {index}",
                                     f"still unreadable after {max_tries} tries")
            if index not in urls:  # a fresh answer lost this file's URL: ask again
                refresh = True
                break
            try:
                data = client.download(urls[index])
            except MoondreamError as exc:
                if exc.status in (403, 404, 410):  # expired or revoked URL: ask for new ones
                    refresh = True
                    break
                raise
            stats.fetched += 1
            count, problem = verify_result_file(data)
            if problem is not None:
                stats.corrupt += 1
                log.warning("batch %s output %d: %s; fetching it again", status.id, index, problem)
                continue
            files.add(index, data)
            rows[index] = count
            del data  # the next download is not held beside it
            pending.discard(index)
        if not pending and sum(rows.values()) < expected:
            if max(tries.values(), default=0) >= max_tries:
                log.warning("batch %s: %d rows for %d lines; merging what there is", status.id,
                            sum(rows.values()), expected)
                break
            stats.corrupt += 1
            pending = set(rows)
            files.clear()
            rows.clear()
        if refresh or pending:
            stats.refreshes += refresh
            status = client.get_batch(status.id)
    return files, stats
