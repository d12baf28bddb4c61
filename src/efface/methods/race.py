"""RACE: Robust Adversarial Concept Erasure (Kim et al., ECCV 2024, arXiv 2405.16341).

ESD (:mod:`efface.methods.esd`) made robust by adversarial training: first ``esd_iterations``
plain ESD steps (the official recipe starts from a trained ESD model), then ``iterations`` steps in
which the trained model sees, instead of the concept's text embedding ``c`` (the text encoder's
whole output sequence), an adversarial ``c + delta``: ``delta`` is found by PGD in an L-inf ball of
radius ``epsilon`` so that the *current* model regenerates the concept from x_t::

    delta = argmin_{|delta|_inf <= eps}  || x_T - eps_theta(x_t, t, c + delta) ||^2      (pgd_steps sign steps)
    loss  = || eps_theta(x_t, t, c + delta) - (e_0 - eta (e_p - e_0)) ||^2                (ESD's target)

with a random start ``delta ~ U(-eps, eps)`` and step ``epsilon / 4``; x_T is the start noise that
x_t was sampled from (the target of the paper's Algorithm 1 and of the official code); on
v-prediction models (SD 2.x 768) the output is turned into the noise it predicts first.

Defaults are the official code's (github.com/chkimmmmm/R.A.C.E., ``train-scripts/train-esd.py``
with ``--adv_train``): epsilon 0.1, 10 PGD steps (hard-coded there; its ``--pgd_num_step`` flag is
unused), Adam lr 1e-5, 1000 adversarial iterations after a 1000-iteration ESD model, ESD's other
defaults; the trained parameters are ``train_method`` (ESD's names; default ``noxattn``, ESD-u, the
ESD paper's choice for objects and nudity). Differences: the perturbed embedding is not clamped to
the clean embedding's global min / max (the official code does; the paper does not); the optional
L1 term towards the ESD weights (``--lasso``) is not implemented.

Families: SD 1.x / 2.x (the paper's and the official code's) and SDXL. The perturbation is of the
token sequence the denoiser's cross-attention reads (:attr:`~efface.models.families.Conditioning.embeds`):
on SD that is the whole conditioning, as in the official code; on SDXL it is the concatenated
CLIP-L / bigG penultimate states, while the pooled embedding (the ``add_embedding`` path) is kept
clean (``cond.with_embeds``). That keeps RACE's threat model on SDXL (adversarial token states,
what prompt and embedding attacks change, reaching the UNet through cross-attention) but makes the
model robust on that path only; ``epsilon`` is in the units of those states (SDXL's penultimate
states are not final-layer-normed as SD 1.x's are) and is not re-tuned there. SD3 and Flux (not in the paper): the
perturbed sequence is the joint attention's text tokens (SD3: CLIP states zero-padded to T5's width,
then T5's; Flux: T5's), the pooled embedding kept clean as on SDXL; their states have other scales
than SD's final-layer-normed CLIP states, so ``epsilon_units="token_rms"`` gives each token a radius
of ``epsilon`` times its own root-mean-square state, a radius relative to each state; the official
absolute radius stays the default everywhere (the relative one is not the paper's, and which value
of ``epsilon`` matches the paper's 0.1 on SD 1.x is not measured here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from efface.methods.base import ErasureRequest, register_method
from efface.methods.esd import ESD, ESDConfig
from efface.models.diffusion import frozen_copy, predict
from efface.models.families import Conditioning, family_of

TRAIN_METHODS = {"xattn": "xattn", "xattn_kv": "xattn_kv", "noxattn": "noxattn", "all": "all"}


@dataclass
class RACEConfig(ESDConfig):
    esd_iterations: int = field(default=1000, metadata={"help": "plain ESD steps before adversarial training"})
    epsilon: float = field(default=0.1, metadata={"help": "L-inf radius of the embedding perturbation"})
    epsilon_units: str = field(default="absolute", metadata={
        "help": "absolute: epsilon in the units of the token states (official, SD's CLIP); token_rms: epsilon times "
                "each token's root-mean-square state (a radius that means the same for T5 and CLIP states)"})
    pgd_steps: int = field(default=10, metadata={"help": "PGD sign steps per iteration (step epsilon / 4)"})
    train_method: str = field(default="noxattn", metadata={"help": "trained parameters: xattn (esd-x), xattn_kv, "
                                                                     "noxattn (esd-u) or all"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_bounds(non_negative=("esd_iterations",), positive=("epsilon",))
        self.check_choices(train_method=tuple(TRAIN_METHODS), epsilon_units=("absolute", "token_rms"))


def pgd_embedding(pipe, c: Conditioning, x_t: torch.Tensor, t, target: torch.Tensor, epsilon: float, steps: int,
                  generator: torch.Generator, *, denoiser: torch.nn.Module | None = None,
                  units: str = "absolute") -> Conditioning:
    """``c`` with its token sequence ``c.embeds + delta``, ``delta`` in the L-inf ball of radius
    ``epsilon`` minimising ``|| target - eps(x_t, t, c + delta) ||^2`` (``target`` a noise; ``eps``
    the pipeline's denoiser, or ``denoiser``, through the family's ``predicted_noise``) by ``steps``
    signed-gradient steps of ``epsilon / 4`` from a uniform random start; the pooled part (SDXL, SD3,
    Flux) is kept. ``units="token_rms"``: radius and step are per token, times that token's
    root-mean-square state. The denoiser's parameters get no gradient."""
    emb = c.embeds.detach()
    radius = epsilon * (emb.float().square().mean(-1, keepdim=True).sqrt().to(emb.dtype) if units == "token_rms"
                        else torch.ones((), device=emb.device, dtype=emb.dtype))
    delta = (torch.rand(emb.shape, generator=generator) * 2 - 1).to(emb.device, emb.dtype) * radius
    for _ in range(steps):
        delta.requires_grad_(True)
        out = predict(pipe, x_t, t, c.with_embeds(emb + delta), denoiser=denoiser)
        loss = F.mse_loss(family_of(pipe).predicted_noise(pipe, x_t, t, out).float(), target.float())
        (grad,) = torch.autograd.grad(loss, delta)
        delta = torch.maximum(torch.minimum(delta.detach() - radius / 4 * grad.sign(), radius), -radius)
    return c.with_embeds((emb + delta).detach()).detach()


@register_method("race")
class RACE(ESD):
    """ESD with adversarial training on PGD-perturbed concept embeddings (arXiv 2405.16341)."""

    Config = RACEConfig
    paper = "RACE: Robust Adversarial Concept Erasure for Secure Text-to-Image Diffusion Model (Kim et al., ECCV 2024), arXiv 2405.16341"
    families = frozenset({"sd", "sdxl", "sd3", "flux"})
    family_notes = {
        "sd3": "the perturbation is of the joint sequence (CLIP-L / G states zero-padded to T5's width, then T5's), "
               "whose scales differ: use epsilon_units='token_rms'; the pooled embedding is kept clean",
        "flux": "the perturbation is of the T5 token states (the concept's CLIP part is the pooled embedding, kept "
                "clean), outside the CLIP-state radius RACE was tuned for: use epsilon_units='token_rms'",
    }

    @property
    def parameter_set(self) -> str:  # type: ignore[override]
        """The ESD parameter set named by ``config.train_method``."""
        return TRAIN_METHODS[self.config.train_method]

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> None:
        cfg = self.config
        original = frozen_copy(family_of(pipe).denoiser(pipe))  # both stages regress onto the original model
        if cfg.esd_iterations:
            self._train(pipe, request, generator, progress, cfg.esd_iterations, frozen=original)

        def adversarial(c, x_t, t, x_T):  # against the model being trained, as the official code
            return pgd_embedding(pipe, c, x_t, t, x_T, cfg.epsilon, cfg.pgd_steps, generator, units=cfg.epsilon_units)

        self._train(pipe, request, generator, progress, cfg.iterations, perturb=adversarial, frozen=original)
