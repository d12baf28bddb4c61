"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023, arXiv 2303.07345).

The denoiser (UNet or transformer) is fine-tuned so that, on the erased concept ``c``, it predicts
the frozen original model's *negatively guided* output. Each iteration picks a concept, a sampling
step ``k`` uniformly in ``[0, ddim_steps)`` and produces ``x_t`` by running the first ``k`` steps of
the family's sampler (:func:`~efface.models.diffusion.sampler`: DDIM on UNets, flow-matching Euler
on SD3 / Flux), conditioned on ``c`` with classifier-free guidance ``start_guidance``, from the
model being trained. With the frozen original model ``theta*`` and the negative guidance ``eta``::

    e_0 = out_theta*(x_t, t, "")        e_p = out_theta*(x_t, t, c)
    loss = || out_theta(x_t, t, c) - (e_0 - eta (e_p - e_0)) ||^2

``out`` is the family's model output (:func:`~efface.models.diffusion.predict`): the noise
epsilon, v on v-prediction models (SD 2.x 768), the flow velocity on SD3 / Flux. For a fixed x_t
each is affine in epsilon, so the target means the same on every family and is used unchanged.

Four registrations differ only in the parameters trained, the family's named sets
(:mod:`efface.models.params`; :mod:`efface.models.families.unet` / :mod:`~efface.models.families.flow`
say what each selects): ``esd-x`` ``xattn``, ``esd-x-strict`` ``xattn_kv``, ``esd-u`` ``noxattn``,
``esd-all`` ``all``. Per family:

**SD 1.x / 2.x** (toy-sd included), as the official ``train_method`` values: ``esd-x`` every
cross-attention parameter (the paper's choice for artistic styles), ``esd-x-strict`` only the
cross-attention key / value projections, ``esd-u`` everything but cross-attention, the time
embedding and the output layer (the paper's choice for objects and nudity), ``esd-all`` every UNet
parameter. The sets follow the CompVis code (``xattn``, ``noxattn``, ``full``); the diffusers script
selects only ``Linear`` / ``Conv2d`` modules, so its ``esd-u`` / ``esd-all`` leave normalisation
layers out (and its ``esd-u`` trains the time embedding and input / output convolutions).
Defaults are the paper's, as in its CompVis code (``train-scripts/train-esd.py`` in
github.com/rohitgandikota/erasing before the diffusers rewrite): 1000 iterations, batch 1, Adam at
lr 1e-5, ``negative_guidance`` 1.0, ``start_guidance`` 3.0, 50 DDIM steps (eta 0), x_t sampled
from the model being trained. The newer diffusers scripts of the same repository (``esd_sd.py``,
``esd_sdxl.py``) and the community forks built on them write the target anchored on the
*concept's* prediction, ``e_p - eta' (e_p - e_0)`` (``e_from`` = ``e_p`` unless ``--erase_from``
is given), which is ``e_0 - (eta' - 1)(e_p - e_0)``: their ``eta'`` is efface's
``negative_guidance + 1``. ``esd_sd.py`` (SD 1.4) uses 200 iterations, lr 5e-5, its
``negative_guidance`` 2 (efface's 1, the paper's), guidance 3 with 50 steps, batch 1 and samples
x_t with the frozen model: ``iterations=200, lr=5e-5, sample_with="frozen"`` reproduce it.
``esd-x-strict`` exists only in those scripts (the CompVis code has no key / value-only set), so its
defaults are ``esd_sd.py``'s (:class:`ESDxStrictConfig`: 200 iterations, lr 5e-5, frozen sampler);
the other variants keep the paper's.

**SDXL**: the UNet as on SD, its cross-attention reading both CLIP encoders' states; ``noxattn``
also leaves ``add_embedding`` (the pooled-text and time-id path) out with the time embedding, and
``all`` includes it. The official ``esd_sdxl.py`` (same repository) trains the same modules for
``esd-x`` / ``esd-x-strict`` (every ``attn2`` Linear; ``attn2.to_k`` / ``to_v``); its ``esd-u`` /
``esd-all`` (which it calls experimental on SDXL) take only ``Linear`` / ``Conv2d`` inside the
blocks, without any ``emb`` layer (resnets' ``time_emb_proj``, ``conv_in`` / ``conv_out`` and the
norms stay), where efface trains the ``noxattn`` / ``all`` sets above. Its settings: 200 iterations,
lr 2e-4 (1e-5 for esd-u / esd-all), x_t at guidance 2 with 50 steps, sampled by the frozen model,
its eta 1 (efface's ``negative_guidance=0``: the target is the empty prompt's prediction ``e_0``),
batch 1, 1024 px, bf16: ``iterations=200, lr=2e-4, start_guidance=2, sample_with="frozen",
negative_guidance=0`` reproduce them (``ddim_steps`` 50 is the default). Differences: x_t is
sampled with DDIM (eta 0) on the pipeline's noise schedule, not with the pipeline's Euler
scheduler; the time ids are the native size (the UNet's latent size times the VAE factor: 1024 on
SDXL base), as the script's.

**SD3 / SD3.5**: no official ESD script. ``esd-x`` trains every parameter of each block's joint
attention (``attn``: the image and text streams' projections and, on SD3.5, the q / k norms; not
SD3.5's image-only ``attn2``), ``esd-x-strict`` the text stream's ``add_k_proj`` / ``add_v_proj``,
``esd-u`` every transformer parameter outside the joint attention and the embedders / output layer,
``esd-all`` every transformer parameter. A community script (``esd_sd35.py`` in the fork
github.com/CookedMorsel/erasing) takes every ``Linear`` under ``.attn.`` for esd-x (the same
projections) and every ``Linear`` / ``Conv2d`` outside it for esd-u (the embedders and output
layer included); it samples x_t with the frozen model at guidance 7.5 and 28 steps, 200 iterations,
lr 3e-5, its eta 2 (the target form of ``esd_sd.py``: efface's ``negative_guidance`` 1), and queries
e_0 with the *concept's* pooled embedding, where efface's e_0 is the
empty prompt's, pooled part included. x_t here: flow-matching Euler with the pipeline's shift,
classifier-free guidance against the empty prompt.

**Flux**: ``esd-x`` trains every parameter of every attention module, double and single blocks
(the community ESD-Flux script, ``esd_flux.py`` in forks of the official repository such as
github.com/milosz7/erasing, trains every Linear named ``attn``: the same projections; efface also
trains their q / k RMSNorm weights); ``esd-x-strict`` what the text is projected to (double blocks:
``add_k_proj`` / ``add_v_proj``; single blocks: the shared ``to_k`` / ``to_v``), where ESD-Flux's
takes ``attn.to_k`` / ``to_v`` everywhere, the image stream's in double blocks; ``esd-u`` /
``esd-all`` are efface's sets (ESD-Flux has only esd-x and esd-x-strict). ESD-Flux's settings:
FLUX.1-dev, 28 steps, 1400 iterations, lr 1e-4, its eta 1 (written in ``esd_sd.py``'s target form:
efface's ``negative_guidance`` 0), 512 px, x_t sampled by the model being
trained at *distilled* guidance 3.5 without classifier-free guidance, the predictions at guidance
embedding 1. efface on Flux samples x_t with *real* classifier-free guidance ``start_guidance``
against the empty prompt (two transformer calls per step), and on checkpoints with a guidance
embedding (FLUX.1-dev) every call (sampling, frozen and trained predictions) also gets the
family's distilled guidance 3.5. ``iterations=1400, lr=1e-4, ddim_steps=28, start_guidance=1, negative_guidance=0``
is the nearest: x_t as ESD-Flux's (distilled guidance only); its predictions at guidance 1 and its
512 px are not reproduced (x_t is at the VAE's native size, 1024 px on FLUX.1).

Differences from the official code on every family, and why:

* the denoiser is queried at x_t's own sampler timestep (as ``esd_sd.py`` and the SDXL / Flux scripts
  do); the CompVis code draws a DDPM timestep uniformly in ``[1000 k / 50, 1000 (k + 1) / 50)``,
  which lies 40-60 timesteps above the noise level its sampler actually stopped at;
* every random draw (concept, step, x_T) comes from the seeded generator; the official code is
  unseeded;
* an anchor other than "" replaces the empty prompt of e_0 (target ``e_a - eta (e_p - e_a)``);
  the official code always uses "" (its ``--erase_from`` is another thing: the concept is erased
  from that prompt). Preserved concepts are not used: ESD has no preservation term;
* ``templates`` (default ``("{}",)``, the bare concept as the official code) can put the concept
  into prompt contexts, one drawn per iteration: ``c`` = ``"a red circle"``, and the anchor side
  the same context without it (``"a red"``, or with the anchor). Only the ``toy`` presets of
  ``esd-x`` / ``esd-x-strict`` use it (toy-sd's token states depend on the whole caption).

``reuse_trajectories`` (default 0: off, the official schedule above, draws unchanged) is **not**
the official schedule. The official loop spends almost all its denoiser evaluations in the no-grad
partial sampling of x_t: ``batch_size (2 step + 3)`` per iteration, ``step`` uniform in
``[0, ddim_steps)`` (about 52 at 50 steps, batch 1). With ``k > 0``, every ``k`` iterations (and
when a loop starts) ``trajectory_pool`` trajectories, each with its own concept row and x_T, are
sampled whole (to step ``ddim_steps - 1``) by the ``sample_with`` model, every intermediate x_t
kept; each iteration draws ``batch_size`` distinct latents of those ``ddim_steps x
trajectory_pool``, each at its own step and timestep. That costs ``2 trajectory_pool (ddim_steps -
1) / k + 3 batch_size`` evaluations per iteration; with ``sample_with="trained"`` an x_t is up to
``k - 1`` iterations older than the model. RACE inherits the option (x_T per row as its target).
docs/erasure.md ("ESD notes") has the toy-sd measurements.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from efface.methods.base import ErasureMethod, ErasureRequest, TrainingConfig, register_method
from efface.methods.prompts import draw_row, filled
from efface.errors import InputError
from efface.models.diffusion import (frozen_copy, initial_latents, predict, random_index, sample_to,
                                     sample_trajectory, sampler, train_steps, trainable)
from efface.models.families import Conditioning, family_of
from efface.models.text import encode

log = logging.getLogger(__name__)


@dataclass
class ESDConfig(TrainingConfig):
    iterations: int = field(default=1000, metadata={"help": "optimisation steps, one concept each"})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate"})
    negative_guidance: float = field(default=1.0, metadata={"help": "negative guidance eta of the target"})
    start_guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance scale used to sample x_t "
                                                                  "(against the empty prompt; Flux: real CFG)"})
    ddim_steps: int = field(default=50, metadata={"help": "steps of the partial sampling of x_t (DDIM on UNets, "
                                                          "flow-matching Euler on SD3 / Flux)"})
    batch_size: int = field(default=1, metadata={"help": "x_t samples per iteration, sharing one sampling step "
                                                          "(official: 1)"})
    sample_with: str = field(default="trained", metadata={"help": "model that samples x_t: 'trained' (paper, "
                                                                   "CompVis code) or 'frozen' (esd_sd.py)"})
    templates: tuple[str, ...] = field(default=("{}",), metadata={"help": "prompt templates, '{}' is the concept "
                                                                          "(or anchor); one drawn per iteration "
                                                                          "(official: the bare concept)"})
    reuse_trajectories: int = field(default=0, metadata={"help": "NOT the official schedule: k > 0 samples "
                                                                  "trajectory_pool whole trajectories (every x_t "
                                                                  "kept) every k iterations and draws each "
                                                                  "iteration's batch from their x_t, one step per "
                                                                  "row; 0 (official): fresh partial sampling every "
                                                                  "iteration"})
    trajectory_pool: int = field(default=1, metadata={"help": "trajectories sampled together for "
                                                               "reuse_trajectories, each its own concept row and x_T"})

    def __post_init__(self) -> None:
        self.check_bounds(at_least_one=("iterations", "ddim_steps", "batch_size", "trajectory_pool"),
                          positive=("lr",), non_negative=("reuse_trajectories",))
        self.check_choices(sample_with=("trained", "frozen"))
        self.check_templates("templates")
        if self.reuse_trajectories and self.trajectory_pool * self.ddim_steps < self.batch_size:
            raise InputError(f"reuse_trajectories draws batch_size ({self.batch_size}) distinct x_t from "
                             f"trajectory_pool x ddim_steps = {self.trajectory_pool * self.ddim_steps}: "
                             "sample more trajectories (trajectory_pool) or take a smaller batch")


@dataclass
class ESDxStrictConfig(ESDConfig):
    """``esd-x-strict``'s defaults: the only official script with that parameter set is ``esd_sd.py``
    (200 iterations, lr 5e-5, x_t sampled by the frozen model; its eta 2 is ``negative_guidance`` 1)."""

    iterations: int = field(default=200, metadata={"help": "optimisation steps, one concept each (esd_sd.py: 200)"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate (esd_sd.py: 5e-5)"})
    sample_with: str = field(default="frozen", metadata={"help": "model that samples x_t: 'frozen' (esd_sd.py, the "
                                                                  "only official esd-x-strict) or 'trained'"})


def esd_target(e_0: torch.Tensor, e_p: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """The ESD regression target ``e_0 - eta (e_p - e_0)``: the frozen model's prediction guided
    *away* from the concept (the paper's fine-tuning target)."""
    return e_0 - negative_guidance * (e_p - e_0)


class ESD(ErasureMethod[ESDConfig]):
    """ESD fine-tuning (arXiv 2303.07345); registered as esd-x, esd-x-strict, esd-u and esd-all."""

    Config = ESDConfig
    paper = "Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), arXiv 2303.07345"
    parameter_set: ClassVar[str] = "xattn"
    # every family: the target is affine in the model output (epsilon, v or flow velocity); what each
    # variant trains per family and how it differs from the official / community scripts: module docstring
    families: ClassVar[frozenset[str]] = frozenset({"sd", "sdxl", "sd3", "flux"})
    family_notes: ClassVar[dict[str, str]] = {}

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> None:
        if request.preserve:
            log.info("%s: preserved concepts are not used (ESD has no preservation term)", self.name)
        self._train(pipe, request, generator, progress, self.config.iterations)

    def _train(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool, iterations: int,
               perturb=None, frozen=None) -> list[float]:
        """``iterations`` ESD steps; returns the losses. ``perturb(c, x_t, t, x_T)``, if given,
        returns the conditioning (a :class:`~efface.models.families.Conditioning`) the trained model
        sees in the loss instead of ``c`` (RACE's adversarial embedding); ``frozen``: the original
        denoiser (default: a frozen copy of the pipeline's denoiser as it is now)."""
        cfg = self.config
        den = family_of(pipe).denoiser(pipe)  # the UNet or transformer being trained
        frozen = frozen if frozen is not None else frozen_copy(den)  # theta*, the original model
        sampling = den if cfg.sample_with == "trained" else frozen
        templates = cfg.templates
        with torch.no_grad():  # row k * len(templates) + j: concept k in template j
            concepts = encode(pipe, filled(templates, request.concepts))
            anchors = encode(pipe, filled(templates, request.anchors))
            concepts, anchors = (e.to(den.device, den.dtype) for e in (concepts, anchors))
            empty = encode(pipe, [""]).to(den.device, den.dtype)
        timesteps = sampler(pipe, cfg.ddim_steps).timesteps
        params = trainable(pipe, self.parameter_set)
        n, size = cfg.batch_size, cfg.trajectory_pool
        pool: dict[str, torch.Tensor] = {}  # reuse_trajectories: the trajectories' rows, x_T and every x_t

        def fresh() -> tuple[Conditioning, Conditioning, torch.Tensor, torch.Tensor, int]:
            """The official draw: one concept row, one step, x_t sampled to it from fresh x_T."""
            k = draw_row(len(request.concepts), len(templates), generator)
            step = random_index(cfg.ddim_steps, generator)
            c = concepts[k].expand(n)
            a = anchors[k].expand(n)
            x_T = initial_latents(pipe, n, generator)
            x_t = sample_to(pipe, c, empty, step, cfg.ddim_steps, cfg.start_guidance, generator, x_T,
                            denoiser=sampling)
            return c, a, x_T, x_t, step

        def reused(i: int) -> tuple[Conditioning, Conditioning, torch.Tensor, torch.Tensor, torch.Tensor]:
            """``n`` distinct x_t of the pool, each at its own step (and so its own timestep); the pool
            is resampled every ``reuse_trajectories`` iterations by the sampling model, to the last step."""
            if not pool or i % cfg.reuse_trajectories == 0:
                rows = torch.tensor([draw_row(len(request.concepts), len(templates), generator) for _ in range(size)])
                x_T = initial_latents(pipe, size, generator)
                x = sample_trajectory(pipe, concepts[rows.to(concepts.device)], empty, cfg.ddim_steps - 1,
                                      cfg.ddim_steps, cfg.start_guidance, generator, x_T, denoiser=sampling)
                pool.update(rows=rows, x_T=x_T, x=x)  # x: ddim_steps x size x latent
            state = torch.randperm(cfg.ddim_steps * size, generator=generator)[:n].to(pool["x"].device)
            step, j = state // size, state % size
            rows = pool["rows"].to(j.device)[j]
            return concepts[rows], anchors[rows], pool["x_T"][j], pool["x"][step, j], step

        def loss(i: int) -> torch.Tensor:
            c, a, x_T, x_t, step = reused(i) if cfg.reuse_trajectories else fresh()
            t = timesteps[step.to(timesteps.device) if torch.is_tensor(step) else step]  # 0-d, or one per row
            with torch.no_grad():  # one batched call: the anchor's then the concept's output on the same x_t
                e_0, e_p = predict(pipe, torch.cat([x_t, x_t]), t.repeat(2) if t.ndim else t, Conditioning.cat([a, c]),
                                   denoiser=frozen).chunk(2)
            seen = c if perturb is None else perturb(c, x_t, t, x_T)
            e_n = predict(pipe, x_t, t, seen)
            return F.mse_loss(e_n.float(), esd_target(e_0, e_p, cfg.negative_guidance).float())

        return train_steps(loss, list(params.values()), iterations, lr=cfg.lr, name=self.name, progress=progress)


@register_method("esd-x")
class ESDx(ESD):
    """ESD on every cross-attention parameter (SD3 / Flux: joint attention; official ``train_method='esd-x'`` /
    ``'xattn'``)."""

    parameter_set = "xattn"


@register_method("esd-x-strict")
class ESDxStrict(ESD):
    """ESD on the text's keys / values only (official ``'esd-x-strict'``), with ``esd_sd.py``'s defaults.

    :class:`ESDxStrictConfig`: 200 iterations, lr 5e-5, x_t sampled by the frozen model."""

    Config = ESDxStrictConfig
    parameter_set = "xattn_kv"


@register_method("esd-u")
class ESDu(ESD):
    """ESD on every denoiser parameter but cross-attention (joint attention on SD3 / Flux), the time /
    pooled-text embedding and the output layer (``'noxattn'``)."""

    parameter_set = "noxattn"


@register_method("esd-all")
class ESDall(ESD):
    """ESD on every denoiser parameter (official ``'full'`` / ``'esd-all'``)."""

    parameter_set = "all"
