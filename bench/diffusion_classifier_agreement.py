"""Does the Diffusion Classifier (arXiv 2303.16203) agree with the toy classifier on toy-sd images?

Generates ``--per-shape`` images for each of the 6 shapes (captions naming the shape, colour and
background drawn at random, training words unless ``--split heldout``; 20 DDIM steps, guidance
7.5), then classifies every image with the Diffusion Classifier among the 6 prompts "a {shape}"
(toy-sd itself as the judge; toy settings unless ``--settings paper``) and with the shipped toy
classifier. Prints the agreement rate, both accuracies (against the prompted shape), seconds and
UNet evaluations. Default run: about 35 s on 2 CPU cores.

    python bench/diffusion_classifier_agreement.py [--per-shape 10] [--split train] [--settings toy] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from efface import load_pipeline
from efface.metrics.base import images_to_tensor
from efface.metrics.diffusion_classifier import DiffusionClassifier, DiffusionClassifierConfig
from efface.sampling import GenerationConfig, generate_many
from efface.toy import CLASSIFIER
from efface.toy.classifier import ToyClassifier
from efface.toy.world import SHAPES, prompts_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-shape", type=int, default=10, help="images per shape")
    parser.add_argument("--split", choices=("train", "heldout"), default="train",
                        help="captions: training words and templates, or held-out synonyms and templates")
    parser.add_argument("--settings", choices=("toy", "paper"), default="toy",
                        help="toy: stages (8, 32) keep (2, 1); paper: (50, 500) keep (5, 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(args.seed)
    labels = [i for i in range(len(SHAPES)) for _ in range(args.per_shape)]
    prompts = [p for s in SHAPES for p in prompts_for(s, args.split, rng=rng, n=args.per_shape)]

    start = time.perf_counter()
    images = generate_many(pipe, prompts, GenerationConfig(steps=20, guidance=7.5), seed=args.seed)
    gen_seconds = time.perf_counter() - start

    config = DiffusionClassifierConfig.toy() if args.settings == "toy" else DiffusionClassifierConfig()
    judge = DiffusionClassifier(pipe, config, seed=args.seed)
    start = time.perf_counter()
    dc = judge.classify(images, [f"a {s}" for s in SHAPES])
    dc_seconds = time.perf_counter() - start

    with torch.no_grad():
        toy = ToyClassifier.load(CLASSIFIER).predict(images_to_tensor(images))["shape"]
    toy = [SHAPES.index(s) for s in toy]

    dc, toy, labels = np.array(dc), np.array(toy), np.array(labels)
    n = len(images)
    print(f"images: {n} ({args.per_shape} per shape, {args.split} captions), generation {gen_seconds:.1f} s")
    print(f"diffusion classifier settings: {args.settings} (n_samples {config.n_samples}, to_keep {config.to_keep}, "
          f"loss {config.loss}, seed {args.seed})")
    print(f"agreement (DC == toy classifier): {np.mean(dc == toy):.3f}")
    print(f"DC accuracy (vs prompted shape):  {np.mean(dc == labels):.3f}")
    print(f"toy classifier accuracy:          {np.mean(toy == labels):.3f}")
    print(f"DC seconds: {dc_seconds:.1f} ({dc_seconds / n:.2f} per image)")
    print(f"DC UNet evaluations: {judge.unet_evaluations} ({judge.unet_evaluations / n:.0f} per image; "
          f"exhaustive {config.exhaustive_evaluations(len(SHAPES))} per image)")
    print("per shape (DC / toy correct): " + ", ".join(
        f"{s} {np.sum((dc == labels) & (labels == i))}/{np.sum((toy == labels) & (labels == i))}"
        for i, s in enumerate(SHAPES)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
