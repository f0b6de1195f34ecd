"""Builder: a shard's items → JSONL lines → a multipart upload → a submitted batch.

Images are fetched concurrently (bounded window, order kept), checked and encoded one line each,
and the JSONL is cut into fixed-size parts as it grows: every part but the last has exactly
``part_size`` bytes (R2, behind the API, requires it; FACTS.md), so memory holds at most one part
plus the fetch window, whatever the shard's size. Protocol: seed 002, "Upload and submit".
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import io
import logging
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pybase64 import b64encode

from moonbatch.workers import layout, metrics
from moonbatch.workers.lines import ItemError, prepare_image, skill_line_id
from moonbatch.workers.models import BatchRecord, PlanItem, ShardBuild, Sizes, SkillOptions
from moonbatch.workers.pool import ordered_map
from moonbatch.workers.providers.moondream.answers import Part
from moonbatch.workers.providers.moondream.client import BatchClient
from moonbatch.workers.providers.moondream.errors import RequestRejected, TransientError
from moonbatch.workers.providers.moondream.lines import (
    encode_images_line,
    encode_line,
    max_image_bytes,
    max_images_bytes,
)
from moonbatch.workers.providers.moondream.records import BatchClaims, SubmitRecord, UploadRecord
from moonbatch.workers.providers.moondream.recovery import (
    RoundClaimed,
    drop_claim,
    forget_upload,
    record_batch,
    record_unsent,
    recorded_round,
    recover_lost_submit,
    version_of,
    write_build,
)
from moonbatch.workers.readers import item_options, read_item, unexpected_error
from moonbatch.workers.storage import Store, get_json_or_none, put_json

log = logging.getLogger(__name__)



class PartWriter:
    """Cuts a byte stream into parts of exactly ``part_size`` bytes (the last may be shorter)
    and hands each to ``send(part_number, data) -> Part`` as soon as it is full.

    Up to ``concurrency`` parts are sent at once on background threads while the caller keeps
    writing, so encoding overlaps uploading; memory holds at most ``concurrency + 1`` parts.
    ``send`` is called lazily: a stream of zero bytes sends nothing. The first ``send`` error
    is raised from ``write`` or ``close``.
    """

    def __init__(self, part_size: int, send: Callable[[int, bytes], Part], *,
                 concurrency: int = 1) -> None:
        if part_size <= 0:
            raise ValueError("part_size must be positive")
        self.part_size = part_size
        self._send = send
        # The part being filled: each line is copied in at once rather than kept until the
        # part is full (a part's worth of small line objects, freed together, left their
        # allocator's arenas pinned by what was allocated meanwhile: RSS grew with the shard).
        self._buf = io.BytesIO()
        self._size = 0
        self._pool = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="part")
        self._concurrency = concurrency
        self._inflight: collections.deque[cf.Future[Part]] = collections.deque()
        self._numbers = 0
        self.parts: list[Part] = []
        self.bytes = 0

    def write(self, data: bytes) -> None:
        """Append ``data``; start sending every part that became full.

        Each piece is copied once, into the part's buffer, which becomes the part's bytes
        without a second copy (``BytesIO.getvalue``); a piece that crosses a part boundary is
        split by reference (``memoryview``)."""
        self.bytes += len(data)
        piece: bytes | memoryview = data
        while self._size + len(piece) >= self.part_size:
            need = self.part_size - self._size
            if not isinstance(piece, memoryview):
                piece = memoryview(piece)
            self._buf.write(piece[:need])
            self._submit(self._take())
            piece = piece[need:]
        if len(piece):
            self._buf.write(piece)
            self._size += len(piece)

    def _take(self) -> bytes:
        """The part filled so far, as bytes; the next part starts empty."""
        data = self._buf.getvalue()
        self._buf, self._size = io.BytesIO(), 0
        return data

    def close(self) -> list[Part]:
        """Send the last, shorter part (if any), wait for all, return the parts in order."""
        try:
            if self._size:
                self._submit(self._take())
            while self._inflight:
                self.parts.append(self._inflight.popleft().result())
            return self.parts
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stop: drop buffered bytes and wait for parts in flight (their errors are ignored)."""
        self._buf, self._size = io.BytesIO(), 0
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, chunk: bytes) -> None:
        if len(self._inflight) >= self._concurrency:
            self.parts.append(self._inflight.popleft().result())
        self._numbers += 1
        self._inflight.append(self._pool.submit(self._send, self._numbers, chunk))


def iter_lines(items: Sequence[PlanItem], fetch: Callable[[PlanItem], bytes],
               options: SkillOptions, *, concurrency: int, errors: dict[str, dict[str, str]],
               max_pixels: int = 0, indices: Sequence[int] | None = None, id_prefix: str = "",
               sizes: Sizes | dict[str, list[int]] | None = None,
               more: Sequence[SkillOptions] = (),
               image_sizes: dict[str, list[list[int] | None]] | None = None
               ) -> Iterator[tuple[int, bytes, bool, int]]:
    """Yield ``(item_index, line, transformed, skill)`` for every sendable item of
    ``indices`` (default: all), in plan order; each line's ``id`` is ``id_prefix`` + the
    item's key. ``fetch(item)`` reads an item's image (``moonbatch.workers.readers.ItemFetcher.get``).

    ``more``: further skills of a multi-skill run: each image is read, checked and base64'd
    once, then written as one line per skill (``skill``: 0 for ``options``, k for
    ``more[k-1]``; line ids ``skill_line_id(<id>, <skill>)``). Items that cannot be sent are
    recorded in ``errors`` (item index as a string → ``{"code", "message"}``) instead: missing
    objects, unreadable ones, refused or malformed references, non-images, undecodable
    headers, invalid per-item options, and anything else that goes wrong with one item.
    ``sizes`` (if given) gets each sent image's ``PreparedImage.dims()`` under its item index.

    A multi-image item (``PlanItem.more``; query only) has every image read, checked and
    downscaled like a single one, within an even share of the line limit, and goes as one
    ``images`` line (``encode_images_line``); one bad image makes the item's error, its message
    naming which image (``image 2 of 2 (<ref>): ...``). ``image_sizes`` (if given) gets every
    image's dims (None for an image not read) under its item index; ``sizes`` the first's.
    """
    skills = [options, *more]
    fragments = [o.line_fragment() for o in skills]

    def load(pair: tuple[int, PlanItem]) -> tuple[int, list[bytes], bool, ItemError | None,
                                                  list[int] | None, list[list[int] | None] | None]:
        index, item = pair
        dims: list[list[int] | None] | None = None
        try:
            frags = fragments if not item.opts else [
                item_options(o, item).line_fragment() for o in skills]
            line_id = id_prefix + item.key
            ids = [line_id] if not more else [skill_line_id(line_id, o.skill) for o in skills]
            if item.more:
                parts = item.parts()
                dims = [None] * len(parts)
                lines, changed = _images_lines(parts, fetch, ids, frags, skills, max_pixels, dims)
                return index, lines, changed, None, dims[0], dims
            data = read_item(fetch, item)
            limit = min(max_image_bytes(i, f) for i, f in zip(ids, frags, strict=True))
            prepared = prepare_image(data, limit=limit, max_pixels=max_pixels)
            b64 = b64encode(prepared.data)
            return (index, [encode_line(i, prepared.data, f, b64=b64)
                            for i, f in zip(ids, frags, strict=True)],
                    prepared.transform is not None, None, prepared.dims(), None)
        except ItemError as exc:
            return index, [], False, exc, None, dims
        except Exception as exc:  # the per-item boundary: one item never fails the round
            return (index, [], False, unexpected_error(exc, "preparing", "image_decode_failed"),
                    None, dims)

    pairs = enumerate(items) if indices is None else ((i, items[i]) for i in indices)
    for index, lines, transformed, error, first, every in ordered_map(
        load, pairs, workers=concurrency, window=concurrency * 2
    ):
        if image_sizes is not None and every is not None:
            image_sizes[str(index)] = every
        if error is not None:
            errors[str(index)] = error.as_dict()
            continue
        if sizes is not None and first is not None:
            sizes[str(index)] = first
        for skill, line in enumerate(lines):
            yield index, line, transformed and skill == 0, skill


def _images_lines(parts: Sequence[PlanItem], fetch: Callable[[PlanItem], bytes],
                  ids: list[str], frags: list[bytes], skills: Sequence[SkillOptions],
                  max_pixels: int, dims: list[list[int] | None]) -> tuple[list[bytes], bool]:
    """The ``images`` lines (one per skill) of a multi-image item whose images are ``parts``
    (``PlanItem.parts()``), and whether any image was re-encoded; fills ``dims`` as each
    image is prepared. Raises ``ItemError`` naming the image that cannot be sent, and
    ``invalid_options`` for a skill other than query (seed 002: only a query takes
    ``images``; the run's checks refuse it before, ``check_multi_image``)."""
    from moonbatch.workers.readers import refs

    if any(o.skill != "query" for o in skills):
        raise ItemError("invalid_options", f"the row names {len(parts)} images and only "
                        "--skill query takes several images: run it with --skill query alone")
    limit = min(max_images_bytes(i, f, len(parts)) for i, f in zip(ids, frags, strict=True))
    b64s: list[bytes] = []
    changed = False
    for k, part in enumerate(parts):
        try:
            prepared = prepare_image(read_item(fetch, part), limit=limit, max_pixels=max_pixels)
        except ItemError as exc:
            shown = refs.show(part.ref if part.ref is not None else part.key, limit=300)
            raise ItemError(exc.code, f"image {k + 1} of {len(parts)} ({shown}): "
                            f"{exc.message}") from None
        dims[k] = prepared.dims()
        changed = changed or prepared.transform is not None
        b64s.append(b64encode(prepared.data))
    return [encode_images_line(i, b64s, f) for i, f in zip(ids, frags, strict=True)], changed


def build_and_submit(*, shard: int, items: Sequence[PlanItem], options: SkillOptions,
                     model: str | None, input_store: Store | None = None, state: Store,
                     client: BatchClient, fetch: Callable[[PlanItem], bytes] | None = None,
                     part_size: int, concurrency: int, max_pixels: int = 0,
                     upload_concurrency: int = 2, rnd: int = 0, todo: Sequence[int] | None = None,
                     heartbeat: Callable[[], None] | None = None,
                     renew: Callable[[], None] | None = None,
                     claims: BatchClaims | None = None, id_prefix: str = "",
                     more: Sequence[SkillOptions] = ()) -> tuple[ShardBuild, BatchRecord | None]:
    """Build the JSONL of round ``rnd`` of a shard (items ``todo``, default all), upload it and
    submit it; return the build and the batch record (None when no item could be sent: there
    is then no batch, only error rows).

    Idempotent: a round whose batch is already recorded returns it without uploading again; an
    upload an earlier attempt left open is aborted before a new one starts (the caller holds
    the shard's lease, so that attempt is dead). The upload's ids are recorded
    (``upload.json``) before the first part is sent, the batch id (``batch.json``) right after
    ``mpu-complete`` answers. ``heartbeat`` is called between lines and parts: it renews the
    lease and may raise to stop the build (lease lost, run cancelled), which aborts the upload.

    One execution at most bills a round, even if two run at once (a lease that expired under
    a stalled holder): ``submit.json`` is the round's claim (``SubmitRecord``, with a token of
    this execution, ``attempt``), created only if absent, after ``renew`` (the caller's lease,
    renewed at once: it raises if another execution took the lease over). The claimant alone
    then writes ``build.json`` (compare-and-swap, while the claim is still its own), calls
    ``renew`` again right before ``mpu-complete``, and creates ``batch.json`` once; both name
    its ``attempt``, so ``build.json`` always describes the batch recorded. An execution that
    finds the round claimed by another aborts its own upload and returns the recorded batch,
    or raises ``RoundClaimed`` (look again later). A claim whose ``build.json`` is not its own
    is dropped: its execution died before it could bill (billing needs the lease the caller
    holds now).

    A lost ``mpu-complete`` answer (or an attempt that died waiting for it) is recovered, not
    paid twice: the claim is written before the call, and the batch it created is found
    in the batch list by its creation time and line count and claimed in ``claims`` (so two
    rounds never adopt one batch) after its results show the round's ``id_prefix`` (give each
    round its own, e.g. from the run id, shard and round: item ids alone repeat across runs of
    one dataset). Only when it cannot be found is the round sent again,
    counted in ``orphans.json``. Raises ``MoondreamError`` kinds (``AwaitingBatch`` while the
    batch of a lost answer cannot be named yet, ``RoundClaimed``: both mean look again later),
    ``StorageError``, and whatever ``renew`` or ``heartbeat`` raise.
    """
    def doc(name: str) -> str:
        return layout.round_doc(shard, rnd, name)

    attempt = uuid.uuid4().hex[:12]
    fence = renew or (lambda: None)
    skill_names = [o.skill for o in (options, *more)]
    # What an earlier attempt left, from one listing of the round's documents: only those
    # there are read (a round's first build reads none).
    present = {k.name for o in state.iter_objects(layout.round_prefix(shard, rnd))
               if (k := layout.parse_shard_key(o.key)) is not None}

    def left(name: str) -> Any:
        return get_json_or_none(state, doc(name)) if name in present else None

    done_build = left("build")
    done_batch = left("batch")
    if done_build is not None and (done_batch is not None or not done_build["lines"]):
        return (ShardBuild.model_validate(done_build),
                BatchRecord.model_validate(done_batch) if done_batch else None)

    pending = left("submit")
    if pending is not None:
        intent = SubmitRecord.model_validate(pending)
        if done_build is not None and done_build.get("attempt", "") == intent.attempt:
            # Its execution wrote the build: its mpu-complete may have created a batch.
            built = ShardBuild.model_validate(done_build)
            record = recover_lost_submit(client, state, doc, intent, claims,
                                          line_ids=built.line_ids(items, skill_names),
                                          shard=shard, rnd=rnd)
            if record is not None:
                return built, record
        else:
            log.warning("shard %d round %d: dropping the claim of attempt %s, which stopped "
                        "before writing its build (it never called mpu-complete)", shard, rnd,
                        intent.attempt or "?")
            if intent.upload_id:
                client.abort_upload(intent.file_id, intent.upload_id)
            drop_claim(state, doc, intent.attempt)

    stale = left("upload")
    if stale is not None:
        log.warning("shard %d round %d: aborting the upload a dead attempt left open", shard, rnd)
        client.abort_upload(stale["file_id"], stale["upload_id"])
        state.delete(doc("upload"))

    beat = heartbeat or (lambda: None)
    started = time.time()
    upload: UploadRecord | None = None
    upload_lock = threading.Lock()

    def send(part_number: int, data: bytes) -> Part:
        nonlocal upload
        with upload_lock:  # parts go out on several threads; create the upload once
            if upload is None:
                created = client.create_upload()
                upload = UploadRecord(file_id=created.file_id, upload_id=created.upload_id,
                                      created_at=time.time())
                put_json(state, doc("upload"), upload.model_dump())
        part = client.upload_part(upload.file_id, upload.upload_id, part_number, data)
        metrics.upload_bytes("moondream", len(data))
        return part

    def abandon() -> None:
        """Abort this execution's upload (nothing billed) and forget it."""
        with upload_lock:
            opened = upload
        if opened is None:
            return
        try:
            client.abort_upload(opened.file_id, opened.upload_id)
            forget_upload(state, doc, opened.upload_id)
        except Exception:  # the next attempt aborts it from upload.json
            log.warning("shard %d: could not abort the upload", shard, exc_info=True)

    if fetch is None:
        from moonbatch.workers.readers import ItemFetcher

        fetch = ItemFetcher(input_store).get  # type: ignore[arg-type]
    writer = PartWriter(part_size, send, concurrency=upload_concurrency)
    errors: dict[str, dict[str, str]] = {}
    sizes = Sizes()  # 16 bytes per item
    image_sizes: dict[str, list[list[int] | None]] = {}
    # int32 while the parts are in flight (4 bytes a line, not an int object and a pointer:
    # ~3.6 MB per 100,000 lines at the build's peak); the build's list is made after them.
    lines = array("i")
    line_skills: list[int] = []
    transformed = 0
    try:
        for index, line, changed, skill in iter_lines(
                items, fetch, options, concurrency=concurrency, errors=errors,
                max_pixels=max_pixels, indices=todo, id_prefix=id_prefix, sizes=sizes, more=more,
                image_sizes=image_sizes):
            beat()
            writer.write(line)
            lines.append(index)
            if more:
                line_skills.append(skill)
            transformed += changed
        parts = writer.close()
        beat()
    except BaseException:
        writer.abort()
        abandon()  # don't leave a half-sent upload behind
        raise

    # model_construct: these lists and dicts are built above with the right types; validating
    # would copy them (15 MB more for a 100,000-line shard, at the build's peak).
    build = ShardBuild.model_construct(
        lines=lines.tolist(), errors=errors, id_prefix=id_prefix, bytes=writer.bytes, parts=len(parts),
        part_size=part_size, transformed=transformed,
        build_seconds=round(time.time() - started, 3), sizes=sizes, image_sizes=image_sizes,
        skills=line_skills, attempt=attempt)
    if upload is None:
        return record_unsent(state, doc, build)
    intent = SubmitRecord(file_id=upload.file_id, upload_id=upload.upload_id, lines=len(lines),
                          bytes=writer.bytes, sent_at=time.time(), attempt=attempt)
    claimed = False
    recorded = None
    try:
        fence()  # an execution whose lease was taken over stops before it claims
        claimed = put_json(state, doc("submit"), intent.model_dump(), if_absent=True)
        if claimed and "build" not in present:
            # No build.json when the round was listed, before the claim: write_build
            # creates it if still absent, with no read of its version nor of the claim.
            # A claim is dropped only after its batch is recorded (or found never made):
            # looking after claiming sees the batch of any claim that came and went
            # before ours.
            recorded = recorded_round(state, doc)
            if recorded is None:
                write_build(state, doc, build, version=None, before_claim=True)
                fence()  # right before the call that bills
        elif claimed:
            with cf.ThreadPoolExecutor(1, thread_name_prefix="claimed") as pool:
                # The version write_build swaps on, read beside the look for a batch: both
                # after the claim, one round trip's wait instead of two in a row.
                version = pool.submit(version_of, state, doc("build"))
                recorded = recorded_round(state, doc)  # as above
            if recorded is None:
                write_build(state, doc, build, version=version.result())
                fence()  # right before the call that bills
    except BaseException:
        abandon()
        if claimed:
            drop_claim(state, doc, attempt)
        raise
    if recorded is not None:
        abandon()
        drop_claim(state, doc, attempt)
        log.info("shard %d round %d: another execution submitted the round; this one's "
                 "upload is aborted", shard, rnd)
        return recorded
    if not claimed:
        abandon()
        recorded = recorded_round(state, doc)
        if recorded is not None:
            log.info("shard %d round %d: another execution submitted the round; this one's "
                     "upload is aborted", shard, rnd)
            return recorded
        raise RoundClaimed(f"shard {shard} round {rnd}: another execution claimed the round's "
                           "submission and has not recorded its batch yet")
    try:
        batch = client.complete_upload(upload.file_id, upload.upload_id, parts, model=model)
    except (TransientError, RequestRejected) as exc:
        if isinstance(exc, RequestRejected) and exc.status != 404:
            abandon()  # refused: nothing was billed; the next attempt may claim the round
            drop_claim(state, doc, attempt)
            raise
        # The answer was lost, or an earlier try consumed the upload: find the batch.
        log.warning("shard %d round %d: %s; looking for the batch it created", shard, rnd, exc)
        forget_upload(state, doc, upload.upload_id)
        record = recover_lost_submit(client, state, doc, intent, claims,
                                      line_ids=build.line_ids(items, skill_names),
                                      shard=shard, rnd=rnd)
        if record is None:  # no batch to adopt: the round is built and sent again
            raise TransientError("mpu-complete", "answer lost and no batch found; the round "
                                 "is sent again") from None
        return build, record
    record = record_batch(state, doc, claims, batch.id, intent, recovered=False)
    if record.attempt != attempt:  # another batch was recorded first (see record_batch)
        return recorded_round(state, doc) or (build, record)
    log.info("shard %d round %d: batch %s submitted (%d lines, %d bytes, %d parts)",
             shard, rnd, batch.id, len(lines), writer.bytes, len(parts),
             extra={"batch_id": batch.id})
    return build, record


# -- the round's documents: written once, or by compare-and-swap -------------------------------
