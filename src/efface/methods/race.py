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
states are not final-layer-normed as SD 1.x's are) and is not re-tuned there. SD3 and Flux are
refused (see ``family_notes``).
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
    pgd_steps: int = field(default=10, metadata={"help": "PGD sign steps per iteration (step epsilon / 4)"})
    train_method: str = field(default="noxattn", metadata={"help": "trained parameters: xattn (esd-x), xattn_kv, "
                                                                     "noxattn (esd-u) or all"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_bounds(non_negative=("esd_iterations",), positive=("epsilon",))
        self.check_choices(train_method=tuple(TRAIN_METHODS))


def pgd_embedding(pipe, c: Conditioning, x_t: torch.Tensor, t, target: torch.Tensor, epsilon: float, steps: int,
                  generator: torch.Generator, *, denoiser: torch.nn.Module | None = None) -> Conditioning:
    """``c`` with its token sequence ``c.embeds + delta``, ``delta`` in the L-inf ball of radius
    ``epsilon`` minimising ``|| target - eps(x_t, t, c + delta) ||^2`` (``target`` a noise; ``eps``
    the pipeline's denoiser, or ``denoiser``, through the family's ``predicted_noise``) by ``steps``
    signed-gradient steps of ``epsilon / 4`` from a uniform random start; the pooled part (SDXL) is
    kept. The denoiser's parameters get no gradient."""
    emb = c.embeds.detach()
    delta = (torch.rand(emb.shape, generator=generator) * 2 - 1).to(emb.device, emb.dtype) * epsilon
    for _ in range(steps):
        delta.requires_grad_(True)
        out = predict(pipe, x_t, t, c.with_embeds(emb + delta), denoiser=denoiser)
        loss = F.mse_loss(family_of(pipe).predicted_noise(pipe, x_t, t, out).float(), target.float())
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - epsilon / 4 * grad.sign()).clamp(-epsilon, epsilon)
    return c.with_embeds((emb + delta).detach()).detach()


@register_method("race")
class RACE(ESD):
    """ESD with adversarial training on PGD-perturbed concept embeddings (arXiv 2405.16341)."""

    Config = RACEConfig
    paper = "RACE: Robust Adversarial Concept Erasure for Secure Text-to-Image Diffusion Model (Kim et al., ECCV 2024), arXiv 2405.16341"
    families = frozenset({"sd", "sdxl"})
    family_notes = {
        "sd3": "not ported: the conditioning is CLIP-L / G states (zero-padded to T5's width) followed by T5's, "
               "whose scales differ, so one L-inf radius over the sequence is not RACE's perturbation; "
               "use esd-x / esd-u",
        "flux": "not ported: the token sequence is T5's (the concept's CLIP part is only the pooled embedding), "
                "outside the CLIP-state threat model and radius RACE was designed and tuned for; use esd-x / esd-u",
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
            return pgd_embedding(pipe, c, x_t, t, x_T, cfg.epsilon, cfg.pgd_steps, generator)

        self._train(pipe, request, generator, progress, cfg.iterations, perturb=adversarial, frozen=original)
