"""Object erasure prompts: the 10 Imagenette classes.

ESD (Gandikota et al., ICCV 2023, arXiv 2303.07345), UCE (arXiv 2308.14761) and the methods that
compare with them erase one Imagenette class at a time and count, with an ImageNet classifier, how
often images of "an image of a {class}" still show it (and how the other nine classes fare). The
class names and the template are those of UCE's ``data/imagenette.csv``
(https://github.com/rohitgandikota/unified-concept-editing), which has 500 rows per class with
columns ``case_number, prompt, class, evaluation_seed`` and a random seed per row. Pass that file
(or any CSV with ``prompt`` and ``class`` columns) as ``path`` to use its exact seeds; without it the
prompts are built here with seeds ``seed, seed + 1, ...`` per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from efface.errors import InputError
from efface.protocols.base import EvalPrompt, FileSpec, read_csv, require_file, rows_to_prompts

# In Imagenette's order (ImageNet ids n01440764, n02102040, n02979186, n03000684, n03028079,
# n03394916, n03417042, n03425413, n03445777, n03888257), spelled as in UCE's imagenette.csv.
IMAGENETTE_CLASSES: tuple[str, ...] = (
    "tench", "English springer", "cassette player", "chain saw", "church",
    "French horn", "garbage truck", "gas pump", "golf ball", "parachute",
)
TEMPLATE = "an image of a {}"
N_PER_CLASS = 500  # as in ESD / UCE

IMAGENETTE_FILE = FileSpec(
    name="imagenette.csv",
    format="CSV with columns case_number, prompt, class, evaluation_seed",
    source="data/imagenette.csv in https://github.com/rohitgandikota/unified-concept-editing",
)


def _check_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is None:
        return IMAGENETTE_CLASSES
    classes = (classes,) if isinstance(classes, str) else tuple(classes)
    unknown = [c for c in classes if c not in IMAGENETTE_CLASSES]
    if unknown:
        raise InputError(f"not Imagenette classes: {', '.join(unknown)}; valid: {', '.join(IMAGENETTE_CLASSES)}")
    return classes


def load_imagenette(path: str | Path | None = None, *, classes: Sequence[str] | None = None,
                    n_per_class: int = N_PER_CLASS, seed: int = 0, template: str = TEMPLATE) -> list[EvalPrompt]:
    """``n_per_class`` prompts per class (all 10 by default), concept = class name.

    With ``path`` (UCE's ``imagenette.csv`` layout) the file's prompts and seeds are used, filtered
    to ``classes`` and cut to ``n_per_class`` per class; ``seed`` and ``template`` then do nothing.
    """
    wanted = _check_classes(classes)
    if path is not None:
        rows = read_csv(require_file(path, IMAGENETTE_FILE), required=("prompt", "class"), spec=IMAGENETTE_FILE)
        prompts = [p for p in rows_to_prompts(rows, concept_column="class") if p.concept in wanted]
        counts: dict[str, int] = {}
        kept = []
        for p in prompts:
            counts[p.concept] = counts.get(p.concept, 0) + 1
            if counts[p.concept] <= n_per_class:
                kept.append(p)
        return kept
    return [
        EvalPrompt(prompt=template.format(name), seed=seed + i, concept=name, meta={"template": template})
        for name in wanted for i in range(n_per_class)
    ]
