"""SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency (Fan et al., ICLR 2024,
arXiv 2310.12508), for text-to-image diffusion.

1. Forget and retain data: latents sampled by the original model, ``num_images`` of each. Forget
   prompts are the templates filled with the concept (``c_f`` = "a photo of a nude person"); retain
   prompts the same templates filled with the preserved concepts and the (named) anchors, or, when
   there are none, with the anchor "" (``c_r``).
2. Weight saliency mask ``m_s``: one pass over the forget data, summing the gradient of the
   forget-set loss of the classifier-free-guided prediction (``w`` = ``mask_guidance``)::

       g = | sum_batches  d/dtheta  -|| eps - ((1 + w) eps_theta(x_t, c_f) - w eps_theta(x_t, "")) ||^2 |

   ``m_s`` is 1 on the ``mask_ratio`` largest entries of ``g`` over all UNet parameters (one global
   ranking; the paper's threshold gamma is that quantile) and 0 elsewhere.
3. Saliency-masked fine-tuning ``theta <- theta - lr * Adam(m_s * grad)`` of::

       || eps_theta(x_t, c_f) - sg(eps_theta(x_t, c_p)) ||^2  +  alpha || eps' - eps_theta(x_t', c_r) ||^2

   on forget latents x_t (first term: the forget prompt now predicts what the *pseudo* prompt
   ``c_p`` predicts, the same template filled with the anchor) and retain latents x_t' (second
   term: the standard denoising loss; with ``retain_target="original"`` its target ``eps'`` is the
   original model's prediction ``eps_theta*(x_t', c_r)`` instead of the added noise). The target
   ``sg(...)`` comes from the model being trained, detached, as in the official code. Masked
   entries get a zero gradient, so Adam leaves them exactly as they were.

Defaults are the official SD code's NSFW recipe (github.com/OPTML-Group/Unlearn-Saliency, ``SD/``,
``train-scripts/generate_mask.py`` and ``nsfw_removal.py``; the repository is written for SD 1.4):
mask ratio 0.5 over every UNet parameter, mask guidance 7.5, forget loss of the current model's
detached prediction, Adam lr 1e-5, batch 8, alpha 0.1, 100 steps (one epoch of 800 forget images),
every UNet parameter trained (``--train_method full``); 800 forget and 800 retain images generated
by SD with "a photo of a nude person" / "a photo of a person wearing clothes" (template
``"a photo of a {}"``: concept "nude person", anchor "person wearing clothes" gives exactly these
prompts; the sampler settings of that generation are not given: 50 DDIM steps at guidance 7.5 here).
The object recipe (``random_label.py``: Imagenette classes as "an image of a {}", the next class as
pseudo prompt, the other classes as retain data, alpha 0.5, 5 epochs) is these options with
``templates=("an image of a {}",)``, ``alpha=0.5``, a named anchor and the other classes preserved.

Differences from the official code, and why:

* forget and retain data are the original model's sampled latents for every concept (the official
  object recipe uses real Imagenette photos; efface has no data set for an arbitrary concept), kept
  as latents instead of decoded to images and re-encoded;
* retain prompts are the preserved concepts (and named anchors) in the forget templates, so that
  ``preserve`` enters the objective; the official NSFW run retains only the pseudo prompt's images;
* forget and retain batches are drawn at random (seeded) instead of one ordered epoch over each set;
* the mask is applied by gradient hooks on the trained parameters, removed when training ends;
* ``retain_target="original"`` (not official; default ``"noise"``, the official loss) regresses the
  retain prompts onto the original model's predictions. Where the original model is the exact
  denoiser of its own samples, its prediction is the noise's conditional mean and both targets
  give the same expected gradient (this one without the noise's variance). A small model is not:
  the noise target *trains* toy-sd (and the contract test's random model) on its own samples,
  which moves every prompt, the preserved ones included; the original-model target holds them
  (toy preset: comment in ``efface.toy.presets``).

Model families (the official code is for SD 1.4; every term is a denoising loss, written with the
family's training target: ``eps`` above is whatever :func:`~efface.models.diffusion.add_noise`
says the denoiser predicts, ``eps_theta`` the denoiser's output):

* ``sd`` (SD 1.x / 2.x): as above; on v-prediction checkpoints (SD 2.x 768) the mask's loss and
  the retain loss regress onto the true v, the guided prediction is guided v;
* ``sdxl``: the same, over every UNet parameter (``add_embedding``, the pooled-text path,
  included); prompts carry both encoders' states and the pooled embedding;
* ``sd3`` / ``flux``: flow matching (``x_t = (1 - s) x_0 + s noise``, ``s = t / 1000`` with ``t``
  uniform; target the velocity ``noise - x_0``); the mask ranks every transformer parameter. On a
  guidance-distilled Flux (FLUX.1-dev) the mask's guided prediction and the sampling guidance
  are real classifier-free guidance on top of the distilled guidance (the model was not trained
  for it): ``sample_guidance=1`` samples as ``FluxPipeline`` does by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from efface.errors import InputError
from efface.methods.base import ErasureMethod, ErasureRequest, TrainingConfig, register_method
from efface.methods.prompts import fill
from efface.models.diffusion import (add_noise, frozen_copy, num_train_timesteps, predict, random_index, sample_to,
                                     train_steps, trainable)
from efface.models.families import Conditioning, family_of
from efface.models.text import encode

log = logging.getLogger(__name__)

SAMPLE_BATCH = 16  # forget / retain latents sampled per UNet call


@dataclass
class SalUnConfig(TrainingConfig):
    iterations: int = field(default=100, metadata={"help": "masked fine-tuning steps (official: one epoch "
                                                            "of 800 images at batch 8)"})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=8, metadata={"help": "forget and retain latents per step (each)"})
    alpha: float = field(default=0.1, metadata={"help": "weight of the retain (denoising) loss; official "
                                                         "0.1 for NSFW, 0.5 for objects"})
    mask_ratio: float = field(default=0.5, metadata={"help": "fraction of UNet weights the saliency mask "
                                                              "lets train"})
    mask_guidance: float = field(default=7.5, metadata={"help": "guidance w of the forget loss whose "
                                                                 "gradient makes the mask"})
    num_images: int = field(default=800, metadata={"help": "forget latents, and retain latents, sampled "
                                                            "from the original model"})
    sample_steps: int = field(default=50, metadata={"help": "DDIM steps to sample them"})
    sample_guidance: float = field(default=7.5, metadata={"help": "guidance scale to sample them"})
    retain_target: str = field(default="noise", metadata={
        "help": "target of the retain loss: the added 'noise' (official) or the 'original' model's prediction"})
    templates: tuple[str, ...] = field(default=("a photo of a {}",), metadata={
        "help": "prompt templates, '{}' is the concept (forget), anchor (pseudo) or preserved concept "
                "(retain)"})

    def __post_init__(self) -> None:
        self.check_bounds(at_least_one=("iterations", "batch_size", "num_images", "sample_steps"),
                          non_negative=("alpha",), positive=("lr",))
        if not 0 < self.mask_ratio <= 1:
            raise InputError(f"mask_ratio must be in (0, 1], not {self.mask_ratio}")
        self.check_choices(retain_target=("noise", "original"))
        self.check_templates("templates")


def saliency_masks(saliency: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """0/1 masks (in each tensor's dtype) that keep exactly ``floor(ratio * N)`` (at least one) of
    the N entries of all tensors together: those of largest ``|saliency|``, one global ranking."""
    flat = torch.cat([s.detach().abs().flatten().float() for s in saliency.values()])
    keep = max(1, int(ratio * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[flat.topk(keep, sorted=False).indices] = True
    masks, start = {}, 0
    for key, s in saliency.items():
        masks[key] = chosen[start : start + s.numel()].view(s.shape).to(s.dtype)
        start += s.numel()
    return masks


def guided_forget_loss(pipe, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, cond: Conditioning,
                       uncond: Conditioning, guidance: float) -> torch.Tensor:
    """The mask's loss ``-|| eps - ((1 + w) eps(x_t, c) - w eps(x_t, "")) ||^2`` (official form: the
    guided prediction with weight 1 + w on the condition; ``eps`` the training ``target`` of
    :func:`~efface.models.diffusion.add_noise`), to be differentiated."""
    both = Conditioning.cat([cond.expand(len(x_t)), uncond.expand(len(x_t))])
    e_c, e_u = predict(pipe, torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
    return -F.mse_loss(target.float(), ((1 + guidance) * e_c - guidance * e_u).float())


@register_method("salun")
class SalUn(ErasureMethod[SalUnConfig]):
    """Saliency-masked fine-tuning: forget prompts predict their pseudo prompts; a retain denoising
    loss keeps the preserved concepts (arXiv 2310.12508)."""

    Config = SalUnConfig
    paper = ("SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency (Fan et al., ICLR 2024), "
             "arXiv 2310.12508")
    parameter_set: ClassVar[str] = "all"
    preserves = True
    families = frozenset({"sd", "sdxl", "sd3", "flux"})  # denoising losses on add_noise's target (module doc)

    def prompts(self, request: ErasureRequest) -> tuple[list[tuple[str, str]], list[str]]:
        """(forget prompt, pseudo prompt) pairs and retain prompts, every template filled."""
        templates = self.config.templates
        forget = [(fill(t, c), fill(t, a)) for c, a in zip(request.concepts, request.anchors) for t in templates]
        kept = tuple(dict.fromkeys((*request.preserve, *(a for a in request.anchors if a)))) or ("",)
        retain = [fill(t, p) for p in kept for t in templates]
        return list(dict.fromkeys(forget)), list(dict.fromkeys(retain))

    @torch.no_grad()
    def sample(self, pipe, prompts: list[str], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_images`` x_0 latents of the current (original) model, prompts taken in turn; and the
        index of each latent's prompt."""
        cfg, den = self.config, family_of(pipe).denoiser(pipe)
        which = torch.arange(cfg.num_images) % len(prompts)
        emb = encode(pipe, prompts).to(den.device, den.dtype)
        empty = encode(pipe, [""]).to(den.device, den.dtype)
        out = []
        for start in range(0, cfg.num_images, SAMPLE_BATCH):
            c = emb[which[start : start + SAMPLE_BATCH]]
            out.append(sample_to(pipe, c, empty, cfg.sample_steps, cfg.sample_steps, cfg.sample_guidance, generator))
        return torch.cat(out), which

    def saliency(self, pipe, params: dict[str, torch.nn.Parameter], latents: torch.Tensor, cond: Conditioning,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The summed gradient of :func:`guided_forget_loss` over one pass of the forget latents
        (``cond``: one conditioning row per latent)."""
        cfg, den = self.config, family_of(pipe).denoiser(pipe)
        steps = num_train_timesteps(pipe)
        empty = encode(pipe, [""]).to(den.device, den.dtype)
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        for start in range(0, len(latents), cfg.batch_size):
            x0, c = latents[start : start + cfg.batch_size], cond[start : start + cfg.batch_size]
            t = random_index(steps, generator, len(x0)).to(den.device)
            x_t, target = add_noise(pipe, x0, t, generator)
            loss = guided_forget_loss(pipe, x_t, t, target, c, empty.expand(len(x0)), cfg.mask_guidance)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for k, g in zip(params, grads):
                if g is not None:
                    total[k] += g
        return total

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> None:
        cfg, den = self.config, family_of(pipe).denoiser(pipe)
        forget, retain = self.prompts(request)
        f_x0, f_which = self.sample(pipe, [f for f, _ in forget], generator)
        r_x0, r_which = self.sample(pipe, retain, generator)
        with torch.no_grad():
            forget_c, pseudo_c, retain_c = (encode(pipe, p).to(den.device, den.dtype)
                                            for p in ([f for f, _ in forget], [p for _, p in forget], retain))
        original = frozen_copy(den) if cfg.retain_target == "original" else None
        params = trainable(pipe, self.parameter_set)
        masks = saliency_masks(self.saliency(pipe, params, f_x0, forget_c[f_which], generator), cfg.mask_ratio)
        log.info("salun: the saliency mask keeps %d of %d %s weights", int(sum(m.sum() for m in masks.values())),
                 sum(m.numel() for m in masks.values()), family_of(pipe).denoiser_name)
        steps, n = num_train_timesteps(pipe), cfg.batch_size

        def noisy(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            t = random_index(steps, generator, len(x0)).to(den.device)
            x_t, target = add_noise(pipe, x0, t, generator)
            return x_t, t, target

        def loss(_: int) -> torch.Tensor:
            fi, ri = random_index(len(f_x0), generator, n), random_index(len(r_x0), generator, n)
            k = f_which[fi]
            x_f, t_f, _ = noisy(f_x0[fi])
            with torch.no_grad():
                target = predict(pipe, x_f, t_f, pseudo_c[k])  # sg(eps_theta(x_t, c_p))
            forget_loss = F.mse_loss(predict(pipe, x_f, t_f, forget_c[k]).float(), target.float())
            if cfg.alpha == 0:
                return forget_loss
            x_r, t_r, eps_r = noisy(r_x0[ri])
            c_r = retain_c[r_which[ri]]
            if original is not None:
                with torch.no_grad():
                    eps_r = predict(pipe, x_r, t_r, c_r, denoiser=original)
            retain_loss = F.mse_loss(predict(pipe, x_r, t_r, c_r).float(), eps_r.float())
            return forget_loss + cfg.alpha * retain_loss

        hooks = [p.register_hook(lambda g, m=masks[k]: g * m) for k, p in params.items()]
        try:
            train_steps(loss, list(params.values()), cfg.iterations, lr=cfg.lr, name=self.name, progress=progress)
        finally:
            for h in hooks:
                h.remove()

