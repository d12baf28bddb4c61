"""Erase the shape "circle" from a toy model with every registered method and show it worked.

``--model toy`` (toy-sd, the default) or ``--model toy-flux``; the methods are those that declare
the model's family unless ``--methods`` names them.

For the base model and for each method (preset "toy", the CPU-sized schedule of
efface.toy.presets) prints: the toy classifier's circle rate on circle prompts (train words, and
held-out synonyms in held-out templates), the shape accuracy on the other shapes, wall time and
peak memory of the erasure, and its denoiser evaluations (the manifest's ``unet_evaluations``) per
iteration (``iterations``, RACE: plus ``esd_iterations``; "-" for closed forms).
Expected (issue 3): circle rate < 0.20 for every method, other shapes within 10 points of base
(issue 6 asks < 0.30 for its methods; the script holds every method to 0.20).

Every method gets the same request: erase the concept; preserve the other concepts of its axis
(used by the methods with a preservation term, as in their papers: UCE, RECE, MACE, AdvUnlearn,
DoCo, SalUn; ignored, with a log line, by the others); anchor: the method's default, except for
CA and DoCo, whose papers always map the target onto a named anchor concept: the first other
concept of the axis ("square" for "circle"). The request is the benchmark's own
(`efface.benchmark.grid.request_for`). (With the empty anchor CA can only bring the circle rate
down to that of toy-sd's shape-less prompts, "a red" and the like: 22%.)
Each method runs in its own subprocess so that its peak memory is its own.

    python bench/erasure_smoke.py [--model toy-flux] [--methods uce,esd-x] [--n 48] [--concept circle] [--set key=value ...]

``--set`` overrides an option of every method run, on top of its toy preset (as ``efface erase
--set``), e.g. ``--methods esd-x,esd-u --set reuse_trajectories=30``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import efface.methods  # noqa: F401  (registers the methods)
from efface import load_pipeline
from efface.benchmark.grid import request_for
from efface.config import parse_assignments
from efface.models.families import family_of
from efface.sampling import GenerationConfig
from efface.registry import METHODS
from efface.toy import ALIASES, CLASSIFIER, TOY_MODELS
from efface.toy.classifier import ToyClassifier
from efface.toy.presets import method_setup
from efface.toy.quality import concept_rates

CONFIG = GenerationConfig(steps=25, guidance=7.5, batch_size=48)


def _pipe(model: str):
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def child(model: str, method: str, concept: str, n: int, seed: int, sets: list[str]) -> None:
    from efface.methods import erase

    pipe = _pipe(model)
    request = request_for(method, [concept])  # the benchmark's request: preserve the axis, CA's named anchor
    options = parse_assignments(METHODS.get(method).Config, sets, owner=method)
    start = time.perf_counter()
    preset, inputs = method_setup(method, pipe)  # the toy preset and inputs, as efface erase --model toy
    erased = erase(pipe, method, [concept], seed=seed, preset=preset, progress=False, **inputs, **request, **options)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = erased.manifest["config"]
    iterations = config.get("iterations", 0) + config.get("esd_iterations", 0)
    evaluations = erased.manifest["unet_evaluations"]
    erased.apply(pipe)
    rates = concept_rates(pipe, ToyClassifier.load(CLASSIFIER), concept, n=n, seed=seed, config=CONFIG)
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "evaluations": evaluations,
                      "per_iteration": evaluations / iterations if iterations else None, **rates}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", choices=(*ALIASES, *TOY_MODELS),
                        help="the toy model (toy = toy-sd)")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every method that supports "
                                                        "the model's family)")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--n", type=int, default=48, help="prompts per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of every method run, over its toy preset (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.concept, args.n, args.seed, args.sets)
        return 0
    pipe = _pipe(args.model)
    if args.methods is None:
        args.methods = ",".join(METHODS.supporting(family_of(pipe).name))
    base = concept_rates(pipe, ToyClassifier.load(CLASSIFIER), args.concept, n=args.n, seed=args.seed,
                         config=CONFIG)
    print(f"{'method':<14} {'train rate':>10} {'held-out':>9} {'others':>7} {'seconds':>8} {'peak MB':>8} "
          f"{'evals/it':>8}")
    print(f"{'base':<14} {base['train_rate']:>10.3f} {base['heldout_rate']:>9.3f} {base['others']:>7.3f}")
    ok = True
    for method in args.methods.split(","):
        sets = [f"--set={s}" for s in args.sets]
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", method, "--concept", args.concept,
                               "--n", str(args.n), "--seed", str(args.seed), *sets], capture_output=True, text=True)
        if proc.returncode:
            print(f"{method:<14} FAILED\n{proc.stderr[-2000:]}")
            ok = False
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        per_iteration = "-" if r["per_iteration"] is None else f"{r['per_iteration']:.1f}"
        passed = r["train_rate"] < 0.20 and r["others"] >= base["others"] - 0.10
        ok &= passed
        print(f"{method:<14} {r['train_rate']:>10.3f} {r['heldout_rate']:>9.3f} {r['others']:>7.3f} "
              f"{r['seconds']:>8.1f} {r['peak_mb']:>8.0f} {per_iteration:>8}  {'ok' if passed else 'MISSED'}",
              flush=True)
    print(f"expected: {args.concept} rate < 0.20, others within 0.10 of base: {'MET' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
