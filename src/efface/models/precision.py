"""How training methods train: fp32 master weights on half-precision pipelines, dynamic loss
scaling for fp16, optional gradient checkpointing of the denoiser, an optional 8-bit optimizer.

:meth:`~efface.methods.base.ErasureMethod.fit` runs a training method inside :func:`training`
with the method's :class:`TrainingOptions` (its config's ``mixed_precision``,
``gradient_checkpointing`` and ``optimizer_8bit``); every
:func:`~efface.models.diffusion.train_steps` loop then builds its optimizer and its step from
them (:class:`Trainer`):

* ``mixed_precision="auto"`` (default): where a trained parameter is fp16 / bf16 the optimizer
  holds an fp32 *master* copy of it and updates that; after each step the model's parameter is
  the master rounded to the model's dtype, so small updates add up instead of rounding away, and
  Adam's state (its ``eps`` of 1e-8 is zero in fp16) lives in fp32. The loss is computed under
  ``torch.autocast`` in the model's dtype, so losses, norms and softmaxes run in fp32 and tensors
  of mixed dtypes meet safely. fp16 also gets a dynamic loss scale (as ``torch.amp.GradScaler``:
  2^16 at the start, halved and the step skipped when a gradient overflows, doubled after 2000
  clean steps); bf16 has fp32's range and needs none. On fp32 pipelines nothing changes: the same
  optimizer on the same parameters, bit for bit.
* ``mixed_precision="off"``: the optimizer updates the parameters in their own dtype (Adam on
  fp16 weights: the old behaviour, kept for comparison).
* ``gradient_checkpointing=True``: the denoiser's blocks recompute their activations in the
  backward pass instead of keeping them (diffusers' ``enable_gradient_checkpointing``; restored
  afterwards). Text encoders are left alone: their activations are small, and transformers
  checkpoints only modules in training mode, which would switch T5's dropout on.
* ``optimizer_8bit=True``: bitsandbytes' ``Adam8bit`` / ``AdamW8bit`` in place of torch's Adam /
  AdamW, where the package is installed (refused before work otherwise).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from efface.errors import InputError
from efface.models.families import family_of

MIXED_PRECISION = ("auto", "off")
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TrainingOptions:
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    optimizer_8bit: bool = False

    def check(self) -> None:
        """Refuse an unknown precision mode, and the 8-bit optimizer where bitsandbytes is missing."""
        if self.mixed_precision not in MIXED_PRECISION:
            raise InputError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, not "
                             f"{self.mixed_precision!r}")
        if self.optimizer_8bit and importlib.util.find_spec("bitsandbytes") is None:
            raise InputError("optimizer_8bit=True needs the bitsandbytes package: pip install bitsandbytes, "
                             "or leave optimizer_8bit off")


@dataclass(frozen=True)
class Active:
    """The enclosing :func:`training` block: its options and the denoiser's dtype and device type."""

    options: TrainingOptions = TrainingOptions()
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The low precision the loss runs in under autocast, or None (fp32 model, or mixed precision off)."""
        return self.dtype if self.dtype in HALF and self.options.mixed_precision == "auto" else None


_ACTIVE: ContextVar[Active] = ContextVar("efface_training", default=Active())


def current() -> Active:
    """The enclosing :func:`training` block (the default options on an fp32 model outside one)."""
    return _ACTIVE.get()


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a method's own trained tensors (adversarial embeddings, soft prompts) are kept in
    for a model of ``dtype``: fp32 where mixed precision applies, else ``dtype``."""
    return torch.float32 if dtype in HALF and current().options.mixed_precision == "auto" else dtype


@contextmanager
def training(pipe, options: TrainingOptions) -> Iterator[TrainingOptions]:
    """Train inside the block with ``options``; gradient checkpointing of the pipeline's denoiser
    is switched on for the block and put back as it was."""
    options.check()
    denoiser = family_of(pipe).denoiser(pipe)
    token = _ACTIVE.set(Active(options, denoiser.dtype, denoiser.device.type))
    try:
        with checkpointed(denoiser) if options.gradient_checkpointing else nullcontext():
            yield options
    finally:
        _ACTIVE.reset(token)


@contextmanager
def checkpointed(module: torch.nn.Module) -> Iterator[None]:
    """Gradient checkpointing of a diffusers model within the block, as it was afterwards."""
    if not getattr(module, "_supports_gradient_checkpointing", False):
        raise InputError(f"{type(module).__name__} does not support gradient checkpointing: leave "
                         "gradient_checkpointing off")
    was = module.is_gradient_checkpointing
    module.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if not was:
            module.disable_gradient_checkpointing()


class LossScale:
    """Dynamic loss scaling for fp16 gradients (the schedule of ``torch.amp.GradScaler``)."""

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000):
        self.state = {"scale": scale, "clean": 0}
        self.growth_interval = growth_interval

    @property
    def scale(self) -> float:
        return self.state["scale"]

    def update(self, finite: bool) -> None:
        if finite:
            self.state["clean"] += 1
            if self.state["clean"] >= self.growth_interval:
                self.state.update(scale=self.scale * 2.0, clean=0)
        else:
            self.state.update(scale=self.scale / 2.0, clean=0)


class Trainer:
    """The optimizer of one training loop and how it steps, after :func:`current`'s options.

    ``backward(loss)`` then ``step()``; ``zero_grad()`` before each iteration. With fp32 masters
    (``masters`` not None) the optimizer updates the masters and copies them into ``params``."""

    def __init__(self, params: list[torch.nn.Parameter], *, optimizer: str, lr: float, weight_decay: float,
                 max_grad_norm: float, active: Active | None = None):
        active = active or current()
        options = active.options
        self.params, self.max_grad_norm = params, max_grad_norm
        self.autocast_dtype, self.device = active.autocast_dtype, active.device
        half = [p.dtype for p in params if p.dtype in HALF]
        mixed = bool(half) and options.mixed_precision == "auto"
        self.masters = [p.detach().float().clone() for p in params] if mixed else None
        self.loss_scale = LossScale() if mixed and torch.float16 in half else None
        self.optimizer = _optimizer(self.masters if mixed else params, optimizer, lr, weight_decay,
                                    options.optimizer_8bit)
        self.skipped = 0

    def state(self) -> dict:
        """What a checkpoint must hold besides ``params`` (:func:`~efface.models.checkpoint.resumable`)."""
        out = {"optimizer": self.optimizer}
        if self.masters is not None:
            out["masters"] = self.masters
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale.state
        return out

    def autocast(self):
        """The loss's context: autocast in the model's low precision (mixed precision on a half
        model), else nothing."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.autocast_dtype)

    def scale_lr(self, factor: float) -> None:
        """This step's learning rate: the loop's ``lr`` times ``factor`` (a schedule's value)."""
        for group in self.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * factor

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale.scale if self.loss_scale is not None else loss).backward()

    def step(self) -> bool:
        """Clip, step and copy back; False when an fp16 gradient overflowed and the step was skipped."""
        if self.masters is None:
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            return True
        scale = self.loss_scale.scale if self.loss_scale is not None else 1.0
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.detach().float() / scale
        finite = all(m.grad is None or torch.isfinite(m.grad).all() for m in self.masters)
        if self.loss_scale is not None:
            self.loss_scale.update(finite)
        if not finite:
            self.skipped += 1
            return False
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
        return True

    def close(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters or ():
            m.grad = None


def cosine_with_restarts(warmup: int, total: int, cycles: int):
    """A learning-rate factor per step (0-based): linear warm-up over ``warmup`` steps, then
    ``cycles`` cosine decays from 1 to 0, each restarting at 1 ("cosine with hard restarts", the
    schedule diffusers' training scripts name ``cosine_with_restarts``)."""
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))

    return factor


def _optimizer(params: list[torch.Tensor], kind: str, lr: float, weight_decay: float, eight_bit: bool):
    if kind not in ("adam", "adamw"):
        raise InputError(f"optimizer must be 'adam' or 'adamw', not {kind!r}")
    if eight_bit:
        import bitsandbytes as bnb

        cls = bnb.optim.Adam8bit if kind == "adam" else bnb.optim.AdamW8bit
    else:
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=weight_decay)

