"""Quality bar of a toy model (toy-sd, or toy-flux with --model toy-flux): does it draw the prompted
shape, colour and style? Generates images from held-out prompts (held-out templates and synonyms,
never seen by the denoiser) and from training prompts at 25 steps (toy-sd: DDIM; toy-flux: flow-
matching Euler) and guidance 7.5 (toy-flux: real classifier-free guidance), and prints the toy
classifier's per-axis accuracy. Bar (issues 2 and 15): held-out shape >= 0.90, colour >= 0.90,
style >= 0.80.

    python bench/toy_quality.py [--n 240] [--model toy | toy-flux | DIR]
"""

from __future__ import annotations

import argparse
import time

from efface import load_pipeline
from efface.sampling import GenerationConfig
from efface.toy import CLASSIFIER
from efface.toy.classifier import ToyClassifier
from efface.toy.quality import labelled_prompts, toy_accuracy

BAR = {"shape": 0.90, "colour": 0.90, "style": 0.80}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=240, help="images per split")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    classifier = ToyClassifier.load(CLASSIFIER)
    config = GenerationConfig(steps=25, guidance=7.5, batch_size=40)
    ok = True
    print(f"{'split':<8} {'images':>6} {'shape':>6} {'colour':>6} {'style':>6} {'seconds':>8}")
    for split in ("heldout", "train"):
        start = time.perf_counter()
        acc = toy_accuracy(pipe, classifier, labelled_prompts(args.n, split, args.seed), config, seed=args.seed)
        secs = time.perf_counter() - start
        print(f"{split:<8} {args.n:>6} {acc['shape']:>6.3f} {acc['colour']:>6.3f} {acc['style']:>6.3f} {secs:>8.1f}")
        if split == "heldout":
            ok = all(acc[a] >= bar for a, bar in BAR.items())
    print(f"bar (held-out): shape >= {BAR['shape']}, colour >= {BAR['colour']}, style >= {BAR['style']}: "
          f"{'MET' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
