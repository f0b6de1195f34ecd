"""Label Studio export (``--export label-studio``): ``annotations/label-studio/tasks.json``, a
pre-annotation import file, and ``annotations/label-studio/config.xml``, the labeling
configuration its predictions are written for.

The import format is Label Studio's "Basic Label Studio JSON format" with predictions
(labelstud.io/guide/predictions, labelstud.io/guide/task_format): a JSON list of tasks, each
``{"data": {...}, "predictions": [{"model_version", "result": [...]}]}``.

- One task per row (error rows too: a task without predictions, labelled from scratch), in
  plan order. ``data``: ``image`` (the row's ``source``: an ``s3://`` URL Label Studio reads
  through an S3 source storage, or a local path/URL), ``moonbatch_id`` (the row's id with its
  JSON type), ``question`` (query runs: the question asked of the image).
- ``result`` entries, ``id`` ``"<position>-<n>"``, ``to_name`` ``image``, ``from_name`` the
  skill's tag in ``config.xml``; coordinates in percent of the image (normalised × 100), with
  ``original_width``/``original_height`` where the image size is known:
  a detect box → ``rectanglelabels`` ``{x, y, width, height, rotation: 0}``; a point →
  ``keypointlabels`` ``{x, y, width: 1}`` (``width``: the point's drawn size); a segment → one
  ``polygonlabels`` ``{points: [[x, y], ...], closed: true}`` per polygon of its path
  (``moonbatch.workers.writers.shapes``); a caption or a query's answer → ``textarea``
  ``{text: [<text>]}``. Labels are the objects asked for.
- ``config.xml``: ``<Image name="image" value="$image"/>``, then per skill of the run a
  ``RectangleLabels``/``KeyPointLabels``/``PolygonLabels`` named after the skill with one
  ``Label`` per object met, or a ``TextArea`` (caption, query; a query's ``Header`` shows
  ``$question``).

Rows are read a shard at a time and the tasks written to a temporary file as they are:
memory does not grow with the run. The same rows give the same bytes.
"""

from __future__ import annotations

import io
import tempfile
from typing import IO, Any
from xml.sax.saxutils import quoteattr

import orjson

from moonbatch.workers import layout
from moonbatch.workers.models import RunSpec
from moonbatch.workers.storage import Store
from moonbatch.workers.writers import shapes
from moonbatch.workers.writers.exports import Item, items

TAGS = {"detect": "RectangleLabels", "point": "KeyPointLabels", "segment": "PolygonLabels"}
TYPES = {"detect": "rectanglelabels", "point": "keypointlabels", "segment": "polygonlabels",
         "caption": "textarea", "query": "textarea"}


def build(store: Store, spec: RunSpec, shards: int) -> tuple[bytes, bytes]:
    """``(tasks.json, config.xml)`` of the run's merged results (UTF-8; ``write_tasks`` into
    memory)."""
    tasks = io.BytesIO()
    config = write_tasks(tasks, store, spec, shards)
    return tasks.getvalue(), config


def write_tasks(out: IO[bytes], store: Store, spec: RunSpec, shards: int) -> bytes:
    """Write ``tasks.json`` of the run's merged results to the binary file ``out`` as the
    rows are read (memory holds one shard's rows and the labels met, whatever the run's
    size); return ``config.xml`` for the labels met (UTF-8)."""
    labels: dict[str, dict[str, None]] = {o.skill: {} for o in spec.all_options}
    for opts in spec.all_options:
        if opts.skill in TAGS and opts.object:
            labels[opts.skill][opts.object] = None
    version = f"moonbatch {spec.provider} {spec.endpoint or spec.model or 'default model'}"
    out.write(b"[")
    for n, item in enumerate(items(store, spec, shards)):
        out.write(b",\n" if n else b"")
        out.write(orjson.dumps(_task(item, spec, version, labels)))
    out.write(b"]")
    return _config(spec, labels)


def write(store: Store, spec: RunSpec, shards: int) -> None:
    """Write the run's tasks to a temporary file and put them and the configuration under
    ``annotations/label-studio/`` (a later call replaces them)."""
    with tempfile.TemporaryFile() as tasks:
        config = write_tasks(tasks, store, spec, shards)
        tasks.seek(0)
        store.put(layout.LABEL_STUDIO, tasks)
    store.put(layout.LABEL_STUDIO_CONFIG, config)


def _task(item: Item, spec: RunSpec, version: str,
          labels: dict[str, dict[str, None]]) -> dict[str, Any]:
    """One row → its task (labels met are added to ``labels``)."""
    data: dict[str, Any] = {"image": item.row.get("source") or item.file_name(spec),
                            "moonbatch_id": item.row.get("id")}
    for opts in spec.all_options:
        if opts.skill == "query":
            data["question"] = str(item.opts.get("question") or opts.question)
    task: dict[str, Any] = {"data": data}
    if not item.ok:
        return task
    size = item.size()
    results: list[dict[str, Any]] = []
    for opts, name, part in item.parts(spec):
        if opts.skill in TAGS:
            labels[opts.skill][name] = None
        for value in _values(opts.skill, part, name):
            entry: dict[str, Any] = {"id": f"{item.position}-{len(results) + 1}",
                                     "type": TYPES[opts.skill], "from_name": opts.skill,
                                     "to_name": "image", "value": value}
            if size is not None:
                entry.update(original_width=size[0], original_height=size[1], image_rotation=0)
            results.append(entry)
    task["predictions"] = [{"model_version": version, "result": results}]
    return task


def _values(skill: str, part: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """A skill's result → the ``value`` of each of its Label Studio results (percent)."""
    out: list[dict[str, Any]] = []
    if skill == "detect":
        for box in shapes.entries(part, "objects"):
            try:
                x0, y0 = float(box["x_min"]) * 100, float(box["y_min"]) * 100
                bw, bh = float(box["x_max"]) * 100 - x0, float(box["y_max"]) * 100 - y0
            except (KeyError, TypeError, ValueError):
                continue
            out.append({"x": x0, "y": y0, "width": bw, "height": bh, "rotation": 0,
                        "rectanglelabels": [name]})
    elif skill == "point":
        for point in shapes.entries(part, "points"):
            try:
                x, y = float(point["x"]) * 100, float(point["y"]) * 100
            except (KeyError, TypeError, ValueError):
                continue
            out.append({"x": x, "y": y, "width": 1.0, "keypointlabels": [name]})
    elif skill == "segment":
        for flat in shapes.polygons(part.get("path"), 100, 100):
            out.append({"points": [[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)],
                        "closed": True, "polygonlabels": [name]})
    else:
        text = part.get("caption" if skill == "caption" else "answer")
        if isinstance(text, str):
            out.append({"text": [text]})
    return out


def _config(spec: RunSpec, labels: dict[str, dict[str, None]]) -> bytes:
    """The labeling configuration (XML) the tasks' ``from_name``/``to_name`` refer to."""
    lines = ["<View>", '  <Image name="image" value="$image"/>']
    for opts in spec.all_options:
        skill = opts.skill
        if skill in TAGS:
            lines.append(f'  <{TAGS[skill]} name="{skill}" toName="image">')
            lines += [f"    <Label value={quoteattr(name)}/>" for name in labels[skill]]
            lines.append(f"  </{TAGS[skill]}>")
        else:
            if skill == "query":
                lines.append('  <Header value="$question"/>')
            lines.append(f'  <TextArea name="{skill}" toName="image" editable="true"/>')
    lines.append("</View>")
    return ("\n".join(lines) + "\n").encode()
