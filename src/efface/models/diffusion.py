"""Diffusion helpers shared by fine-tuning erasure methods: noise prediction with or without
classifier-free guidance, seeded partial DDIM sampling, frozen copies and a small training loop.

Nothing here knows about any method: ESD, Concept Ablation and later fine-tuning methods build
their losses from these pieces.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import contextmanager

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from efface.errors import InputError, TrainingDiverged
from efface.models.params import named_parameters, select

log = logging.getLogger(__name__)


def _batched(emb: torch.Tensor, n: int) -> torch.Tensor:
    return emb.expand(n, *emb.shape[1:]) if emb.shape[0] == 1 and n > 1 else emb


def predict_noise(unet, x_t: torch.Tensor, t, text_emb: torch.Tensor, guidance: float | None = None,
                  uncond_emb: torch.Tensor | None = None) -> torch.Tensor:
    """epsilon(x_t, t, c); with ``guidance`` w and ``uncond_emb``, the classifier-free guided
    e_u + w (e_c - e_u), computed in one batched UNet call. Embeddings of batch 1 are broadcast."""
    n = x_t.shape[0]
    cond = _batched(text_emb, n).to(x_t.dtype)
    if guidance is None or guidance == 1.0 or uncond_emb is None:
        return unet(x_t, t, encoder_hidden_states=cond).sample
    uncond = _batched(uncond_emb, n).to(x_t.dtype)
    tt = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim == 1 and t.numel() == n else t
    e_u, e_c = unet(torch.cat([x_t, x_t]), tt, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    return e_u + guidance * (e_c - e_u)


def ddim_scheduler(pipe, num_steps: int) -> DDIMScheduler:
    """A private DDIM scheduler with the pipeline's noise schedule, set to ``num_steps`` steps."""
    if num_steps < 1:
        raise InputError(f"the number of DDIM steps must be at least 1, not {num_steps}")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_steps, device=pipe.unet.device)
    return scheduler


def initial_latents(unet, batch: int, generator: torch.Generator) -> torch.Tensor:
    """x_T ~ N(0, I) at the UNet's native latent size, drawn on the CPU from ``generator``."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.randn((batch, unet.config.in_channels, h, w), generator=generator)
    return x.to(unet.device, unet.dtype)


def add_noise(pipe, x0: torch.Tensor, t, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process q(x_t | x_0): ``(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps)`` with
    ``eps ~ N(0, I)`` drawn from ``generator``; ``t`` an int or one timestep per row."""
    a = pipe.scheduler.alphas_cumprod[t].to(x0.device, x0.dtype)
    a = a.view(-1, 1, 1, 1) if a.dim() else a
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, noise


@torch.no_grad()
def sample_to(pipe, cond_emb: torch.Tensor, uncond_emb: torch.Tensor | None, stop_index: int, num_steps: int,
              guidance: float, generator: torch.Generator, latents: torch.Tensor | None = None, *,
              unet=None, eta: float = 0.0) -> torch.Tensor:
    """Run the first ``stop_index`` of ``num_steps`` DDIM steps from x_T and return the latent there.

    The result sits at timestep ``ddim_scheduler(pipe, num_steps).timesteps[stop_index]`` (for
    ``stop_index == num_steps``: the final x_0). ``unet`` defaults to ``pipe.unet``; ``latents`` to
    fresh noise, one per row of ``cond_emb``; ``eta > 0`` is stochastic DDIM, seeded by ``generator``.
    """
    unet = unet if unet is not None else pipe.unet
    if not 0 <= stop_index <= num_steps:
        raise InputError(f"stop_index must be in [0, {num_steps}], not {stop_index}")
    scheduler = ddim_scheduler(pipe, num_steps)
    x = initial_latents(unet, cond_emb.shape[0], generator) if latents is None else latents.to(unet.device, unet.dtype)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:stop_index]:
        eps = predict_noise(unet, scheduler.scale_model_input(x, t), t, cond_emb, guidance, uncond_emb)
        x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with no parameter requiring a gradient (the "original model")."""
    frozen = copy.deepcopy(module).eval()
    frozen.requires_grad_(False)
    return frozen


def trainable(pipe, parameter_set: str) -> dict[str, torch.nn.Parameter]:
    """Freeze the UNet and text encoder, then let only ``parameter_set`` require gradients."""
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
                weight_decay: float = 0.0, max_grad_norm: float = 0.0) -> list[float]:
    """Minimise ``loss_fn(i)`` for ``iterations`` steps with Adam (or ``"adamw"``) over ``params``;
    ``max_grad_norm`` > 0 clips the gradients' global norm before each step.

    Raises :class:`~efface.errors.TrainingDiverged` naming ``name`` and the (1-based) iteration
    when the loss is NaN or infinite. Gradients are cleared afterwards; returns the losses.
    """
    if iterations < 1:
        raise InputError(f"{name}: iterations must be at least 1, not {iterations}")
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise InputError(f"optimizer must be 'adam' or 'adamw', not {optimizer!r}")
    losses: list[float] = []
    bar = tqdm(range(iterations), desc=name, disable=not progress)
    try:
        for i in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(i)
            value = float(loss.detach())
            if not torch.isfinite(loss.detach()).all():
                raise TrainingDiverged(f"{name}: the loss became {value} at iteration {i + 1} of {iterations}; "
                                       "nothing was kept. Lower the learning rate (lr=...) and try again")
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4g}")
    finally:
        bar.close()
        for p in params:
            p.grad = None
    if losses:
        log.info("%s: loss %.4g -> %.4g over %d iterations", name, losses[0], losses[-1], len(losses))
    return losses


class UNetCount:
    """Number of UNet evaluations (one per sample in a batch) seen by :func:`count_unet_evaluations`."""

    def __init__(self) -> None:
        self.value = 0


@contextmanager
def count_unet_evaluations():
    """Count, inside the block, every sample passed through any diffusers UNet (the pipeline's own,
    frozen copies, sampling and training): ``with count_unet_evaluations() as n: ...; n.value``.
    The forward hook is torch's module-level one, removed when the block ends."""
    from diffusers import UNet2DConditionModel

    count = UNetCount()

    def hook(module, args, kwargs, output):
        if isinstance(module, UNet2DConditionModel):
            sample = args[0] if args else kwargs.get("sample")
            count.value += int(sample.shape[0]) if sample is not None else 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()
