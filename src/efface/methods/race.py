"""RACE: Robust Adversarial Concept Erasure (Kim et al., ECCV 2024, arXiv 2405.16341).

ESD (:mod:`efface.methods.esd`) made robust by adversarial training: first ``esd_iterations``
plain ESD steps (the official recipe starts from a trained ESD model), then ``iterations`` steps in
which the trained model sees, instead of the concept's text embedding ``c`` (the text encoder's
whole output sequence), an adversarial ``c + delta``: ``delta`` is found by PGD in an L-inf ball of
radius ``epsilon`` so that the *current* model regenerates the concept from x_t::

    delta = argmin_{|delta|_inf <= eps}  || x_T - eps_theta(x_t, t, c + delta) ||^2      (pgd_steps sign steps)
    loss  = || eps_theta(x_t, t, c + delta) - (e_0 - eta (e_p - e_0)) ||^2                (ESD's target)

with a random start ``delta ~ U(-eps, eps)`` and step ``epsilon / 4``; x_T is the start noise that
x_t was sampled from (the target of the paper's Algorithm 1 and of the official code).

Defaults are the official code's (github.com/chkimmmmm/R.A.C.E., ``train-scripts/train-esd.py``
with ``--adv_train``): epsilon 0.1, 10 PGD steps (hard-coded there; its ``--pgd_num_step`` flag is
unused), Adam lr 1e-5, 1000 adversarial iterations after a 1000-iteration ESD model, ESD's other
defaults; the trained parameters are ``train_method`` (ESD's names; default ``noxattn``, ESD-u, the
ESD paper's choice for objects and nudity). Differences: the perturbed embedding is not clamped to
the clean embedding's global min / max (the official code does; the paper does not); the optional
L1 term towards the ESD weights (``--lasso``) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from efface.methods.base import ErasureRequest, register_method
from efface.methods.esd import ESD, ESDConfig
from efface.models.diffusion import frozen_copy, predict_noise

TRAIN_METHODS = {"xattn": "xattn", "xattn_kv": "xattn_kv", "noxattn": "noxattn", "all": "all"}


@dataclass
class RACEConfig(ESDConfig):
    esd_iterations: int = field(default=1000, metadata={"help": "plain ESD steps before adversarial training"})
    epsilon: float = field(default=0.1, metadata={"help": "L-inf radius of the embedding perturbation"})
    pgd_steps: int = field(default=10, metadata={"help": "PGD sign steps per iteration (step epsilon / 4)"})
    train_method: str = field(default="noxattn", metadata={"help": "trained parameters: xattn (esd-x), xattn_kv, "
                                                                     "noxattn (esd-u) or all"})

    # toy-sd on 2 cores: ESD's toy schedule for 100 iterations, then 40 adversarial iterations with
    # 3 PGD steps (each costs a UNet backward pass): about 2.5 min. After the full 150 ESD
    # iterations the adversarial stage costs the other shapes 14 points (circle 0.04, others 0.86).
    PRESETS: ClassVar[dict[str, dict]] = {
        "toy": {**ESDConfig.PRESETS["toy"], "esd_iterations": 100, "iterations": 40, "pgd_steps": 3},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_bounds(non_negative=("esd_iterations",), positive=("epsilon",))
        self.check_choices(train_method=tuple(TRAIN_METHODS))


def pgd_embedding(unet, c: torch.Tensor, x_t: torch.Tensor, t, target: torch.Tensor, epsilon: float, steps: int,
                  generator: torch.Generator) -> torch.Tensor:
    """``c + delta`` with ``delta`` in the L-inf ball of radius ``epsilon`` minimising
    ``|| target - unet(x_t, t, c + delta) ||^2`` by ``steps`` signed-gradient steps of ``epsilon / 4``
    from a uniform random start; the UNet's parameters get no gradient."""
    delta = (torch.rand(c.shape, generator=generator) * 2 - 1).to(c.device, c.dtype) * epsilon
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.mse_loss(predict_noise(unet, x_t, t, c + delta).float(), target.float())
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - epsilon / 4 * grad.sign()).clamp(-epsilon, epsilon)
    return (c + delta).detach()


@register_method("race")
class RACE(ESD):
    """ESD with adversarial training on PGD-perturbed concept embeddings (arXiv 2405.16341)."""

    Config = RACEConfig
    paper = "RACE: Robust Adversarial Concept Erasure for Secure Text-to-Image Diffusion Model (Kim et al., ECCV 2024), arXiv 2405.16341"

    @property
    def parameter_set(self) -> str:  # type: ignore[override]
        """The ESD parameter set named by ``config.train_method``."""
        return TRAIN_METHODS[self.config.train_method]

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> None:
        cfg = self.config
        original = frozen_copy(pipe.unet)  # both stages regress onto the original model's predictions
        if cfg.esd_iterations:
            self._train(pipe, request, generator, progress, cfg.esd_iterations, frozen=original)

        def adversarial(c, x_t, t, x_T):
            return pgd_embedding(pipe.unet, c, x_t, t, x_T, cfg.epsilon, cfg.pgd_steps, generator)

        self._train(pipe, request, generator, progress, cfg.iterations, perturb=adversarial, frozen=original)
