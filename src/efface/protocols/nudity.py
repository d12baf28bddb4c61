"""Nudity / inappropriate-content prompts: I2P and the red-teaming prompt files built from it.

- **I2P** (Schramowski et al., "Safe Latent Diffusion", CVPR 2023, arXiv 2211.05105): 4703 real
  user prompts from lexica.art, each with the seed, guidance scale and size it was generated with and
  the share of its images judged inappropriate / nude. The public file is ``i2p_benchmark.csv``
  (columns ``prompt, categories, hard, inappropriate_percentage, nudity_percentage, q16_percentage,
  sd_safety_percentage, prompt_toxicity, lexica_url, sd_seed, sd_guidance_scale, sd_image_width,
  sd_image_height, sd_model``); ESD and UCE ship the same prompts as ``unsafe-prompts4703.csv``
  with the seed and guidance columns renamed ``evaluation_seed``, ``evaluation_guidance`` and a
  ``case_number`` added. Both are read; per-prompt seeds and guidance scales are kept.
- **UnlearnDiffAtk** (Zhang et al., arXiv 2310.11868) attacks a nudity subset of I2P
  (``prompts/nudity.csv``, 142 prompts, the ESD/UCE column names): same reader.
- **Ring-A-Bell** (Tsai et al., ICLR 2024, arXiv 2310.10012) prompt files (``data/InvPrompt/*.csv``)
  have columns ``prompt, case_number, evaluation_seed``: same reader (no guidance, no categories).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from efface.errors import InputError
from efface.protocols.base import (EvalPrompt, FileSpec, first_present, parse_float, parse_int, read_csv,
                                   require_file)

I2P_FILE = FileSpec(
    name="i2p_benchmark.csv",
    format=("CSV with columns prompt, categories, hard, inappropriate_percentage, nudity_percentage, "
            "q16_percentage, sd_safety_percentage, prompt_toxicity, lexica_url, sd_seed, sd_guidance_scale, "
            "sd_image_width, sd_image_height, sd_model (the ESD/UCE copy unsafe-prompts4703.csv, with "
            "evaluation_seed, evaluation_guidance and case_number, is read as well)"),
    source=("https://huggingface.co/datasets/AIML-TUDA/i2p (file i2p_benchmark.csv, 4703 prompts); the ESD copy is "
            "data/unsafe-prompts4703.csv in https://github.com/rohitgandikota/erasing"),
)
UNLEARNDIFFATK_FILE = FileSpec(
    name="nudity.csv",
    format="CSV in the I2P layout with evaluation_seed, evaluation_guidance and case_number (142 prompts)",
    source="prompts/nudity.csv in https://github.com/OPTML-Group/Diffusion-MU-Attack",
)
RING_A_BELL_FILE = FileSpec(
    name="<Ring-A-Bell prompts>.csv",
    format="CSV with columns prompt, case_number, evaluation_seed",
    source=("data/InvPrompt/ in https://github.com/chiayi-hsu/Ring-A-Bell, or a file written by its "
            "InversePrompt notebook"),
)

SEED_COLUMNS = ("sd_seed", "evaluation_seed")
GUIDANCE_COLUMNS = ("sd_guidance_scale", "evaluation_guidance")
_INT_COLUMNS = ("hard", "case_number", "sd_image_width", "sd_image_height")
_FLOAT_COLUMNS = ("inappropriate_percentage", "nudity_percentage", "q16_percentage", "sd_safety_percentage",
                  "prompt_toxicity")


def split_categories(text: str) -> list[str]:
    """I2P's ``categories`` cell (``"violence, self-harm"``) as a list."""
    return [c.strip() for c in text.split(",") if c.strip()]


def _meta(row: dict[str, str]) -> dict:
    """The row's other columns, numbers parsed, categories split."""
    meta: dict = {}
    for key, value in row.items():
        if key in ("prompt", *SEED_COLUMNS, *GUIDANCE_COLUMNS):
            continue
        if key == "categories":
            meta[key] = split_categories(value)
        elif key in _INT_COLUMNS:
            meta[key] = parse_int(value)
        elif key in _FLOAT_COLUMNS:
            meta[key] = parse_float(value)
        else:
            meta[key] = value
    return meta


def _keep(row: dict[str, str], path: Path, categories: Sequence[str] | None,
          min_nudity_percentage: float | None, hard_only: bool) -> bool:
    for wanted, column in ((categories, "categories"), (min_nudity_percentage, "nudity_percentage"),
                           (hard_only or None, "hard")):
        if wanted is not None and column not in row:
            raise InputError(f"{path} has no {column!r} column, so it cannot be filtered on it (is it an I2P file?)")
    if categories is not None and not set(split_categories(row["categories"])) & set(categories):
        return False
    if min_nudity_percentage is not None and (parse_float(row["nudity_percentage"]) or 0.0) < min_nudity_percentage:
        return False
    return not hard_only or parse_int(row["hard"]) == 1


def read_nudity_csv(path: str | Path | None, spec: FileSpec, *, concept: str | None = None,
                    categories: Sequence[str] | None = None, min_nudity_percentage: float | None = None,
                    hard_only: bool = False, limit: int | None = None) -> list[EvalPrompt]:
    """Prompts of an I2P-style CSV, in file order, with their seeds and guidance scales.

    ``categories``: keep prompts with at least one of these I2P categories (e.g. ``["sexual"]``);
    ``min_nudity_percentage``: keep prompts whose ``nudity_percentage`` is at least this (0-100);
    ``hard_only``: keep I2P's ``hard`` prompts; ``limit``: the first ``limit`` kept prompts.
    """
    file = require_file(path, spec)
    if isinstance(categories, str):
        categories = [categories]
    rows = read_csv(file, required=("prompt",), spec=spec)
    kept = [r for r in rows if _keep(r, file, categories, min_nudity_percentage, hard_only)]
    prompts = [
        EvalPrompt(prompt=r["prompt"], seed=parse_int(first_present(r, SEED_COLUMNS)),
                   guidance=parse_float(first_present(r, GUIDANCE_COLUMNS)), concept=concept, meta=_meta(r))
        for r in kept
    ]
    return prompts[:limit] if limit is not None else prompts


def load_i2p(path: str | Path | None = None, *, categories: Sequence[str] | None = None,
             min_nudity_percentage: float | None = None, hard_only: bool = False,
             limit: int | None = None) -> list[EvalPrompt]:
    """I2P prompts (``i2p_benchmark.csv`` or ESD's ``unsafe-prompts4703.csv``); see :func:`read_nudity_csv`
    for the filters. ``concept`` is ``"nudity"`` when filtering on the ``sexual`` category or on a
    nudity percentage, else None (I2P mixes seven categories)."""
    nudity = (categories is not None and "sexual" in categories) or min_nudity_percentage is not None
    return read_nudity_csv(path, I2P_FILE, concept="nudity" if nudity else None, categories=categories,
                           min_nudity_percentage=min_nudity_percentage, hard_only=hard_only, limit=limit)


def load_unlearndiffatk_nudity(path: str | Path | None = None, *, limit: int | None = None) -> list[EvalPrompt]:
    """UnlearnDiffAtk's nudity prompts (``prompts/nudity.csv``), concept ``"nudity"``."""
    return read_nudity_csv(path, UNLEARNDIFFATK_FILE, concept="nudity", limit=limit)


def load_ring_a_bell(path: str | Path | None = None, *, concept: str = "nudity",
                     limit: int | None = None) -> list[EvalPrompt]:
    """Ring-A-Bell problematic prompts (``prompt, case_number, evaluation_seed``); ``concept`` names
    what the file attacks (its nudity files by default; pass ``"violence"`` for the violence ones)."""
    return read_nudity_csv(path, RING_A_BELL_FILE, concept=concept, limit=limit)
