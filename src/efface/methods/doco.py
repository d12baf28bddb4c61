"""DoCo: Concept Domain Correction (Wu et al., AAAI 2025, arXiv 2405.15304).

Concept Ablation (:mod:`efface.methods.ca`) with its regression replaced by adversarial training,
and a gradient surgery that keeps the update from undoing what is preserved. Anchor images ``x``
are sampled once from the original model with anchor prompts (as in CA); with
``x_t = sqrt(a_t) x + sqrt(1 - a_t) eps`` at a uniform DDPM timestep ``t``, both models' noise
predictions are turned into predicted clean latents ``x0 = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)``:

    fake = x0(eps_theta(x_t, t, c*))     the trained model on the target prompt
    real = x0(eps_theta*(x_t, t, c))     the original model on the anchor prompt

A PatchGAN discriminator ``D`` on those latents (logit per patch, BCE; label 0 = anchor domain,
1 = target domain) and the trained parameters play::

    L_D   = BCE(D(real), 0) + BCE(D(sg(fake)), 1)          (discriminator, Adam betas (0.5, 0.999))
    L_adv = BCE(D(fake), 0)                                 (the UNet: target outputs look anchor)
    L_pre = || eps_theta(x_t', t', c_p) - eps' ||^2         (preservation: images of the anchor and
                                                             of the preserved concepts, own prompts)

For the first ``warmup`` iterations only ``D`` learns. Then each iteration takes one UNet step and
one ``D`` step. Concept-preserving gradient surgery (``gradient_surgery``), per parameter tensor,
with ``g_u = grad L_adv`` and ``g_p = grad L_pre`` (each first clipped to ``max_grad_norm``)::

    g_u <- g_u - lambda (g_u . g_p / |g_p|^2) g_p     if g_u . g_p < 0   (else unchanged)

so that, for ``lambda = 1``, the erasure step no longer increases the preservation loss to first
order (``g_u . g_p = 0``). The UNet is updated with ``g_u + preserve_weight * g_p``.

Defaults are the official code's (github.com/yongliang-wu/DoCo, ``train.py`` and the README's
commands): cross-attention ``attn2.to_k`` / ``to_v`` (``parameter_group cross-attn``; ``"all"``
is ``full-weight``); 2000 iterations of batch 8 (``max_train_steps``, ``train_batch_size``), of
which the first 1000 train only the discriminator (``warm_up``); AdamW (weight decay 0.01) at
6e-6 x 8 = 4.8e-5 (``--scale_lr``), constant; discriminator lr 1e-4 (objects; 5e-4 for styles);
gradient surgery on with lambda 1 (``--gradient_clip --lambda_ 1``); gradient-norm clip 1.0;
prior preservation on (``--with_prior_preservation``); 1000 anchor images (``num_class_images``)
sampled with DPM-Solver++ (``DPMSolverMultistepScheduler``'s defaults: second order, deterministic)
in 25 steps at guidance 6. The official call passes ``eta=1.0``, which that scheduler's ``step``
does not take and the pipeline drops, so the official anchors are deterministic too
(``anchor_sampler="default"`` with ``anchor_eta`` samples stochastic DDIM instead). The
discriminator is PatchGAN on the 4-channel latents: 4x4 stride-2 convolutions of 64, 128, 256, 512
channels (BatchNorm after all but the first, LeakyReLU 0.2), then a 4x4 convolution to one logit per
patch. It is a training-time module only: it is not part of the erased model.

Differences from the official code, and why:

* the surgery is the projection written above; the official ``adjust_gradient`` subtracts
  ``lambda cos(g_u, g_p) g_p / |g_p|``, which is that projection only when ``|g_u| = 1`` (after its
  clip, ``|g_u| <= 1``, it removes more than the conflicting part);
* preserved concepts of the request (``request.preserve``) join the anchor in the preservation
  loss (images of each sampled like the anchor's, ``num_anchor_images`` of them); the official code
  preserves only the anchor concept. Without ``preserve`` it is the official loss;
* the discriminator has as many stride-2 blocks as the latent size allows (at most the official 4:
  toy-sd's 8x8 latents take 2, SD's 64x64 take 4), since four blocks cannot read an 8x8 latent;
* anchor images are kept as latents: no JPEG round trip, crops, flips or loss mask (as our CA);
* prompts come from templates, as in our CA (no ChatGPT / LAION captions);
* x0 is computed from the noise schedule directly (the family seam's ``predicted_x0``; the
  official code patches diffusers' DDPM scheduler for a batched ``step``, whose
  ``pred_original_sample`` is the same formula).

Model families: ``sd`` (the official code's SD 1.x; on v-prediction checkpoints, SD 2.x 768, x0 is
``sqrt(a_t) x_t - sqrt(1 - a_t) v`` and the preservation target the true v, as in CA) and ``sdxl``
(the same losses through the family seam: prompts carry both encoders' states and the pooled
embedding; ``xattn_kv`` is the UNet's cross-attention ``to_k`` / ``to_v``, so the pooled path,
``add_embedding``, is not trained: ``parameters="all"`` trains it too; checked on the tiny SDXL
pipeline of the tests, not on a real SDXL). On ``flux`` (efface's adaptation; the paper and code
are SD 1.x) the same losses run through the seam with the flow-matching x0 (``x_t - sigma v``, the
seam's ``predicted_x0``) and ``xattn_kv`` is what the text is projected to (the double blocks'
``add_k_proj`` / ``add_v_proj``, the single blocks' shared ``to_k`` / ``to_v``); measured on
toy-flux (docs/erasure.md). ``sd3`` is not declared yet: on the tiny SD3 pipeline the preserved
concept moves as much as the target (``DoCo.family_notes``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from efface.errors import InputError, TrainingDiverged
from efface.methods.base import ErasureRequest, TrainingConfig, register_method
from efface.methods.ca import OBJECT_TEMPLATES, ConceptAblation, noised, prompt_pairs
from efface.methods.prompts import fill
from efface.models.checkpoint import resumable
from efface.models.diffusion import frozen_copy, predict, random_index, train_steps, trainable
from efface.models.families import Conditioning, family_of
from efface.models.text import encode, token_count

log = logging.getLogger(__name__)


@dataclass
class DoCoConfig(TrainingConfig):
    iterations: int = field(default=2000, metadata={"help": "training steps, warm-up included"})
    warmup: int = field(default=1000, metadata={"help": "first steps that train only the discriminator"})
    lr: float = field(default=4.8e-5, metadata={"help": "UNet AdamW learning rate (official 6e-6 x batch 8)"})
    weight_decay: float = field(default=0.01, metadata={"help": "UNet AdamW weight decay"})
    discriminator_lr: float = field(default=1e-4, metadata={"help": "discriminator Adam learning rate "
                                                                     "(official: 1e-4 objects, 5e-4 styles)"})
    batch_size: int = field(default=8, metadata={"help": "anchor images per step (and as many for preservation)"})
    gradient_surgery: bool = field(default=True, metadata={"help": "project the erasure gradient off the "
                                                                    "preservation gradient where they conflict"})
    surgery_scale: float = field(default=1.0, metadata={"help": "lambda: fraction of the conflicting part removed"})
    preserve_weight: float = field(default=0.0, metadata={"help": "weight of the preservation gradient added to "
                                                                   "the update (official: 0 with surgery, 0.1 "
                                                                   "without)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip of each gradient's norm (0: off)"})
    num_anchor_images: int = field(default=1000, metadata={"help": "anchor images (and images per preserved "
                                                                    "set) sampled before training"})
    anchor_steps: int = field(default=25, metadata={"help": "sampling steps of an anchor image"})
    anchor_guidance: float = field(default=6.0, metadata={"help": "guidance scale of anchor sampling"})
    anchor_eta: float = field(default=1.0, metadata={"help": "DDIM eta of anchor sampling ('ddim' only)"})
    anchor_sampler: str = field(default="dpm++", metadata={"help": "'dpm++' (DPM-Solver++, deterministic: "
                                                                    "official) or 'default' (DDIM with anchor_eta)"})
    concept_type: str = field(default="object", metadata={"help": "'object' or 'style' prompts (as CA)"})
    parameters: str = field(default="xattn_kv", metadata={"help": "'xattn_kv' (official cross-attn) or "
                                                                   "'all' (official full-weight)"})
    templates: tuple[str, ...] = field(default=OBJECT_TEMPLATES, metadata={"help": "prompt templates, '{}' is "
                                                                               "the concept or anchor"})

    def __post_init__(self) -> None:
        self.check_choices(concept_type=("object", "style"), parameters=("xattn_kv", "all"),
                           anchor_sampler=("dpm++", "default"))
        self.check_templates("templates")
        self.check_bounds(at_least_one=("iterations", "batch_size", "num_anchor_images", "anchor_steps"),
                          non_negative=("weight_decay", "surgery_scale", "preserve_weight", "max_grad_norm"),
                          positive=("lr", "discriminator_lr"))
        if not 0 <= self.warmup < self.iterations:
            raise InputError(f"warmup must be in [0, iterations), not {self.warmup} (iterations {self.iterations})")


class PatchDiscriminator(nn.Module):
    """PatchGAN on latents: ``blocks`` 4x4 stride-2 convolutions (64, 128, 256, 512 channels;
    BatchNorm after all but the first; LeakyReLU 0.2), then a 4x4 convolution to one logit per patch."""

    def __init__(self, in_channels: int = 4, blocks: int = 4):
        super().__init__()
        if not 1 <= blocks <= 4:
            raise InputError(f"the discriminator takes 1 to 4 blocks, not {blocks}")
        layers: list[nn.Module] = []
        width = in_channels
        for i in range(blocks):
            out = 64 * 2**i
            layers.append(nn.Conv2d(width, out, 4, stride=2, padding=1))
            if i:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2))
            width = out
        layers.append(nn.Conv2d(width, 1, 4, padding=1))
        self.model = nn.Sequential(*layers)

    @staticmethod
    def blocks_for(size: int) -> int:
        """The most blocks (<= 4) that leave at least 2x2 for the final 4x4 convolution."""
        blocks = min(4, int(math.log2(size)) - 1)
        if blocks < 1:
            raise InputError(f"latents of {size}x{size} are too small for the discriminator (at least 4x4)")
        return blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def discriminator_loss(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``BCE(D(real), 0) + BCE(D(fake), 1)``: anchor-domain latents are labelled 0, target ones 1."""
    r, f = d(real), d(fake)
    return (F.binary_cross_entropy_with_logits(r, torch.zeros_like(r))
            + F.binary_cross_entropy_with_logits(f, torch.ones_like(f)))


def adversarial_loss(d: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """``BCE(D(fake), 0)``: low when the discriminator takes the target's latents for the anchor's."""
    f = d(fake)
    return F.binary_cross_entropy_with_logits(f, torch.zeros_like(f))


def project_conflicting(g_u: list[torch.Tensor], g_p: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
    """Concept-preserving gradient surgery, per tensor: where ``g_u . g_p < 0``, remove ``scale`` times
    the component of ``g_u`` along ``g_p`` (``g_u - scale (g_u . g_p / |g_p|^2) g_p``); else keep ``g_u``."""
    out = []
    for u, p in zip(g_u, g_p, strict=True):
        dot = (u.double() * p.double()).sum()
        norm2 = (p.double() ** 2).sum()
        if dot < 0 and norm2 > 0:
            u = (u.double() - scale * (dot / norm2) * p.double()).to(u.dtype)
        out.append(u)
    return out


def _clip(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    if max_norm <= 0:
        return grads
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * factor for g in grads]


@register_method("doco")
class DoCo(ConceptAblation):
    """DoCo: adversarial concept-domain correction with concept-preserving gradient surgery (arXiv 2405.15304)."""

    Config = DoCoConfig  # type: ignore[assignment]
    paper = ("Unlearning Concepts in Diffusion Model via Concept Domain Correction and Concept Preserving "
             "Gradient (Wu et al., AAAI 2025), arXiv 2405.15304")
    preserves = True
    named_anchor = True  # built on CA: a named anchor concept ("painting" for "van gogh")
    families = frozenset({"sd", "sdxl", "flux"})  # not yet SD3 (below)
    family_notes = {"sd3": ("the flow-matching form runs through the seam (x0 = x_t - sigma v) but is not offered yet on "
                            "SD3: on the tiny SD3 pipeline of the contract tests its preservation term does not hold the "
                            "preserved concept (it moves as much as the target); on Flux it is measured on toy-flux")}

    def _preserve_prompts(self, request: ErasureRequest, tokenizers) -> list[str]:
        """Prompts of the preserved concepts that are not anchors, in every template that fits (every
        one of ``tokenizers``: a tokenizer or a list of them)."""
        tokenizers = tokenizers if isinstance(tokenizers, (list, tuple)) else [tokenizers]
        kept = [p for p in request.preserve if p not in request.anchors]
        prompts = [fill(t, p) for p in kept for t in self.config.templates]
        return list(dict.fromkeys(p for p in prompts
                                  if all(token_count(tok, p) <= tok.model_max_length for tok in tokenizers)))

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> None:
        cfg = self.config
        family = family_of(pipe)
        unet = family.denoiser(pipe)
        device = unet.device
        tokenizers = [getattr(pipe, n) for n in family.tokenizers if getattr(pipe, n, None) is not None]
        pairs = [p for c, a in zip(request.concepts, request.anchors)
                 for p in prompt_pairs(c, a, cfg.concept_type, tokenizers, cfg.templates)]
        kept = self._preserve_prompts(request, tokenizers)
        frozen = frozen_copy(unet)  # theta*, the original model ("shadow_unet")
        which = torch.arange(cfg.num_anchor_images) % len(pairs)  # the pair of each anchor image
        x0 = self.anchor_latents(pipe, [pairs[i][1] for i in which.tolist()], generator)
        with torch.no_grad():
            targets = encode(pipe, [t for t, _ in pairs]).to(device, unet.dtype)
            anchors = encode(pipe, [a for _, a in pairs]).to(device, unet.dtype)
        # preservation pool: anchor images with their anchor prompts, then preserved-concept images
        pool_x, pool_emb, pool_which = x0, anchors, which
        if kept:
            pwhich = torch.arange(cfg.num_anchor_images) % len(kept)
            pool_x = torch.cat([pool_x, self.anchor_latents(pipe, [kept[i] for i in pwhich.tolist()], generator)])
            with torch.no_grad():
                pool_emb = Conditioning.cat([anchors, encode(pipe, kept).to(device, unet.dtype)])
            pool_which = torch.cat([which, len(pairs) + pwhich])
        log.info("%s: %d target/anchor prompt pairs; preservation on the anchor images and %d preserved-concept "
                 "prompts", self.name, len(pairs), len(kept))
        params = list(trainable(pipe, self.parameter_set).values())
        n = cfg.batch_size

        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the discriminator's initial weights come from the generator too
            disc = PatchDiscriminator(x0.shape[1], PatchDiscriminator.blocks_for(min(x0.shape[-2:])))
        disc = disc.to(device).train()
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.discriminator_lr, betas=(0.5, 0.999))

        def domains(grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
            """(real, fake): x0 of the original model on anchor prompts, of the trained one on targets."""
            idx = random_index(len(x0), generator, n)
            k = which[idx].to(device)
            x_t, _, t = noised(pipe, x0[idx.to(device)], generator)  # the noise, then t (as always)
            with torch.no_grad():
                real = family.predicted_x0(pipe, x_t, t, predict(pipe, x_t, t, anchors[k], denoiser=frozen))
            with torch.set_grad_enabled(grad):
                fake = family.predicted_x0(pipe, x_t, t, predict(pipe, x_t, t, targets[k]))
            return real, fake

        def step_d(real: torch.Tensor, fake: torch.Tensor, i: int) -> float:
            opt_d.zero_grad(set_to_none=True)
            loss = discriminator_loss(disc, real, fake.detach())
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"{self.name}: the discriminator loss became {float(loss)} at iteration "
                                       f"{i + 1}; lower discriminator_lr and try again")
            loss.backward()
            opt_d.step()
            return float(loss.detach())

        discriminator = {"discriminator": disc, "discriminator_optimizer": opt_d}  # checkpointed with the UNet's loop
        warm = resumable(f"{self.name} (discriminator warm-up)", cfg.warmup, discriminator)
        bar = tqdm(range(warm.start, cfg.warmup), desc=f"{self.name} (discriminator warm-up)", disable=not progress,
                   initial=warm.start, total=cfg.warmup)
        for i in bar:
            warm.losses.append(step_d(*domains(False), i))
            bar.set_postfix(loss_d=f"{warm.losses[-1]:.4g}")
            warm.step(i + 1)
        warm.finish()
        bar.close()

        def loss(i: int) -> torch.Tensor:
            real, fake = domains(True)
            l_adv = adversarial_loss(disc, fake)
            g_u = torch.autograd.grad(l_adv, params, allow_unused=True)
            g_u = _clip([torch.zeros_like(p) if g is None else g for p, g in zip(params, g_u)], cfg.max_grad_norm)
            if cfg.gradient_surgery or cfg.preserve_weight > 0:
                idx = random_index(len(pool_x), generator, n)
                x_t, target, t = noised(pipe, pool_x[idx.to(device)], generator)
                emb = pool_emb[pool_which[idx].to(device)]
                l_pre = F.mse_loss(predict(pipe, x_t, t, emb).float(), target.float())
                g_p = torch.autograd.grad(l_pre, params, allow_unused=True)
                g_p = _clip([torch.zeros_like(p) if g is None else g for p, g in zip(params, g_p)], cfg.max_grad_norm)
                if cfg.gradient_surgery:
                    g_u = project_conflicting(g_u, g_p, cfg.surgery_scale)
                if cfg.preserve_weight > 0:
                    g_u = [u + cfg.preserve_weight * p for u, p in zip(g_u, g_p)]
            step_d(real, fake, cfg.warmup + i)
            # a surrogate whose gradient is the corrected g_u and whose value is L_adv (for the log)
            surrogate = sum((p * g.detach()).sum() for p, g in zip(params, g_u))
            return l_adv.detach() + surrogate - surrogate.detach()

        train_steps(loss, params, cfg.iterations - cfg.warmup, lr=cfg.lr, name=self.name, progress=progress,
                    optimizer="adamw", weight_decay=cfg.weight_decay, state=discriminator)
