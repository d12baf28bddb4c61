"""Utility on COCO captions, shared by every real-model suite.

The captions (:func:`efface.protocols.coco.load_coco`, each with its seed) are generated on the base
and on the erased model. Measured, each where its evaluator is at hand:

* ``paired_distance``: RMS pixel distance of the same caption and seed, base vs erased, in [0, 1]
  (no weights needed);
* ``clip_score``: the erased images against their captions (:class:`~efface.metrics.image_quality.ClipScore`);
* ``fid`` (and ``kid``): clean-fid's Inception features of the erased images against the real COCO
  images of those captions when their folder is given (the papers' FID), else against the base
  model's images of the same captions (``fid_reference`` says which).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from efface.errors import InputError
from efface.metrics.stats import mean_defined, paired_rms
from efface.protocols.base import EvalPrompt
from efface.suites.base import Group

GROUP = "coco"


def real_images(folder: str | Path, prompts: list[EvalPrompt]) -> list[Path]:
    """The real COCO image of every caption (``meta["file_name"]``, from the captions JSON) in ``folder``;
    an InputError before any work if the captions do not name their images or one is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--coco-images {folder} is not a folder; pass the folder of the COCO images "
                         "(e.g. val2014/) whose captions --coco gives")
    names = [p.meta.get("file_name") for p in prompts]
    if any(not n for n in names):
        raise InputError("--coco-images needs captions that name their images: pass the official captions JSON "
                         "(captions_val2014.json) as --coco, not a CSV")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise InputError(f"{len(missing)} COCO image(s) of the captions are not in {folder}, e.g. {missing[0]}")
    return [folder / n for n in names]


@dataclass
class Coco:
    """The COCO part of a suite: captions, and the evaluators given (None: not measured)."""

    prompts: list[EvalPrompt]
    clip: Any = None
    fid: Any = None
    real: list[Path] | None = None

    def groups(self) -> list[Group]:
        return [Group(GROUP, list(self.prompts), None, reference=True)] if self.prompts else []

    def metrics(self) -> list:
        return [m for m in (self.clip, self.fid) if m is not None]

    def key(self) -> dict[str, Any]:
        return {"coco": [asdict(p) for p in self.prompts], "clip": self.clip is not None, "fid": self.fid is not None,
                "real": [str(p) for p in self.real] if self.real else None}

    def score(self, images: dict[str, list], base: dict[str, list], samples: dict) -> dict[str, Any]:
        """The COCO entries of ``utility`` (None where not measured); per-image samples into ``samples``."""
        out: dict[str, Any] = {"paired_distance": None, "clip_score": None, "fid": None, "kid": None,
                               "fid_reference": None}
        if GROUP not in images:
            return out
        erased, reference = images[GROUP], base[GROUP]
        prompts = [p.prompt for p in self.prompts]
        seeds = len(erased) // max(len(prompts), 1)
        distances = [paired_rms(a, b) for a, b in zip(erased, reference)]
        out["paired_distance"] = mean_defined(distances)
        samples["utility.paired_distance"] = {GROUP: distances}
        if self.clip is not None:
            self.clip.reset()
            self.clip.update(erased, prompts=prompts * seeds)
            out["clip_score"] = self.clip.compute()["clip_score"]
            samples["utility.clip_score"] = {GROUP: list(self.clip.scores)}
        if self.fid is not None:
            from PIL import Image

            self.fid.reset()
            self.fid.update(erased, real=False)
            if self.real:
                self.fid.update([Image.open(p).convert("RGB") for p in self.real], real=True)
            else:
                self.fid.update(reference, real=True)
            found = self.fid.compute()
            out.update(fid=found["fid"], kid=found["kid"], fid_reference="coco images" if self.real else "base model")
        return out
