"""Erase several toy shapes at once from toy-sd and show each is gone while the kept ones stay.

For the base model and for the erased one (the method's preset "toy") prints, per shape: the toy
classifier's rate of that shape on prompts naming it (train words; held-out synonyms in held-out
templates), marked "erased" or "kept", then wall time and peak memory of the erasure. Expected:
every erased shape's train rate < 0.30 and every kept shape's accuracy within 0.10 of base.

The request is the benchmark's (`efface.benchmark.grid.request_for`): the kept shapes are
preserved (used by methods with a preservation term), the anchor is the method's default (CA /
DoCo: the first kept shape), or ``--anchor``. Same generation settings as bench/erasure_smoke.py.

On toy-sd a prompt without a shape word ("a red") draws squares about half the time and circles a
quarter, so a method that maps erased shapes onto "" (MACE, UCE) cannot bring square below about
0.5 when square is erased: name a kept shape as the anchor (``--anchor heart``) for that case.

    python bench/multi_concept_smoke.py --method mace --concepts circle,square,triangle,star,cross
    python bench/multi_concept_smoke.py --method mace --keep heart --anchor heart   # all shapes but heart
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import efface.methods  # noqa: F401  (registers the methods)
from efface import load_pipeline
from efface.benchmark.grid import request_for
from efface.methods import erase
from efface.sampling import GenerationConfig
from efface.toy import CLASSIFIER
from efface.toy.classifier import ToyClassifier
from efface.toy.presets import method_setup
from efface.toy.quality import toy_accuracy
from efface.toy.world import AXES, SHAPES, prompts_for

CONFIG = GenerationConfig(steps=25, guidance=7.5, batch_size=48)  # as bench/erasure_smoke.py
ERASED_BAR, KEPT_BAR = 0.30, 0.10


def shape_rates(pipe, classifier: ToyClassifier, shapes: list[str], n: int, seed: int) -> dict[str, dict[str, float]]:
    """Per shape: the fraction of images of prompts naming it in which the classifier finds it."""
    free = {a: None for a in AXES}
    out = {}
    for shape in shapes:
        out[shape] = {}
        for split in ("train", "heldout"):
            prompts = [(p, {**free, "shape": shape}) for p in prompts_for(shape, split, rng=random.Random(seed), n=n)]
            out[shape][split] = toy_accuracy(pipe, classifier, prompts, CONFIG, seed=seed)["shape"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mace")
    parser.add_argument("--concepts", help="comma-separated shapes to erase")
    parser.add_argument("--keep", help="comma-separated shapes to keep: erase all the others")
    parser.add_argument("--anchor", help="what every erased shape maps to (default: the benchmark's request)")
    parser.add_argument("--n", type=int, default=48, help="prompts per shape and split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if bool(args.concepts) == bool(args.keep):
        parser.error("give exactly one of --concepts and --keep")
    if args.concepts:
        concepts = args.concepts.split(",")
    else:
        kept = set(args.keep.split(","))
        concepts = [s for s in SHAPES if s not in kept]
    unknown = [c for c in concepts if c not in SHAPES]
    if unknown or not concepts:
        parser.error(f"unknown or no shapes: {unknown}; choose among {', '.join(SHAPES)}")
    keep = [s for s in SHAPES if s not in concepts]

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    classifier = ToyClassifier.load(CLASSIFIER)
    base = shape_rates(pipe, classifier, list(SHAPES), args.n, args.seed)
    start = time.perf_counter()
    request = request_for(args.method, concepts)
    if args.anchor is not None:
        request["anchor"] = args.anchor
    preset, inputs = method_setup(args.method, pipe)  # the toy preset and inputs, as efface erase --model toy
    erased = erase(pipe, args.method, concepts, seed=args.seed, preset=preset, progress=False, **inputs, **request)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with erased.applied(pipe):
        after = shape_rates(pipe, classifier, list(SHAPES), args.n, args.seed)

    print(f"{args.method}: erase {','.join(concepts)}; keep {','.join(keep)}; anchor {request['anchor']!r}")
    print(f"{'shape':<10} {'role':<7} {'base':>6} {'after':>6} {'held-out base':>14} {'held-out after':>15}")
    ok = True
    for shape in SHAPES:
        role = "erased" if shape in concepts else "kept"
        b, a = base[shape], after[shape]
        passed = a["train"] < ERASED_BAR if role == "erased" else a["train"] >= b["train"] - KEPT_BAR
        ok &= passed
        print(f"{shape:<10} {role:<7} {b['train']:>6.3f} {a['train']:>6.3f} {b['heldout']:>14.3f} {a['heldout']:>15.3f}"
              f"  {'ok' if passed else 'MISSED'}")
    print(f"erasure: {seconds:.1f} s, peak {peak:.0f} MB")
    verdict = "MET" if ok else "NOT MET"
    print(f"expected: erased rates < {ERASED_BAR:.2f}, kept within {KEPT_BAR:.2f} of base: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
