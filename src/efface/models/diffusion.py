"""Diffusion helpers shared by erasure methods and attacks, for every model family: the denoiser's
prediction with or without classifier-free guidance, the forward process and its training target,
seeded partial sampling, frozen copies, a small training loop and the count of denoiser evaluations.

Each helper asks the pipeline's family (:mod:`efface.models.families`); nothing here knows about
any method: ESD, Concept Ablation and later methods build their losses from these pieces.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from efface.errors import InputError, TrainingDiverged
from efface.models.checkpoint import resumable
from efface.models.families import Conditioning, denoiser_classes, family_of
from efface.models.params import named_parameters, select
from efface.models.precision import Trainer

log = logging.getLogger(__name__)


def predict(pipe, x_t: torch.Tensor, t, cond: Conditioning, guidance: float | None = None,
            uncond: Conditioning | None = None, *, denoiser: torch.nn.Module | None = None) -> torch.Tensor:
    """The denoiser's output (epsilon, v or flow velocity: :func:`add_noise`'s target) at
    ``(x_t, t)`` given ``cond``; with ``guidance`` w and ``uncond``, the classifier-free guided
    ``out_u + w (out_c - out_u)`` in one batched call. ``denoiser``: a frozen copy instead of the
    pipeline's own. Conditionings of batch 1 are broadcast."""
    return family_of(pipe).predict(pipe, x_t, t, cond, guidance, uncond, denoiser=denoiser)


def sampler(pipe, num_steps: int, solver: str = "default"):
    """A private sampler with the pipeline's noise schedule, set to ``num_steps`` steps (DDIM on
    UNets, flow-matching Euler on transformers; ``solver="dpm++"``: DPM-Solver++ on UNets); its
    ``timesteps`` are the steps' timesteps."""
    return family_of(pipe).scheduler(pipe, num_steps, solver)


def initial_latents(pipe, batch: int, generator: torch.Generator) -> torch.Tensor:
    """x_T ~ N(0, I) at the denoiser's native latent size (B x C x H x W), drawn on the CPU."""
    return family_of(pipe).initial_latents(pipe, batch, generator)


def add_noise(pipe, x0: torch.Tensor, t, generator: torch.Generator | None,
              noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process q(x_t | x_0) at ``t`` (an int or one timestep per row, on the
    0 .. ``num_train_timesteps`` scale), noise drawn from ``generator``: ``(x_t, target)``, the
    target being what the denoiser predicts there (the noise for epsilon models, v for
    v-prediction, ``noise - x_0`` for flow matching). ``noise``: use this noise instead of drawing it."""
    return family_of(pipe).add_noise(pipe, x0, t, generator, noise)


def num_train_timesteps(pipe) -> int:
    return family_of(pipe).num_train_timesteps(pipe)


@torch.no_grad()
def sample_to(pipe, cond: Conditioning, uncond: Conditioning | None, stop_index: int, num_steps: int,
              guidance: float, generator: torch.Generator, latents: torch.Tensor | None = None, *,
              denoiser: torch.nn.Module | None = None, eta: float = 0.0, solver: str = "default") -> torch.Tensor:
    """Run the first ``stop_index`` of ``num_steps`` sampling steps from x_T and return the latent there.

    The result sits at timestep ``sampler(pipe, num_steps).timesteps[stop_index]`` (for
    ``stop_index == num_steps``: the final x_0). ``denoiser`` defaults to the pipeline's own;
    ``latents`` to fresh noise, one per row of ``cond``; ``eta > 0`` is stochastic DDIM, seeded by
    ``generator`` (UNet families); ``solver``: :func:`sampler`'s.
    """
    *_, x = _sampling(pipe, cond, uncond, stop_index, num_steps, guidance, generator, latents, denoiser, eta, solver)
    return x


@torch.no_grad()
def sample_trajectory(pipe, cond: Conditioning, uncond: Conditioning | None, stop_index: int, num_steps: int,
                      guidance: float, generator: torch.Generator, latents: torch.Tensor | None = None, *,
                      denoiser: torch.nn.Module | None = None, eta: float = 0.0) -> torch.Tensor:
    """Every latent of :func:`sample_to`'s run: ``(stop_index + 1) x B x ...``, element ``k`` the
    latent after ``k`` steps (``sample_to(..., k, ...)`` from the same x_T; element 0 is x_T as the
    sampler starts it). Costs what ``sample_to(..., stop_index, ...)`` costs."""
    return torch.stack(list(_sampling(pipe, cond, uncond, stop_index, num_steps, guidance, generator, latents,
                                      denoiser, eta)))


def _sampling(pipe, cond, uncond, stop_index, num_steps, guidance, generator, latents, denoiser, eta,
              solver="default"):
    """The latents of the first ``stop_index`` sampling steps, x_T first (:func:`sample_to`)."""
    family = family_of(pipe)
    if not 0 <= stop_index <= num_steps:
        raise InputError(f"stop_index must be in [0, {num_steps}], not {stop_index}")
    scheduler = family.scheduler(pipe, num_steps, solver)
    den = denoiser if denoiser is not None else family.denoiser(pipe)
    x = family.initial_latents(pipe, len(cond), generator) if latents is None else latents.to(den.device, den.dtype)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    yield x
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for t in scheduler.timesteps[:stop_index]:
        out = family.predict(pipe, scale(x, t), t, cond, guidance, uncond, denoiser=den)
        x = family.step(scheduler, out, t, x, eta, generator)
        yield x


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with no parameter requiring a gradient (the "original model")."""
    frozen = copy.deepcopy(module).eval()
    frozen.requires_grad_(False)
    return frozen


def trainable(pipe, parameter_set: str) -> dict[str, torch.nn.Parameter]:
    """Freeze every trainable component (denoiser, text encoders), then let only ``parameter_set``
    require gradients."""
    for _, _, p in named_parameters(pipe):
        p.requires_grad_(False)
    params = select(pipe, parameter_set)
    for p in params.values():
        p.requires_grad_(True)
    return params


def random_index(n: int, generator: torch.Generator, size: int | None = None):
    """Uniform integer(s) in [0, n) from ``generator``: an ``int``, or a tensor of ``size``."""
    if size is None:
        return int(torch.randint(n, (1,), generator=generator))
    return torch.randint(n, (size,), generator=generator)


def train_steps(loss_fn: Callable[[int], torch.Tensor], params: list[torch.nn.Parameter], iterations: int, *,
                lr: float, name: str, progress: bool = True, optimizer: str = "adam",
                weight_decay: float = 0.0, max_grad_norm: float = 0.0,
                state: dict[str, Any] | None = None,
                lr_schedule: Callable[[int], float] | None = None) -> list[float]:
    """Minimise ``loss_fn(i)`` for ``iterations`` steps with Adam (or ``"adamw"``) over ``params``;
    ``max_grad_norm`` > 0 clips the gradients' global norm before each step; ``lr_schedule(i)``
    multiplies ``lr`` at step ``i`` (0-based; a function of the step alone, so a resumed loop
    continues on the same schedule). Precision, gradient
    checkpointing and the 8-bit optimizer follow the enclosing
    :func:`efface.models.precision.training` block (fp32 master weights and autocast for fp16 /
    bf16 parameters by default; nothing changes on fp32 models).

    Raises :class:`~efface.errors.TrainingDiverged` naming ``name`` and the (1-based) iteration
    when the loss is NaN or infinite. Gradients are cleared afterwards; returns the losses.

    Inside :func:`efface.models.checkpoint.checkpointing` (``ErasureMethod.fit`` with a checkpoint
    directory) the loop is resumable: ``params``, the optimizer, the RNGs, the losses and ``state``
    (name -> what ``loss_fn`` changes besides ``params``: a module, an optimizer, a dict or a list
    of tensors; see :func:`~efface.models.checkpoint.resumable`) are saved every ``every``
    iterations and at the end, and restored from there by a rerun.
    """
    if iterations < 1:
        raise InputError(f"{name}: iterations must be at least 1, not {iterations}")
    if {"parameters", "optimizer", "masters", "loss_scale"} & set(state or {}):
        raise ValueError("train_steps: 'parameters', 'optimizer', 'masters' and 'loss_scale' are the loop's own "
                         "state names")
    trainer = Trainer(params, optimizer=optimizer, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    run = resumable(name, iterations, {"parameters": params, **trainer.state(), **(state or {})})
    losses = run.losses
    bar = tqdm(range(run.start, iterations), desc=name, disable=not progress, initial=run.start, total=iterations)
    try:
        for i in bar:
            trainer.zero_grad()
            with trainer.autocast():
                loss = loss_fn(i)
            value = float(loss.detach())
            if not torch.isfinite(loss.detach()).all():
                raise TrainingDiverged(f"{name}: the loss became {value} at iteration {i + 1} of {iterations}; "
                                       "nothing was kept. Lower the learning rate (lr=...) and try again")
            trainer.backward(loss)
            if lr_schedule is not None:
                trainer.scale_lr(lr_schedule(i))
            trainer.step()
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4g}")
            run.step(i + 1)
        run.finish()
    finally:
        bar.close()
        trainer.close()
    if trainer.skipped:
        log.warning("%s: %d of %d steps skipped (fp16 gradients overflowed; the loss scale adapted)", name,
                    trainer.skipped, iterations)
    if losses:
        log.info("%s: loss %.4g -> %.4g over %d iterations", name, losses[0], losses[-1], len(losses))
    return losses


class EvaluationCount:
    """Number of denoiser evaluations (one per sample in a batch) seen by :func:`count_denoiser_evaluations`."""

    def __init__(self) -> None:
        self.value = 0


@contextmanager
def count_denoiser_evaluations():
    """Count, inside the block, every sample passed through any family's denoiser (UNet, SD3 or Flux
    transformer: the pipeline's own, frozen copies, sampling and training):
    ``with count_denoiser_evaluations() as n: ...; n.value``. The forward hook is torch's
    module-level one, removed when the block ends."""
    classes = denoiser_classes()
    count = EvaluationCount()

    def hook(module, args, kwargs, output):
        if isinstance(module, classes):
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            count.value += int(sample.shape[0]) if sample is not None else 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


count_unet_evaluations = count_denoiser_evaluations  # the older name
