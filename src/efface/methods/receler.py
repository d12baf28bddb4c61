"""Receler: Reliable Concept Erasing via Lightweight Erasers (Huang et al., ECCV 2024, arXiv 2311.17717).

The base model is not changed: a lightweight *eraser* is added after every cross-attention layer
(``attn2``) of the UNet. With ``o`` the layer's output (after ``to_out``), the block sees
``o + E(o)``, ``E(o) = W_up GELU(W_down o + b_down) + b_up`` (rank ``rank``; ``W_up``, ``b_up``
zero at init, so the model starts as the base). Only the erasers are trained, on three parts:

* erasing (ESD's target, :func:`efface.methods.esd.esd_target`, from the original model = the UNet
  with the erasers off)::

      L_erase = || eps'(x_t, t, c_adv) - (e_0 - eta (e_p - e_0)) ||^2

* concept-localised regularisation: the original model's cross-attention probabilities of the
  concept's tokens (mean over heads and tokens, the layers at ``mask_resolution`` averaged, min-max
  normalised per image, ``>= mask_threshold`` -> 1, nearest-resized to every layer) give a mask
  ``M``; the eraser outputs outside it are penalised, per layer the mean over channels of
  ``((1 - M) E(o))^2`` summed over positions / the number outside, averaged over layers::

      L = L_erase + concept_reg_weight * L_reg

* adversarial prompt learning: ``adversarial_tokens`` soft tokens ``P`` (one set per concept,
  persistent across iterations, init U[0, 1), Adam lr ``adversarial_lr``, weight decay
  ``adversarial_weight_decay``) replace the text-encoder output states right after the concept's
  tokens: ``c_adv = [c_{<=end}; P; c_{>end+K}]``. Each iteration makes ``adversarial_steps`` attack
  steps, ``min_P || eps'(x_t, t, c_adv) - e_p ||^2`` (the erased model regenerating the concept);
  the last step's ``eps'(x_t, t, c_adv)`` (``P`` before its last update, as the official code)
  enters ``L_erase`` and ``L_reg``.

x_t is sampled with ``start_guidance`` by the model being trained (erasers on) for a DDIM step
drawn uniformly in ``[0, ddim_steps)``; e_0, e_p and the attention maps come from one pass of the
original model. Several concepts: one drawn per iteration, each with its own ``P``.

Defaults are the official code's (github.com/jasper0314-huang/Receler, ``train_receler.py``
argparse defaults, ``receler/erasers/utils.py`` ``AdapterEraser``, ``receler/concept_reg.py``):
500 iterations, batch 1, Adam lr 3e-4, eraser rank 128, ``negative_guidance`` 1,
``start_guidance`` 3, 50 DDIM steps; ``concept_reg_weight`` 0.1, ``mask_threshold`` 0.1, masks from
the 16x16 maps (SD 1.x at 512 px; "following MasaCtrl"); 50 adversarial steps per iteration, 16
soft tokens, attack Adam lr 0.1 with weight decay 0.1, adversarial training from iteration 0.

Differences from the official code, and why:

* **the adversarial prompt reaches the UNet and the erasure loss.** The official loop writes
  ``emb_n[:, advrs_indices, :].data = advrs_prompt_embs[word_idx].data``: indexing with the index
  tensor ``advrs_indices`` is advanced indexing, which returns a *copy*; the ``.data`` of that
  copy is replaced and the copy dropped, so ``emb_n`` stays the clean concept embedding. The attack
  gradient is then taken at the clean embedding's padding positions and the soft tokens are updated
  with it, but they never enter a forward pass: ``loss_adv`` and ``loss_erase`` are computed on the
  clean prompt and the released code trains plain ESD + regulariser (with 50 idle UNet passes per
  iteration). Here ``c_adv`` is built out of place (``torch.cat``) so both losses see ``P``, as the
  paper's method states (:func:`adversarial_embedding`, tested);
* ``adversarial_steps=0`` (or iterations before ``adversarial_start``) trains on the clean prompt;
  the official loop trains nothing with 0 (the erasure step sits inside the attack loop), and its
  ``--start_advrs_train`` flag is parsed but unused;
* the UNet is queried at x_t's own DDIM timestep (as :mod:`efface.methods.esd`); the official code
  draws a DDPM timestep in the 20-step bin above it. Every random draw is seeded;
* the mask resolution is an option (``mask_resolution``, default 16 as the official code's hard-coded
  16x16; a UNet whose cross-attention has no such resolution is refused up front); the official
  code computes the attention maps inside its patched LDM attention, here the wrapper recomputes
  them from ``attn.to_q`` / ``attn.to_k`` (the same softmax) only on the original-model pass;
* an anchor other than "" replaces the empty prompt of e_0 (as ESD here); ``templates`` can put the
  concept into prompt contexts (official: the bare concept; the toy preset uses toy-sd's captions).
  Preserved concepts are not used: Receler has no preservation term.

Model families: ``sd`` (the official code's SD 1.x) and ``sdxl``, both through the family seam (the
erasers follow every cross-attention module the family names; checked on the tiny SDXL pipeline of
the tests, not on a real SDXL). On SDXL the soft tokens replace positions of the token sequence
(both encoders' states) while the pooled embedding, which reaches the UNet through
``add_embedding`` around the erasers, stays the clean prompt's; and its cross-attention maps at 1024
px are 64 and 32 wide, so the default ``mask_resolution`` 16 is refused: 32 is SD's 16 relative to
the latent. Flux (the joint-attention form, not in the paper; :mod:`efface.methods.receler_maps`): an
eraser after the image stream's attention output of every double-stream block, the mask from the
image-to-text part of that joint attention (at the packed token grid, half the latent's side: 4
on toy-flux, 32 on FLUX.1 at 1024 px), the soft tokens replacing T5 states after the concept's
last T5 token (its CLIP part, the pooled embedding, stays the clean prompt's, as on SDXL). SD3 is
refused (``ReceLer.family_notes``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from efface.errors import InputError
from efface.methods.base import ErasureMethod, ErasureRequest, TrainingConfig, register_method
from efface.methods.esd import esd_target
from efface.methods.prompts import draw_row, fill, filled
from efface.models.adapters import Adapter, Installed, register_adapter, wrap_attention_processors
from efface.models.diffusion import initial_latents, predict, random_index, sample_to, sampler, train_steps
from efface.models.families import Conditioning, family_of
from efface.methods.receler_maps import (attention_sides, concept_attention, concept_masks, eraser_sites, is_joint,
                                         joint_concept_attention, localisation_loss)
from efface.models.params import named_parameters
from efface.models.precision import master_dtype
from efface.models.text import encode

log = logging.getLogger(__name__)


@dataclass
class ReceLerConfig(TrainingConfig):
    iterations: int = field(default=500, metadata={"help": "eraser optimisation steps, one concept each"})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate of the erasers"})
    rank: int = field(default=128, metadata={"help": "eraser bottleneck width (down / up projection rank)"})
    negative_guidance: float = field(default=1.0, metadata={"help": "negative guidance eta of the ESD target"})
    start_guidance: float = field(default=3.0, metadata={"help": "guidance scale used to sample x_t"})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps of the partial sampling of x_t"})
    batch_size: int = field(default=1, metadata={"help": "x_t samples per iteration (official: 1)"})
    concept_reg_weight: float = field(default=0.1, metadata={"help": "weight of the concept-localised "
                                                                     "regulariser (0: off)"})
    mask_threshold: float = field(default=0.1, metadata={"help": "threshold of the normalised concept "
                                                                 "attention map giving the mask"})
    mask_resolution: int = field(default=16, metadata={"help": "side of the cross-attention maps averaged "
                                                               "into the mask (official: 16)"})
    adversarial_steps: int = field(default=50, metadata={"help": "attack steps on the soft tokens per "
                                                                 "iteration (0: no adversarial prompts)"})
    adversarial_tokens: int = field(default=16, metadata={"help": "soft tokens inserted after the concept"})
    adversarial_lr: float = field(default=0.1, metadata={"help": "Adam learning rate of the soft tokens"})
    adversarial_weight_decay: float = field(default=0.1, metadata={"help": "Adam weight decay of the soft tokens"})
    adversarial_start: int = field(default=0, metadata={"help": "iteration from which the soft tokens are used"})
    templates: tuple[str, ...] = field(default=("{}",), metadata={"help": "prompt templates, '{}' is the concept "
                                                                          "(or anchor); one drawn per iteration "
                                                                          "(official: the bare concept)"})

    def __post_init__(self) -> None:
        self.check_bounds(at_least_one=("iterations", "ddim_steps", "batch_size", "rank", "adversarial_tokens",
                                        "mask_resolution"),
                          non_negative=("adversarial_steps", "adversarial_start", "concept_reg_weight",
                                        "adversarial_weight_decay"), positive=("lr", "adversarial_lr"))
        if not 0 <= self.mask_threshold <= 1:
            raise InputError(f"mask_threshold must be in [0, 1] (the map is normalised), not {self.mask_threshold}")
        self.check_templates("templates")


class Eraser(torch.nn.Module):
    """``E(o) = W_up GELU(W_down o + b_down) + b_up``; the up projection is zero until trained."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = torch.nn.Linear(dim, rank)
        self.up = torch.nn.Linear(rank, dim)
        for p in self.parameters():  # no global random draw; see init_
            torch.nn.init.zeros_(p)

    @torch.no_grad()
    def init_(self, generator: torch.Generator) -> None:
        """torch's ``nn.Linear`` default for the down projection, U(+-1/sqrt(dim)), drawn from
        ``generator``; zeros for the up projection (the official ``zero_module``)."""
        bound = 1 / math.sqrt(self.down.in_features)
        for p in self.down.parameters():
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
        for p in self.up.parameters():
            p.zero_()

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(o)))


def _slot(key: str) -> str:
    return key.replace(".", "-")  # module names may not contain "."


@register_adapter("receler-erasers")
class ReceLerErasers(Adapter):
    """One :class:`Eraser` per cross-attention processor key (``"...attn2.processor"``); installed,
    each ``attn2`` returns ``o + E(o)`` (installed with a strength s: ``o + s E(o)``). For training
    it can be switched off (``active``), record its outputs (``outputs``) and the concept's
    attention maps (``tokens`` -> ``maps``)."""

    supports_strength = True

    def __init__(self, dims: dict[str, int], rank: int):
        super().__init__()
        self.dims, self.rank = dict(dims), int(rank)
        self.erasers = torch.nn.ModuleDict({_slot(k): Eraser(d, rank) for k, d in self.dims.items()})
        self.active = True
        self.outputs: dict[str, torch.Tensor] | None = None  # key -> E(o), when recording
        self.tokens: torch.Tensor | None = None  # concept token positions, when recording maps
        self.maps: dict[str, torch.Tensor] = {}  # key -> (B, N) concept attention probabilities

    @classmethod
    def for_pipe(cls, pipe, rank: int) -> ReceLerErasers:
        """Erasers of width ``rank`` after every cross-attention module of ``pipe``'s UNet (SD: ``attn2``),
        or Flux's double-stream joint attentions (image stream; :mod:`efface.methods.receler_maps`)."""
        sites = eraser_sites(pipe)
        if not sites:
            raise InputError("this denoiser has no cross-attention (attn2) or double-stream joint attention to put "
                             "erasers after")
        return cls(sites, rank)

    def spec(self) -> dict[str, Any]:
        return {"dims": self.dims, "rank": self.rank}

    def _attach(self, pipe, handle: Installed) -> None:
        unet = family_of(pipe).denoiser(pipe)
        modules = {k: _attention(unet, k) for k in self.dims}

        strength = handle.strength  # ErasedModel.apply(pipe, scale=s): o + s E(o)

        def after(key, out, hidden, context, kwargs):
            joint = is_joint(modules[key])  # Flux: out = (image stream, text stream); the eraser follows the image's
            if self.tokens is not None:
                self.maps[key] = (joint_concept_attention(modules[key], hidden, context, self.tokens,
                                                          kwargs.get("image_rotary_emb")) if joint
                                  else concept_attention(modules[key], hidden, context, self.tokens))
            if not self.active:
                return out
            o = out[0] if joint else out
            e = self.erasers[_slot(key)](o)
            if self.outputs is not None:
                self.outputs[key] = e
            o = o + (e if strength == 1.0 else strength * e)
            return (o, *out[1:]) if joint else o

        wrapped = wrap_attention_processors(unet, handle, lambda k: k in self.dims, after)
        if len(wrapped) != len(self.dims):
            raise InputError("these erasers were made for another UNet: its cross-attention layers differ")
        handle.on_remove(self._reset)

    def _reset(self) -> None:
        self.active, self.outputs, self.tokens, self.maps = True, None, None, {}


def _attention(unet, key: str):
    try:
        return unet.get_submodule(key.removesuffix(".processor"))
    except AttributeError as err:
        raise InputError(f"these erasers were made for another UNet: it has no {key}") from err


def adversarial_embedding(c: torch.Tensor, start: int, prompt: torch.Tensor) -> torch.Tensor:
    """``c`` (B, T, D) with positions ``[start, start + K)`` replaced by the soft tokens ``prompt``
    (1, K, D), built out of place so that gradients reach ``prompt`` (the official code's in-place
    ``emb[:, idx, :].data = ...`` writes into a copy and leaves ``c`` unchanged)."""
    k = prompt.shape[1]
    return torch.cat([c[:, :start], prompt.to(c.dtype).expand(c.shape[0], -1, -1), c[:, start + k:]], 1)


@register_method("receler")
class ReceLer(ErasureMethod[ReceLerConfig]):
    """Erasers after every cross-attention layer, trained with ESD's target, a concept-localised
    regulariser and adversarial soft prompts (arXiv 2311.17717)."""

    Config = ReceLerConfig
    paper = ("Receler: Reliable Concept Erasing of Text-to-Image Diffusion Models via Lightweight Erasers "
             "(Huang et al., ECCV 2024), arXiv 2311.17717")
    parameter_set: ClassVar[str | None] = None  # adapter-only: changes no base tensor, the result is an adapter
    lora_export = None
    lora_note = ("its erasers are GELU MLPs added after each cross-attention (o + E(o)), not a change of a "
                 "layer's weights: apply the artifact with efface")
    families: ClassVar[frozenset[str]] = frozenset({"sd", "sdxl", "flux"})
    family_notes: ClassVar[dict[str, str]] = {
        "sd3": "the erasers follow cross-attention (UNets) or Flux's double-stream joint attention, whose image "
               "stream has its own output; SD3's token sequence joins CLIP's and T5's tokens, so the soft tokens "
               "and the concept's positions have no one tokenizer: not ported",
        "flux": "joint-attention form: an eraser after each double-stream block's image-stream attention output, "
                "the mask from its image-to-text attention; the soft tokens replace T5 states (receler_maps)",
    }

    def check(self, pipe, request: ErasureRequest) -> None:
        super().check(pipe, request)
        cfg = self.config
        family = family_of(pipe)
        tok = family.sequence_tokenizer(pipe)
        sides = attention_sides(pipe)
        if cfg.concept_reg_weight > 0 and cfg.mask_resolution not in sides:
            raise InputError(f"mask_resolution={cfg.mask_resolution}: this model's attention maps are "
                             f"{sorted(sides)} wide at its sample size; choose one of them")
        if cfg.adversarial_steps:
            room = tok.model_max_length
            for c in request.concepts:
                for t in cfg.templates:
                    end = family.word_positions(pipe, t, c)[0] + 1 + cfg.adversarial_tokens
                    if end > room:
                        raise InputError(f"adversarial_tokens={cfg.adversarial_tokens} do not fit after "
                                         f"{fill(t, c)!r} in {room} text positions: lower adversarial_tokens")

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> ReceLerErasers:
        cfg = self.config
        if request.preserve:
            log.info("receler: preserved concepts are not used (Receler has no preservation term)")
        family = family_of(pipe)
        unet, tok = family.denoiser(pipe), family.sequence_tokenizer(pipe)  # the tokens of the sequence (Flux: T5)
        for _, _, p in named_parameters(pipe):
            p.requires_grad_(False)
        erasers = ReceLerErasers.for_pipe(pipe, cfg.rank)
        for e in erasers.erasers.values():
            e.init_(generator)
        templates = cfg.templates

        def text(prompts: list[str]) -> Conditioning:
            return encode(pipe, prompts).to(unet.device, unet.dtype)

        with torch.no_grad():  # row k * len(templates) + j: concept k in template j
            concepts = text(filled(templates, request.concepts))
            anchors = text(filled(templates, request.anchors))
            empty = text([""])
        ends = [family.word_positions(pipe, t, c)[0] for c in request.concepts for t in templates]
        lengths = [len(tok(c, add_special_tokens=False).input_ids) for c in request.concepts for _ in templates]
        timesteps = sampler(pipe, cfg.ddim_steps).timesteps
        dim = concepts.shape[-1]
        prompts = [torch.nn.Parameter(torch.rand((1, cfg.adversarial_tokens, dim), generator=generator)
                                      .to(unet.device, master_dtype(unet.dtype))) for _ in request.concepts]  # P, per concept
        attack = torch.optim.Adam(prompts, lr=cfg.adversarial_lr, weight_decay=cfg.adversarial_weight_decay)
        n = cfg.batch_size

        def loss(i: int) -> torch.Tensor:
            k = draw_row(len(request.concepts), len(templates), generator)
            concept = k // len(templates)
            step = random_index(cfg.ddim_steps, generator)
            c, a = concepts[k : k + 1].expand(n), anchors[k : k + 1].expand(n)
            x_T = initial_latents(pipe, n, generator)
            x_t = sample_to(pipe, c, empty, step, cfg.ddim_steps, cfg.start_guidance, generator, x_T)
            t = timesteps[step]
            erasers.active, erasers.tokens = False, torch.arange(ends[k] - lengths[k] + 1, ends[k] + 1)
            try:  # the original model: e_0, e_p and the concept's attention maps
                with torch.no_grad():
                    e_0, e_p = predict(pipe, torch.cat([x_t, x_t]), t, Conditioning.cat([a, c])).chunk(2)
                maps = {key: m[n:] for key, m in erasers.maps.items()}
            finally:
                erasers.active, erasers.tokens, erasers.maps = True, None, {}
            masks = concept_masks(maps, tuple(x_t.shape[-2:]), cfg.mask_resolution, cfg.mask_threshold) \
                if cfg.concept_reg_weight > 0 else {}
            adversarial = cfg.adversarial_steps if i >= cfg.adversarial_start else 0
            erasers.outputs = {}
            try:
                if adversarial:
                    e_n = attack_steps(pipe, prompts[concept], attack, x_t, t, c, ends[k] + 1, e_p, adversarial)
                else:
                    e_n = predict(pipe, x_t, t, c)
                outputs = erasers.outputs
            finally:
                erasers.outputs = None
            total = F.mse_loss(e_n.float(), esd_target(e_0, e_p, cfg.negative_guidance).float())
            if cfg.concept_reg_weight > 0:
                total = total + cfg.concept_reg_weight * localisation_loss(outputs, masks)
            return total

        with erasers.installed(pipe):
            erasers.requires_grad_(True)
            train_steps(loss, list(erasers.parameters()), cfg.iterations, lr=cfg.lr, name=self.name,
                        progress=progress, state={"adversarial_prompts": prompts, "attack_optimizer": attack})
        return erasers


def attack_steps(pipe, prompt: torch.nn.Parameter, attack: torch.optim.Optimizer, x_t: torch.Tensor, t,
                 c: Conditioning, start: int, e_p: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` updates of the soft tokens ``prompt`` minimising ``|| eps'(x_t, t, c_adv) - e_p ||^2``
    (the erased model regenerating the concept); returns the last ``eps'(x_t, t, c_adv)`` with its
    graph (computed with ``prompt`` before the last update, as the official loop), for the erasure
    loss. The erasers get no gradient from the attack. The soft tokens replace positions of the token
    sequence ``c.embeds`` (a pooled embedding, where the family has one, stays the clean prompt's)."""
    for j in range(steps):
        leaf = prompt.detach().requires_grad_(True)
        e_n = predict(pipe, x_t, t, c.with_embeds(adversarial_embedding(c.embeds, start, leaf)))
        (grad,) = torch.autograd.grad(F.mse_loss(e_n.float(), e_p.float()), leaf, retain_graph=j == steps - 1)
        prompt.grad = grad
        attack.step()
        attack.zero_grad(set_to_none=True)
    return e_n
