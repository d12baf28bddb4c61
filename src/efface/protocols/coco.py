"""COCO captions: the utility prompts (FID / CLIP score on unrelated content).

Two public formats are read:

- the official caption annotations ``captions_val2014.json`` / ``captions_val2017.json``
  (``annotations_trainval2014.zip`` / ``annotations_trainval2017.zip`` from https://cocodataset.org):
  ``{"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}]}``. One
  caption is drawn per image;
- the CSV that ESD and UCE evaluate with, ``coco_30k.csv`` (columns ``case_number, source, prompt,
  evaluation_seed``; ``data/coco_30k.csv`` in https://github.com/rohitgandikota/erasing), or any
  CSV with ``prompt`` and optionally ``evaluation_seed`` / ``seed`` columns.

``n`` prompts are sampled without replacement with ``random.Random(seed)`` and returned in file
order, so the same file, ``n`` and ``seed`` always give the same prompts. (RECE's 3000-prompt
subset was drawn with pandas' ``df.sample(n=3000, random_state=42)``: a different generator, so
pass that subset's file itself to reproduce it.)
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from efface.errors import InputError
from efface.protocols.base import EvalPrompt, FileSpec, read_csv, require_file, rows_to_prompts

COCO_FILE = FileSpec(
    name="captions_val2014.json",
    format=("the official COCO captions JSON (images + annotations with image_id and caption), or a CSV with "
            "columns case_number, prompt, evaluation_seed such as ESD's coco_30k.csv"),
    source=("https://cocodataset.org (annotations_trainval2014.zip: annotations/captions_val2014.json), or "
            "data/coco_30k.csv in https://github.com/rohitgandikota/erasing"),
)


def _sample(count: int, n: int | None, rng: random.Random) -> list[int]:
    """Sorted indices of ``n`` of ``count`` items (all of them when ``n`` is None)."""
    if n is None:
        return list(range(count))
    if not 0 < n <= count:
        raise InputError(f"cannot sample {n} prompts from a file that has {count}")
    return sorted(rng.sample(range(count), n))


def _from_json(path: Path, n: int | None, seed: int) -> list[EvalPrompt]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        annotations, images = data["annotations"], {im["id"]: im for im in data.get("images", [])}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a COCO captions file ({e}); expected format: {COCO_FILE.format}") from e
    by_image: dict[int, list[dict]] = defaultdict(list)
    for a in sorted(annotations, key=lambda a: (a["image_id"], a.get("id", 0))):
        by_image[a["image_id"]].append(a)
    rng = random.Random(seed)
    image_ids = sorted(by_image)
    prompts = []
    for i, k in enumerate(_sample(len(image_ids), n, rng)):
        image_id = image_ids[k]
        ann = rng.choice(by_image[image_id])
        meta = {"image_id": image_id, "annotation_id": ann.get("id"),
                "file_name": images.get(image_id, {}).get("file_name")}
        prompts.append(EvalPrompt(prompt=" ".join(ann["caption"].split()), seed=seed + i, meta=meta))
    return prompts


def _from_csv(path: Path, n: int | None, seed: int) -> list[EvalPrompt]:
    rows = read_csv(path, required=("prompt",), spec=COCO_FILE)
    picked = _sample(len(rows), n, random.Random(seed))
    prompts = rows_to_prompts(rows[k] for k in picked)
    # rows without a seed column get seed + position, like the JSON path
    return [p if p.seed is not None else EvalPrompt(p.prompt, seed + i, p.guidance, p.concept, p.meta)
            for i, p in enumerate(prompts)]


def load_coco(path: str | Path | None = None, *, n: int | None = None, seed: int = 0) -> list[EvalPrompt]:
    """``n`` COCO captions (all when None) sampled deterministically with ``seed``.

    Generation seeds: the CSV's ``evaluation_seed`` where it has one; otherwise ``seed + i`` for
    the ``i``-th returned prompt. ``meta`` keeps the image id and file name (JSON) or the CSV's
    other columns (``case_number``, ``source``...).
    """
    file = require_file(path, COCO_FILE)
    return _from_json(file, n, seed) if file.suffix.lower() == ".json" else _from_csv(file, n, seed)
