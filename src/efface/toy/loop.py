"""One resumable training loop for every toy-sd stage (text encoder, VAE, classifier, UNet).

Randomness is derived from ``(seed, step)``, so a run resumed from a checkpoint draws the same
batches as one that never stopped. A non-finite loss stops the run with the stage and step named.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from efface.errors import TrainingDiverged
from efface.io import atomic_file

log = logging.getLogger(__name__)


@dataclass
class StepRandom:
    """The random sources of one step: numpy and torch, both seeded from (seed, step)."""

    np: np.random.Generator
    torch: torch.Generator


def step_random(seed: int, step: int) -> StepRandom:
    ss = np.random.SeedSequence([seed, step])
    gen = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))
    return StepRandom(np.random.default_rng(ss), gen)


def lr_factor(step: int, steps: int, warmup: int, floor: float) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    name: str,
    model: torch.nn.Module,
    loss_fn: Callable[[StepRandom], torch.Tensor],
    *,
    steps: int,
    lr: float,
    seed: int,
    checkpoint: Path,
    checkpoint_every: int = 250,
    warmup: int = 50,
    floor: float = 0.05,
    ema_decay: float | None = None,
    grad_clip: float = 1.0,
    weight_decay: float = 0.0,
) -> torch.nn.Module:
    """Train ``model`` for ``steps`` steps of ``loss_fn``; returns the model (or its EMA copy).

    Resumes from ``checkpoint`` when it exists, and rewrites it every ``checkpoint_every`` steps.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, floor))
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = state["step"]
        log.info("%s: resuming at step %d of %d", name, start, steps)

    def save(step: int) -> None:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "step": step}
        if ema is not None:
            state["ema"] = ema.state_dict()
        with atomic_file(checkpoint) as tmp:
            torch.save(state, tmp)

    model.train()
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, mininterval=2)
    for step in bar:
        loss = loss_fn(step_random(seed, step))
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"{name}: the loss became {loss.item()} at step {step}; nothing was written "
                f"past the last checkpoint ({checkpoint}). Lower the learning rate ({lr}) and rerun."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(pm, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    model.eval()
    return ema if ema is not None else model
