"""Concept Ablation (Kumari et al., ICCV 2023, arXiv 2303.13516).

The model is fine-tuned so that the erased *target* concept ``c*`` generates what an *anchor*
concept ``c`` generates ("Grumpy Cat" -> "cat", "Van Gogh" painting -> painting). Anchor images
``x`` are sampled once, before training, from the original model with anchor prompts; then, with
``x_t = sqrt(a_t) x + sqrt(1 - a_t) eps`` at a uniform timestep ``t``::

    model-based (default, the paper's recommendation):
        loss = || eps_theta(x_t, t, c*) - sg(eps_theta*(x_t, t, c)) ||^2
    noise-based:
        loss = || eps_theta(x_t, t, c*) - eps ||^2

plus, with ``regularization_weight`` w > 0, ``w || eps_theta(x_t', t', c) - eps' ||^2`` on another
batch of anchor images with their own prompts (the official ``--regularization`` /
``--with_prior_preservation``).

Prompts (``concept_type``): for objects, each anchor prompt is a template filled with the anchor
(``"a picture of a cat"``) and its target prompt the same template filled with the concept
(``"a picture of a grumpy cat"``), which is what the official code does to its anchor captions
(``replace(anchor, target)``). For styles, the target prompt adds the concept to the anchor prompt
in one of the official code's phrasings (``"a painting, in the style of van gogh"``). The anchor
defaults to "" (the unconditional prompt); the paper always names one: the category for instances,
"painting" for artists.

Defaults are those of the official code (github.com/nupurkmr9/concept-ablation) for style and
object ablation, the setting of the paper's results: loss ``model-based``; parameters
``cross-attn`` = ``attn2.to_k`` / ``attn2.to_v`` (``xattn_kv``; ``parameters="all"`` is the
official ``full-weight``, used for memorised images); 100 steps (README; the CompVis configs run
110 and checkpoint every 100) of batch 8 (4 per GPU x 2 GPUs) with AdamW (weight decay 0.01) at
2e-6 scaled by the batch, 1.6e-5 (``--scale_lr``); 1000 anchor images (``train_size`` /
``num_class_images``; the README's examples use 200) sampled with guidance 6 and DDIM eta 1 in 200
steps (CompVis code; the diffusers script uses 25 DPM-Solver steps); regularisation off (the
official scripts turn it on when target and anchor prompts share words, as for "grumpy cat" ->
"cat"; the CompVis code then weighs it 0.2, the diffusers script 1.0).

Differences from the official code, and why:

* the model-based target comes from a frozen copy of the original model (``target_model="frozen"``):
  the paper's objective matches the *original* anchor distribution, and the official code's stop-
  gradient prediction of the model being trained approximates it while saving a copy;
  ``target_model="current"`` reproduces the official code;
* anchor prompts are fixed templates (``templates``) instead of captions written by ChatGPT / Llama
  or retrieved from LAION: no language model in the loop, and the run is deterministic; the toy
  preset uses the toy world's training contexts ("a red {}", ...), its stand-in for captions;
* the start token: both official versions stop the gradient through the cross-attention keys and
  values of the first text token (its embedding is the same for every prompt and draws most of the
  attention), so only the prompt's own tokens are moved; efface does the same
  (``detach_start_token``, default on) on UNet cross-attention. On SD3 / Flux it has no effect: the
  text tokens' keys come from the joint attention's own projections (in Flux's single blocks, one
  projection over text and image tokens together), and Flux's sequence is T5's, which has no start
  token;
* anchor latents are kept as sampled: the official code decodes them to JPEG files and re-encodes
  them with the VAE, with random crops, rescaling ("a far away", "zoomed in") and flips. That
  augmentation, and its loss mask, are left out.

Model families (the official code is for SD 1.x; the loss is a plain denoising loss, written with
the family's training target: ``eps`` above is whatever :func:`~efface.models.diffusion.add_noise`
says the denoiser predicts):

* ``sd`` (SD 1.x / 2.x): as above; on v-prediction checkpoints (SD 2.x 768) the model-based target
  is the anchor's predicted v and the noise-based / regularisation target the true v;
* ``sdxl``: the same loss; the target and anchor prompts carry both encoders' states and the pooled
  embedding (:class:`~efface.models.families.Conditioning`). ``xattn_kv`` is the UNet's
  cross-attention ``to_k`` / ``to_v``, so the pooled path (``add_embedding``) is not trained:
  ``parameters="all"`` trains it too;
* ``sd3`` / ``flux``: flow matching, ``x_t = (1 - s) x + s noise`` at ``s = t / 1000`` with ``t``
  uniform (not SD3's logit-normal timestep density), the target the velocity ``noise - x`` (noise-
  based) or the frozen model's anchor velocity (model-based). ``xattn_kv`` is what the text tokens
  are projected to in the joint attention (:mod:`efface.models.families.flow`). Anchor images are
  sampled with the flow-matching Euler sampler, which is deterministic: ``anchor_eta`` has no
  effect there. On a guidance-distilled Flux (FLUX.1-dev) ``anchor_guidance`` is real CFG on top
  of the distilled guidance; ``anchor_guidance=1`` samples as ``FluxPipeline`` does by default.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from efface.errors import InputError
from efface.methods.base import ErasureMethod, ErasureRequest, TrainingConfig, register_method
from efface.methods.prompts import fill
from efface.models.diffusion import (add_noise, frozen_copy, num_train_timesteps, predict, random_index, sample_to,
                                     train_steps, trainable)
from efface.models.families import family_of
from efface.models.text import encode, token_count

log = logging.getLogger(__name__)

OBJECT_TEMPLATES = ("{}", "a {}", "a picture of a {}", "an image of a {}")
# the official style phrasings of a caption {p} and the target {c}
STYLE_TEMPLATES = ("{p}, in the style of {c}", "{c} inspired painting, {p}", "in {c}'s style, {p}")
ANCHOR_BATCH = 16  # anchor images sampled per UNet call


@dataclass
class CAConfig(TrainingConfig):
    variant: str = field(default="model", metadata={"help": "'model'-based (paper's choice) or 'noise'-based target"})
    iterations: int = field(default=100, metadata={"help": "optimisation steps"})
    lr: float = field(default=1.6e-5, metadata={"help": "AdamW learning rate (official 2e-6 x batch 8)"})
    batch_size: int = field(default=8, metadata={"help": "anchor images per step"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    num_anchor_images: int = field(default=1000, metadata={"help": "anchor images sampled before training"})
    anchor_steps: int = field(default=200, metadata={"help": "DDIM steps to sample an anchor image"})
    anchor_guidance: float = field(default=6.0, metadata={"help": "guidance scale of anchor sampling"})
    anchor_eta: float = field(default=1.0, metadata={"help": "DDIM eta of anchor sampling"})
    anchor_sampler: str = field(default="default", metadata={
        "help": "'default': the family's sampler (UNets: DDIM with anchor_eta, the CompVis code; flow: Euler); "
                "'dpm++': DPM-Solver++, deterministic (the diffusers script; UNets)"})
    concept_type: str = field(default="object", metadata={"help": "'object' (template with the concept "
                                                                   "instead of the anchor) or 'style'"})
    regularization_weight: float = field(default=0.0, metadata={"help": "weight of the anchor-prompt "
                                                                         "noise loss (0: off)"})
    parameters: str = field(default="xattn_kv", metadata={"help": "'xattn_kv' (official cross-attn) or "
                                                                   "'all' (official full-weight)"})
    templates: tuple[str, ...] = field(default=OBJECT_TEMPLATES, metadata={"help": "prompt templates, '{}' is "
                                                                               "the concept or anchor"})
    target_model: str = field(default="frozen", metadata={"help": "model-based target from the 'frozen' "
                                                                   "original or the 'current' model"})
    detach_start_token: bool = field(default=True, metadata={
        "help": "no gradient through the cross-attention keys / values of the start token (official)"})

    def __post_init__(self) -> None:
        self.check_choices(variant=("model", "noise"), concept_type=("object", "style"),
                           parameters=("xattn_kv", "all"), target_model=("frozen", "current"),
                           anchor_sampler=("default", "dpm++"))
        self.check_templates("templates")
        self.check_bounds(at_least_one=("iterations", "batch_size", "num_anchor_images", "anchor_steps"),
                          non_negative=("weight_decay", "regularization_weight"), positive=("lr",))


def prompt_pairs(concept: str, anchor: str, concept_type: str, tokenizer=None,
                 templates: tuple[str, ...] = OBJECT_TEMPLATES) -> list[tuple[str, str]]:
    """(target prompt, anchor prompt) pairs for one concept; pairs the tokenizer (or any of a list
    of tokenizers: every one of the pipeline's) would truncate are dropped. Objects: each template
    filled with the concept and with the anchor ("a picture of a" for the anchor ""); styles: the
    concept added to each anchor prompt (just "" for the anchor "")."""
    if concept_type == "object":
        pairs = [(fill(t, concept), fill(t, anchor)) for t in templates]
    else:
        anchors = [fill(t, anchor) for t in templates] if anchor else [""]
        pairs = [(s.format(p=a, c=concept).strip(" ,"), a) for a in anchors for s in STYLE_TEMPLATES]
    for tok in () if tokenizer is None else tokenizer if isinstance(tokenizer, (list, tuple)) else (tokenizer,):
        limit = tok.model_max_length
        pairs = [(t, a) for t, a in pairs if max(token_count(tok, t), token_count(tok, a)) <= limit]
    if not pairs:
        raise InputError(f"every prompt built from {concept!r} / {anchor!r} is too long for the tokenizer; "
                         "shorten them")
    return list(dict.fromkeys(pairs))


def noised(pipe, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, target, t)``: :func:`~efface.models.diffusion.add_noise` at uniform timesteps ``t``
    (one per row), with CA's order of draws: the noise first, then the timesteps (as efface's CA
    has always drawn them, so that seeded runs reproduce)."""
    noise = torch.randn(x0.shape, generator=generator)
    t = random_index(num_train_timesteps(pipe), generator, len(x0)).to(x0.device)
    x_t, target = add_noise(pipe, x0, t, None, noise)
    return x_t, target, t


@register_method("ca")
class ConceptAblation(ErasureMethod[CAConfig]):
    """Concept Ablation: map a target concept onto an anchor concept (arXiv 2303.13516)."""

    Config = CAConfig
    paper = "Ablating Concepts in Text-to-Image Diffusion Models (Kumari et al., ICCV 2023), arXiv 2303.13516"
    named_anchor = True  # the paper always maps the target onto its category ("grumpy cat" -> "cat")
    families = frozenset({"sd", "sdxl", "sd3", "flux"})  # a denoising loss on add_noise's target (module doc)

    @property
    def parameter_set(self) -> str:
        return self.config.parameters

    @torch.no_grad()
    def anchor_latents(self, pipe, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Anchor images x (latents), one per prompt, sampled from the current (original) model."""
        cfg, den = self.config, family_of(pipe).denoiser(pipe)
        empty = encode(pipe, [""]).to(den.device, den.dtype)
        out = []
        for start in range(0, len(prompts), ANCHOR_BATCH):
            emb = encode(pipe, prompts[start : start + ANCHOR_BATCH]).to(den.device, den.dtype)
            out.append(sample_to(pipe, emb, empty, cfg.anchor_steps, cfg.anchor_steps, cfg.anchor_guidance,
                                 generator, eta=cfg.anchor_eta, solver=cfg.anchor_sampler))
        return torch.cat(out)

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> None:
        cfg = self.config
        if request.preserve:
            log.info("ca: preserved concepts are not used (regularisation uses the anchor prompts)")
        family = family_of(pipe)
        tokenizers = [getattr(pipe, n) for n in family.tokenizers if getattr(pipe, n, None) is not None]
        pairs = [p for c, a in zip(request.concepts, request.anchors)
                 for p in prompt_pairs(c, a, cfg.concept_type, tokenizers, cfg.templates)]
        den = family.denoiser(pipe)
        frozen = frozen_copy(den) if cfg.variant == "model" and cfg.target_model == "frozen" else None
        which = torch.arange(cfg.num_anchor_images) % len(pairs)  # the pair of each anchor image
        x0 = self.anchor_latents(pipe, [pairs[i][1] for i in which.tolist()], generator)
        with torch.no_grad():
            targets = encode(pipe, [t for t, _ in pairs]).to(den.device, den.dtype)
            anchors = encode(pipe, [a for _, a in pairs]).to(den.device, den.dtype)
        params = trainable(pipe, self.parameter_set)
        n = cfg.batch_size

        def loss(_: int) -> torch.Tensor:
            idx = random_index(len(x0), generator, n)
            k = which[idx]
            x_t, noise_target, t = noised(pipe, x0[idx], generator)
            pred = predict(pipe, x_t, t, targets[k])
            if cfg.variant == "model":
                with torch.no_grad():  # frozen None: the current model's own, detached (official)
                    target = predict(pipe, x_t, t, anchors[k], denoiser=frozen)
            else:
                target = noise_target
            value = F.mse_loss(pred.float(), target.float())
            if cfg.regularization_weight > 0:
                idx = random_index(len(x0), generator, n)
                x_t, noise_target, t = noised(pipe, x0[idx], generator)
                prior = predict(pipe, x_t, t, anchors[which[idx]])
                value = value + cfg.regularization_weight * F.mse_loss(prior.float(), noise_target.float())
            return value

        with start_token_detached(pipe) if cfg.detach_start_token else nullcontext():
            train_steps(loss, list(params.values()), cfg.iterations, lr=cfg.lr, name=self.name, progress=progress,
                        optimizer="adamw", weight_decay=cfg.weight_decay)


@contextmanager
def start_token_detached(pipe) -> Iterator[None]:
    """Within the block, the keys and values every cross-attention module computes for the first
    text position (the start token) carry no gradient: forward hooks on its ``to_k`` / ``to_v``
    (UNet cross-attention, ``is_cross_attention``), removed on exit. Values are unchanged. Joint
    attention (SD3, Flux) is left as it is: see the module docstring."""
    def hook(module, args, output):
        return torch.cat([output[:, :1].detach(), output[:, 1:]], 1)

    handles = [getattr(m, name).register_forward_hook(hook)
               for m in family_of(pipe).cross_attention(pipe).values() if getattr(m, "is_cross_attention", False)
               for name in ("to_k", "to_v")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
