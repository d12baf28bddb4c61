"""Diffusion Classifier: the diffusion model itself as a weight-free, zero-shot judge.

Li et al., "Your Diffusion Model is Secretly a Zero-Shot Classifier" (ICCV 2023, arXiv 2303.16203).
An image ``x`` is assigned the candidate prompt ``c`` whose conditioning best predicts the noise
added to it: ``argmin_c E_{t, eps} || eps - eps_theta(sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t, c) ||^2``
(a Monte Carlo estimate of the ELBO of ``log p(x | c)``), with ``x_0`` the VAE latent of the image.

* One seeded noise bank of ``(t_k, eps_k)`` pairs is shared by every candidate (the paper's variance
  reduction: candidates are compared on the same noise) and by every image.
* The ``t_k`` are evenly spaced over the scheduler's ``T`` training steps (1000 for SD): stride
  ``T // n``, starting half a stride in (official code, ``eval_prob_adaptive.py``).
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
from efface.models.text import check_fits, encode

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
    loss: str = field(default="l2", metadata={"help": "error between noise and prediction: l2, l1 or huber "
                                                      "(official --loss, default l2)"})
    batch_size: int = field(default=32, metadata={"help": "(timestep, noise, prompt) triples per UNet call "
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
        """UNet evaluations per image without pruning: every candidate on every pair."""
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

    ``pipe``: a Stable-Diffusion-style pipeline (``vae``, ``unet``, ``tokenizer``, ``text_encoder``,
    a scheduler with ``alphas_cumprod``) or a factory returning one. ``seed`` draws the noise bank.
    ``unet_evaluations`` counts every sample passed through the UNet since construction.
    """

    def __init__(self, pipe: Any, config: DiffusionClassifierConfig | None = None, *, seed: int = 0,
                 progress: bool = True):
        self.pipe = pipe() if callable(pipe) and not hasattr(pipe, "unet") else pipe  # a pipeline or a factory
        self.config = config or DiffusionClassifierConfig()
        self.seed, self.progress = seed, progress
        self.unet_evaluations = 0
        _check_pipeline(self.pipe)
        unet, scheduler = self.pipe.unet, self.pipe.scheduler
        total = max(self.config.n_samples)
        self.timesteps = torch.tensor(timestep_schedule(scheduler.config.num_train_timesteps, total))
        self.alphas_cumprod = scheduler.alphas_cumprod.float().cpu()  # a_t (alpha-bar) of the paper
        size = unet.config.sample_size
        self.latent_hw = (size, size) if isinstance(size, int) else tuple(size)
        generator = torch.Generator("cpu").manual_seed(seed)
        # noise bank: row k * n_trials + j is eps for position k (timestep self.timesteps[k]), trial j
        self.noise = torch.randn((total * self.config.n_trials, unet.config.in_channels, *self.latent_hw),
                                 generator=generator)

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image], candidates: Sequence[str]) -> DiffusionScores:
        """Mean errors of every candidate on every image, with adaptive pruning."""
        self._check(images, candidates)
        emb = encode(self.pipe, list(candidates)).to(self.pipe.unet.device, self.pipe.unet.dtype)
        before = self.unet_evaluations
        errors, pairs, preds = [], [], []
        for image in tqdm(images, desc="diffusion classifier", disable=not self.progress or len(images) < 8):
            err, n, pred = self._classify_one(self._latent(image), emb)
            errors.append(err), pairs.append(n), preds.append(pred)
        log.info("diffusion classifier: %d images x %d candidates, %d UNet evaluations", len(images),
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
            check_fits(self.pipe.tokenizer, c, "candidate prompt")
        if len(images) == 0:
            raise InputError("no images to classify; pass a non-empty list of PIL images")
        bad = [type(im).__name__ for im in images if not isinstance(im, Image.Image)]
        if bad:
            raise InputError(f"images must be PIL images, got {bad[0]}; convert arrays with PIL.Image.fromarray")

    def _latent(self, image: Image.Image) -> torch.Tensor:
        """x_0: the VAE posterior mean (as the official code) times the scaling factor, float32 1 x C x h x w."""
        vae, factor = self.pipe.vae, self.pipe.vae_scale_factor
        h, w = self.latent_hw[0] * factor, self.latent_hw[1] * factor
        image = image.convert("RGB")
        if image.size != (w, h):
            image = ImageOps.fit(image, (w, h), method=Image.Resampling.BICUBIC)  # resize + centre crop
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        latent = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * vae.config.scaling_factor).float().cpu()

    def _classify_one(self, latent: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        k, total, trials = emb.shape[0], len(self.timesteps), self.config.n_trials
        sums, counts = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.long)
        remaining, seen = list(range(k)), set()
        for n, keep in zip(self.config.n_samples, self.config.to_keep):
            new = [p for p in stage_positions(total, n) if p not in seen]
            seen.update(new)
            rows = [p * trials + j for p in new for j in range(trials)]
            jobs = [(c, r) for c in remaining for r in rows]
            for (c, _), e in zip(jobs, self._errors(latent, emb, jobs) if jobs else []):
                sums[c] += float(e)
                counts[c] += 1
            means = sums / counts.clamp(min=1)
            remaining = sorted(remaining, key=lambda c: (float(means[c]), c))[:keep]  # ties: lower index
        return sums / counts, counts, remaining[0]

    def _errors(self, latent: torch.Tensor, emb: torch.Tensor, jobs: list[tuple[int, int]]) -> torch.Tensor:
        """Per job (candidate, noise-bank row): the loss between target and the UNet's prediction."""
        unet, out = self.pipe.unet, []
        loss, x0 = LOSSES[self.config.loss], latent
        for start in range(0, len(jobs), self.config.batch_size):
            cand, rows = (torch.tensor(x) for x in zip(*jobs[start : start + self.config.batch_size]))
            noise = self.noise[rows]
            t = self.timesteps[rows // self.config.n_trials]
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # forward process q(x_t | x_0)
            target = noise if _prediction_type(self.pipe) == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
            pred = unet(x_t.to(unet.device, unet.dtype), t.to(unet.device),
                        encoder_hidden_states=emb[cand.to(emb.device)]).sample
            self.unet_evaluations += len(rows)
            out.append(loss(pred.float().cpu(), target, reduction="none").mean(dim=(1, 2, 3)))
        return torch.cat(out)


def _prediction_type(pipe) -> str:
    return getattr(pipe.scheduler.config, "prediction_type", "epsilon")


def _check_pipeline(pipe) -> None:
    missing = [n for n in ("vae", "unet", "tokenizer", "text_encoder", "scheduler") if getattr(pipe, n, None) is None]
    if missing:
        raise InputError(f"the diffusion classifier needs a Stable-Diffusion-style pipeline; this one has no "
                         f"{', '.join(missing)}. Load one with efface.load_pipeline")
    if getattr(pipe.unet.config, "addition_embed_type", None) is not None:
        raise InputError("SDXL-style UNets (added text/time embeddings) are not supported by the diffusion "
                         "classifier yet; use an SD 1.x / 2.x pipeline")
    if getattr(pipe.scheduler, "alphas_cumprod", None) is None:
        raise InputError(f"scheduler {type(pipe.scheduler).__name__} has no alphas_cumprod; give the pipeline a "
                         "DDPM/DDIM-family scheduler, e.g. DDIMScheduler.from_config(pipe.scheduler.config)")
    if _prediction_type(pipe) not in ("epsilon", "v_prediction"):
        raise InputError(f"prediction_type {_prediction_type(pipe)!r} is not supported; epsilon or v_prediction")


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
                              "decision": "lowest mean noise-prediction error, adaptive pruning"},
                "candidates": self.candidates, "target": self.target}
