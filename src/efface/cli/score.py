"""``efface score``: judge a folder of images made anywhere (:mod:`efface.judges`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from efface.cli.common import _refuse_existing
from efface.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def cmd_score(args: argparse.Namespace) -> int:
    from PIL import Image

    from efface.io import atomic_file
    from efface.judges import JUDGES, check_toy_concept, judge_named
    from efface.metrics.real import batches

    if args.judge not in JUDGES:
        raise InputError(f"unknown judge {args.judge!r}: choose one of {', '.join(JUDGES)}")
    folder = Path(args.images)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a directory of images")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    if args.judge == "toy":
        check_toy_concept(args.concept)
    _refuse_existing(args)
    judge = judge_named(args.judge, threshold=args.threshold, model_path=args.nudenet_model)
    results = []
    for batch in batches(files, 32):
        images = [Image.open(f).convert("RGB") for f in batch]
        for f, r in zip(batch, judge.scores(images, args.concept)):
            results.append({"file": f.name, **r})
    present = sum(r["present"] for r in results)
    out = {"judge": judge.describe(), "concept": args.concept, "images": str(folder), "n": len(results),
           "present": present, "rate": present / len(results), "per_image": results}
    with atomic_file(Path(args.out)) as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    log.info("%s: %d of %d images show %r (judge %s%s); wrote %s", folder, present, len(results), args.concept,
             args.judge, "" if judge.threshold is None else f", threshold {judge.threshold}", args.out)
    return 0
