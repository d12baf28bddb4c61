"""Diffusion Classifier: the diffusion model itself as a weight-free, zero-shot judge.

Li et al., "Your Diffusion Model is Secretly a Zero-Shot Classifier" (ICCV 2023, arXiv 2303.16203).
An image ``x`` is assigned the candidate prompt ``c`` whose conditioning best predicts the noise
added to it: ``argmin_c E_{t, eps} || eps - eps_theta(sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t, c) ||^2``
(a Monte Carlo estimate of the ELBO of ``log p(x | c)``), with ``x_0`` the VAE latent of the image.
Any model family (:mod:`efface.models.families`): the forward process and the regression target are
:func:`~efface.models.diffusion.add_noise`'s (the noise on epsilon models, v on v-prediction, the
velocity ``eps - x_0`` on flow matching, where ``x_t = (1 - t/T) x_0 + (t/T) eps``).

* One seeded noise bank of ``(t_k, eps_k)`` pairs is shared by every candidate (the paper's variance
  reduction: candidates are compared on the same noise) and by every image: the noise of one
  ``add_noise`` call over all the pairs, from a generator seeded ``seed`` anew for each image.
* The ``t_k`` are evenly spaced over the model's ``T`` training steps (1000; flow: ``t = 1000 sigma``):
  stride ``T // n``, starting half a stride in (official code, ``eval_prob_adaptive.py``).
* Adaptive evaluation (the paper's, official ``eval_prob_adaptive.py``): stage ``s`` evaluates ``n_samples[s]`` evenly spaced
  pairs (those not yet evaluated) for the surviving candidates, then keeps the ``to_keep[s]`` with
  the lowest mean error over all pairs they have seen.
* Conditional prediction only (no classifier-free guidance). Judge with the frozen *base* pipeline:
  an erased model would judge its own forgetting.

Defaults are the official README's zero-shot command (CIFAR-10: ``--n_trials 1 --to_keep 5 1
--n_samples 50 500``) with the script's defaults for the rest (loss ``l2``, batch 32).
:meth:`DiffusionClassifierConfig.toy` gives CPU-sized settings for toy-sd.

>>> dc = DiffusionClassifier(pipe, DiffusionClassifierConfig.toy())      # doctest: +SKIP
>>> dc.classify(images, ["a circle", "a square", "a star"])              # doctest: +SKIP
[0, 2]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from efface.errors import InputError
from efface.metrics.base import Metric, register_metric
from efface.models.diffusion import add_noise, num_train_timesteps, predict
from efface.models.families import Conditioning, family_of
from efface.models.text import check_prompt, encode

log = logging.getLogger(__name__)

PAPER = "Your Diffusion Model is Secretly a Zero-Shot Classifier (Li et al., ICCV 2023), arXiv 2303.16203"
LOSSES: dict[str, Callable[..., torch.Tensor]] = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}


@dataclass
class DiffusionClassifierConfig:
    """Evaluation schedule of the Diffusion Classifier (defaults: the official zero-shot command)."""

    n_samples: tuple[int, ...] = field(default=(50, 500), metadata={
        "help": "per stage, evenly spaced (t, noise) pairs; those not yet seen are evaluated for the surviving "
                "candidates (official --n_samples 50 500)"})
    to_keep: tuple[int, ...] = field(default=(5, 1), metadata={
        "help": "candidates kept after each stage, lowest mean error first (official --to_keep 5 1)"})
    n_trials: int = field(default=1, metadata={"help": "noise draws per timestep (official --n_trials 1)"})
    loss: str = field(default="l2", metadata={"help": "error between target and prediction: l2, l1 or huber "
                                                      "(official --loss, default l2)"})
    batch_size: int = field(default=32, metadata={"help": "(timestep, noise, prompt) triples per denoiser call "
                                                          "(official --batch_size 32)"})

    def __post_init__(self) -> None:
        self.n_samples, self.to_keep = tuple(self.n_samples), tuple(self.to_keep)
        if not self.n_samples or len(self.n_samples) != len(self.to_keep):
            raise InputError(f"n_samples {self.n_samples} and to_keep {self.to_keep} need one entry per stage "
                             "and at least one stage, e.g. n_samples=(50, 500), to_keep=(5, 1)")
        if min(self.n_samples) < 1 or any(a >= b for a, b in zip(self.n_samples, self.n_samples[1:])):
            raise InputError(f"n_samples must be positive and increasing from stage to stage, not {self.n_samples}")
        if min(self.to_keep) < 1 or any(a < b for a, b in zip(self.to_keep, self.to_keep[1:])):
            raise InputError(f"to_keep must be >= 1 and must not grow from stage to stage, not {self.to_keep}")
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.n_trials < 1 or self.batch_size < 1:
            raise InputError("n_trials and batch_size must be at least 1")

    @classmethod
    def toy(cls, **overrides: Any) -> DiffusionClassifierConfig:
        """CPU-sized settings for toy-sd: 8 then 32 timesteps, keeping 2 then 1 candidate (docs/evaluation.md)."""
        return cls(**{"n_samples": (8, 32), "to_keep": (2, 1), **overrides})

    def exhaustive_evaluations(self, n_candidates: int) -> int:
        """Denoiser evaluations per image without pruning: every candidate on every pair."""
        return n_candidates * max(self.n_samples) * self.n_trials


def timestep_schedule(num_train_timesteps: int, n: int) -> list[int]:
    """``n`` evenly spaced training timesteps: stride ``T // n`` from half a stride in (official code)."""
    if not 1 <= n <= num_train_timesteps:
        raise InputError(f"n_samples must be between 1 and the scheduler's {num_train_timesteps} training steps, "
                         f"not {n}")
    stride = num_train_timesteps // n
    return list(range(stride // 2, num_train_timesteps, stride))[:n]


def stage_positions(total: int, n: int) -> list[int]:
    """Positions (in the full schedule of ``total`` timesteps) of a stage's ``n`` evenly spaced ones."""
    stride = total // n
    return list(range(stride // 2, total, stride))[:n]


@dataclass
class DiffusionScores:
    """Per image and candidate: mean error over the pairs it was evaluated on (``errors``, N x K),
    how many pairs that was (``pairs``, N x K; pruned candidates saw fewer) and the winner."""

    errors: torch.Tensor
    pairs: torch.Tensor
    predictions: list[int]


class DiffusionClassifier:
    """Zero-shot classification of images among candidate prompts with a text-to-image pipeline.

    ``pipe``: a pipeline of any model family efface knows (:func:`~efface.models.families.family_of`)
    or a factory returning one. ``seed`` draws the noise bank. ``unet_evaluations`` counts every
    sample passed through the denoiser (UNet or transformer) since construction.
    """

    def __init__(self, pipe: Any, config: DiffusionClassifierConfig | None = None, *, seed: int = 0,
                 progress: bool = True):
        from diffusers import DiffusionPipeline

        self.pipe = pipe() if callable(pipe) and not isinstance(pipe, DiffusionPipeline) else pipe  # or a factory
        self.config = config or DiffusionClassifierConfig()
        self.seed, self.progress = seed, progress
        self.unet_evaluations = 0
        _check_pipeline(self.pipe)
        self.family = family_of(self.pipe)
        total = max(self.config.n_samples)
        self.timesteps = torch.tensor(timestep_schedule(num_train_timesteps(self.pipe), total))
        # noise bank: row k * n_trials + j is eps for position k (timestep self.timesteps[k]), trial j
        self.bank_timesteps = self.timesteps.repeat_interleave(self.config.n_trials)
        self.latent_shape = self.family.latent_shape(self.pipe)  # C x h x w

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image], candidates: Sequence[str]) -> DiffusionScores:
        """Mean errors of every candidate on every image, with adaptive pruning."""
        self._check(images, candidates)
        den = self.family.denoiser(self.pipe)
        cond = encode(self.pipe, list(candidates)).to(den.device, den.dtype)
        before = self.unet_evaluations
        errors, pairs, preds = [], [], []
        for image in tqdm(images, desc="diffusion classifier", disable=not self.progress or len(images) < 8):
            err, n, pred = self._classify_one(self._latent(image), cond)
            errors.append(err), pairs.append(n), preds.append(pred)
        log.info("diffusion classifier: %d images x %d candidates, %d denoiser evaluations", len(images),
                 len(candidates), self.unet_evaluations - before)
        return DiffusionScores(torch.stack(errors), torch.stack(pairs), preds)

    def classify(self, images: Sequence[Image.Image], candidates: Sequence[str]) -> list[int]:
        """Index of the best candidate prompt for each image."""
        return self.scores(images, candidates).predictions

    def _check(self, images: Sequence[Image.Image], candidates: Sequence[str]) -> None:
        if len(candidates) < 2:
            raise InputError(f"the diffusion classifier needs at least two candidate prompts to choose between, "
                             f"got {list(candidates)}; pass e.g. ['a circle', 'a square']")
        for c in candidates:
            check_prompt(self.pipe, c, "candidate prompt")
        if len(images) == 0:
            raise InputError("no images to classify; pass a non-empty list of PIL images")
        bad = [type(im).__name__ for im in images if not isinstance(im, Image.Image)]
        if bad:
            raise InputError(f"images must be PIL images, got {bad[0]}; convert arrays with PIL.Image.fromarray")

    def _latent(self, image: Image.Image) -> torch.Tensor:
        """x_0: the VAE posterior mean (as the official code), scaled (and shifted) as the denoiser
        reads latents, float32 1 x C x h x w on the CPU."""
        factor = self.pipe.vae_scale_factor
        h, w = self.latent_shape[1] * factor, self.latent_shape[2] * factor
        image = image.convert("RGB")
        if image.size != (w, h):
            image = ImageOps.fit(image, (w, h), method=Image.Resampling.BICUBIC)  # resize + centre crop
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        return self.family.encode_images(self.pipe, x).float().cpu()  # no generator: the mean

    def _classify_one(self, latent: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor, int]:
        k, total, trials = len(cond), len(self.timesteps), self.config.n_trials
        sums, counts = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.long)
        remaining, seen = list(range(k)), set()
        bank = self._noised(latent)
        for n, keep in zip(self.config.n_samples, self.config.to_keep):
            new = [p for p in stage_positions(total, n) if p not in seen]
            seen.update(new)
            rows = [p * trials + j for p in new for j in range(trials)]
            jobs = [(c, r) for c in remaining for r in rows]
            for (c, _), e in zip(jobs, self._errors(bank, cond, jobs) if jobs else []):
                sums[c] += float(e)
                counts[c] += 1
            means = sums / counts.clamp(min=1)
            remaining = sorted(remaining, key=lambda c: (float(means[c]), c))[:keep]  # ties: lower index
        return sums / counts, counts, remaining[0]

    def _noised(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target)`` of every noise-bank row for ``latent`` (the forward process and what the
        model predicts there: :func:`~efface.models.diffusion.add_noise`), on the CPU; the noise is
        drawn from a generator seeded ``seed`` anew, so every image gets the same bank."""
        x0 = latent.expand(len(self.bank_timesteps), *latent.shape[1:])
        return add_noise(self.pipe, x0, self.bank_timesteps, torch.Generator("cpu").manual_seed(self.seed))

    def _errors(self, bank: tuple[torch.Tensor, torch.Tensor], cond: Conditioning,
                jobs: list[tuple[int, int]]) -> torch.Tensor:
        """Per job (candidate, noise-bank row): the loss between the target and the model's output."""
        den, out = self.family.denoiser(self.pipe), []
        loss, (x_t_bank, target_bank) = LOSSES[self.config.loss], bank
        for start in range(0, len(jobs), self.config.batch_size):
            cand, rows = (torch.tensor(x) for x in zip(*jobs[start : start + self.config.batch_size]))
            x_t, target, t = x_t_bank[rows], target_bank[rows], self.bank_timesteps[rows]
            pred = predict(self.pipe, x_t.to(den.device, den.dtype), t.to(den.device), cond[cand.to(cond.device)])
            self.unet_evaluations += len(rows)
            out.append(loss(pred.float().cpu(), target, reduction="none").mean(dim=(1, 2, 3)))
        return torch.cat(out)


def _check_pipeline(pipe) -> None:
    family = family_of(pipe)  # refuses a pipeline of no known family, listing the supported ones
    needed = ("vae", family.denoiser_name, family.tokenizers[0], family.text_encoders[0], "scheduler")
    missing = [n for n in needed if getattr(pipe, n, None) is None]
    if missing:
        raise InputError(f"the diffusion classifier needs a complete {family.name} pipeline; this one has no "
                         f"{', '.join(missing)}. Load one with efface.load_pipeline")
    kind = family.prediction_type(pipe)
    if kind not in ("epsilon", "v_prediction", "flow"):
        raise InputError(f"prediction_type {kind!r} is not supported; epsilon, v_prediction or flow matching")


@register_metric("diffusion-classifier")
class DiffusionClassifierRate(Metric):
    """Fraction of images the Diffusion Classifier assigns to ``candidates[target]`` (e.g. the erased
    concept among its neighbours: lower means the concept is gone, as the model itself sees it)."""

    def __init__(self, pipe: Any, candidates: Sequence[str], target: int = 0,
                 config: DiffusionClassifierConfig | None = None, seed: int = 0):
        if not 0 <= target < len(candidates):
            raise InputError(f"target must index one of the {len(candidates)} candidates, not {target}")
        self.classifier = DiffusionClassifier(pipe, config, seed=seed)
        self.candidates, self.target = list(candidates), target
        super().__init__()

    def reset(self) -> None:
        self.hits: list[bool] = []
        self._start = self.classifier.unet_evaluations

    def update(self, images: Sequence[Image.Image], **batch: Any) -> None:
        """Classify ``images`` among the candidates and count how often the target wins."""
        self.hits += [p == self.target for p in self.classifier.classify(images, self.candidates)]

    def compute(self) -> dict[str, Any]:
        return {"rate": float(np.mean(self.hits)) if self.hits else None, "count": len(self.hits),
                "unet_evaluations": self.classifier.unet_evaluations - self._start}

    def provenance(self) -> dict[str, Any]:
        pipe = self.classifier.pipe
        return {"metric": self.name,
                "evaluator": {"name": "diffusion-classifier", "paper": PAPER,
                              "model": getattr(pipe.config, "_name_or_path", None) or type(pipe).__name__,
                              "config": asdict(self.classifier.config), "seed": self.classifier.seed,
                              "decision": "lowest mean denoising error (the model's own target), adaptive pruning"},
                "candidates": self.candidates, "target": self.target}
