"""AdvUnlearn: Defensive Unlearning with Adversarial Training (Zhang et al., NeurIPS 2024, arXiv 2405.15234).

ESD's unlearning objective (:mod:`efface.methods.esd`) made robust by adversarial training of the
*text encoder* (by default), so that the result is a plug-in text encoder. A bi-level problem:
the attacker (lower level) prepends ``k`` free token embeddings ``u`` to the concept prompt ``c``
(the prompt's own tokens stay: an l0 budget of ``k`` tokens) so that the model regenerates the
concept; the defender (upper level) fine-tunes the encoder ``phi`` so that even the adversarial
prompt gets ESD's negatively guided target, while a retain set keeps its predictions::

    u*   = argmin_u  || eps_theta(x_t, t, tau_phi([u; c])) - e_p ||^2          (attack_step Adam steps)
    loss = || eps_theta(x_t, t, tau_phi([u*; c])) - (e_0 - eta (e_p - e_0)) ||^2
         + gamma || eps_theta(x_r, t, tau_phi(r)) - eps_theta*(x_r, t, tau*(r)) ||^2

with ``e_0 = eps_theta*(x_t, t, tau*(""))``, ``e_p = eps_theta*(x_t, t, tau*(c))`` from the frozen
original UNet and text encoder (``theta*``, ``tau*``), ``x_t`` sampled by DDIM with guidance
``start_guidance`` (as ESD), ``r`` a batch of retain prompts and ``x_r`` sampled from them. The
first ``warmup_iter`` iterations are plain ESD on the clean prompt. Each attack step draws its own
DDIM step and ``x_t``; ``attack_method="pgd"`` feeds the gradient to Adam (lr ``attack_lr``),
``"fast_at"`` its sign (the paper's fast-AT variant).

Defaults are the official code's (github.com/OPTML-Group/AdvUnlearn, ``train-scripts/AdvUnlearn.py``,
argparse defaults, with the README's commands where they set a flag): ``train_method``
``text_encoder_full`` (every transformer layer and the final layer norm, not the token / position
embeddings: parameter set ``text_encoder_layers``), 1000 iterations, Adam lr 1e-5, ``warmup_iter``
200, ``start_guidance`` 3, ``negative_guidance`` 1, 50 DDIM steps, batch 1; attack: ``prefix_k``
word embeddings, ``adv_prompt_num`` 1, ``attack_step`` 30, ``attack_lr`` 1e-3, ``attack_method``
``pgd`` (argparse default; ``fast_at`` is the README's fast variant), ``attack_init`` ``random``
(README; the argparse default is ``latest``: start from the previous round's tokens), a new
attack every iteration (``adv_prompt_update_step`` 1); retain: ``retain_train`` ``reg`` with
``retain_loss_w`` 0.3 (README; argparse: ``iter``, 1.0) and ``retain_batch`` 5. ``train_method`` may instead name a UNet
set (``xattn``, ``noxattn``, ``full``; the paper's UNet ablation).

Differences from the official code, and why:

* the retain set is ``request.preserve`` filled into ``retain_templates`` (default ``"a photo of {}"``,
  the form of the official ``coco_object`` retain prompts); the official code reads a fixed CSV of
  243 COCO object names. With nothing to preserve the retain term is left out (logged);
* the UNet is queried at x_t's own DDIM timestep (as :mod:`efface.methods.esd`); the official code
  draws a DDPM timestep in the 20-step bin above it;
* retain prompts are drawn per batch without replacement from the seeded generator (the official
  code cycles through its CSV, unseeded); every random draw is seeded;
* an anchor other than "" replaces the empty prompt of e_0 (as ESD here); ``templates`` can put the
  concept into prompt contexts (official: the bare concept; the toy preset uses toy-sd's captions);
* each attack step feeds Adam that step's gradient (``attack_grad="fresh"``, efface's reading of the
  paper's lower level); the official ``soft_prompt_attack`` (``train-scripts/utils/attack_util.py``)
  never zeroes the embedding's gradient, so Adam runs on the running sum of the 30 steps' gradients,
  and ``fast_at``'s in-place ``sign_()`` of that sum keeps the first step's sign wherever no later
  gradient exceeds 1 in magnitude (in effect frozen after step 1): ``attack_grad="accumulate"``;
* the official iterative retain variant (``retain_train='iter'``), the ``replace_k`` / ``add`` /
  ``suffix_k`` insertions, the ``condition_embd`` attack and the per-layer text-encoder subsets
  are not implemented;
* the official code builds the prefixed prompt's input embeddings itself (start token, ``u``, the
  prompt's token embeddings); here the prompt gets ``k`` one-token placeholder words after its
  start token, tokenized and encoded by the pipeline's own ``encode_prompt``, with a forward hook
  putting ``u`` in place of the placeholders' token embeddings: the same input to the encoder.

Model families:

* ``sd`` (SD 1.x / 2.x; the official code's SD 1.4): as above. Nothing is trained on the training
  target of the noise schedule, only on the frozen model's predictions, so v-prediction
  checkpoints (SD 2.x 768) need nothing else: ``e_0`` / ``e_p`` / the ESD target are v's;
* ``sdxl``: both CLIP text encoders feed the UNet (their penultimate states, concatenated, and the
  second one's pooled projection through ``add_embedding``), so the concept reaches the UNet
  through either: ``text_encoder_full`` trains the layers and final norms of *both* (and the
  second one's ``text_projection``, the pooled path; token / position embeddings stay), and the
  result is a plug-in pair of text encoders. The attack perturbs *both* encoders: each has its own
  embedding table, and a token of the prompt is a row of each, so ``u`` is one ``k x D`` tensor
  per encoder (768 and 1280 wide on SDXL) at the same ``k`` slots, optimised jointly, started from
  the two tables' rows of the same ``k`` random tokens (one draw). Perturbing the first encoder
  only would leave the attacker no say in the second one's states, the pooled embedding among
  them, which a real token prefix changes too. The UNet sets (``xattn``, ``noxattn``, ``full``)
  are the UNet's as on SD (``noxattn`` leaves ``add_embedding`` out);
* ``sd3`` / ``flux`` (not in the paper): the prompt reaches the model through CLIP and T5, so the
  attack perturbs every encoder's ``k`` slots (:mod:`efface.models.slots`: after CLIP's start
  token, first in T5, which has none), each with its own table's rows, optimised jointly, as on
  SDXL. The encoders' vocabularies differ, so the random start draws ``k`` tokens in each table
  separately (the official start is "k random tokens"; SD / SDXL keep one draw for all tables of
  the same vocabulary). ``text_encoder_full`` trains the layers of *every* text encoder, T5's
  included: on the real models that is T5-XXL (4.7B parameters), which the paper's plug-in text
  encoder never was; ``train_method="xattn"`` trains the transformer's joint attention instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from efface.methods.base import ErasureMethod, ErasureRequest, TrainingConfig, register_method
from efface.methods.esd import esd_target
from efface.methods.prompts import draw_row, fill, filled
from efface.models.diffusion import (frozen_copy, initial_latents, predict, random_index, sample_to, sampler,
                                     train_steps, trainable)
from efface.models.families import Conditioning, family_of
from efface.models.precision import master_dtype
from efface.models.slots import check_prefix_fits, prefixed_condition, prefixed_prompt, token_tables
from efface.models.text import encode

log = logging.getLogger(__name__)

# official train_method -> efface parameter set (efface.models.params)
TRAIN_METHODS = {"text_encoder_full": "text_encoder_layers", "xattn": "xattn", "noxattn": "noxattn", "full": "all"}


@dataclass
class AdvUnlearnConfig(TrainingConfig):
    iterations: int = field(default=1000, metadata={"help": "upper-level (unlearning) steps"})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of the trained parameters"})
    train_method: str = field(default="text_encoder_full", metadata={
        "help": "trained part: text_encoder_full (text-encoder layers + final norm), or UNet xattn, noxattn, full"})
    warmup_iter: int = field(default=200, metadata={"help": "plain ESD iterations before adversarial training"})
    negative_guidance: float = field(default=1.0, metadata={"help": "negative guidance eta of the ESD target"})
    start_guidance: float = field(default=3.0, metadata={"help": "guidance scale used to sample x_t"})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps of the partial sampling of x_t"})
    batch_size: int = field(default=1, metadata={"help": "x_t samples per iteration and attack step (official: 1)"})
    adv_prompt_num: int = field(default=1, metadata={"help": "k, adversarial token embeddings prepended to the prompt"})
    attack_step: int = field(default=30, metadata={"help": "attack steps per attack"})
    attack_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the attack"})
    attack_method: str = field(default="pgd", metadata={"help": "pgd (Adam on the gradient) or fast_at (on its sign)"})
    attack_init: str = field(default="random", metadata={
        "help": "random (embeddings of k random tokens) or latest (the previous attack's result)"})
    adv_prompt_update_step: int = field(default=1, metadata={"help": "iterations between attacks (and concept draws)"})
    attack_grad: str = field(default="fresh", metadata={
        "help": "what each attack step feeds Adam: 'fresh', that step's gradient (efface's reading of the paper), "
                "or 'accumulate', the running sum of the attack's gradients, as the official code, which never "
                "clears them (fast_at: the sign of the previous sign plus the new gradient)"})
    retain_loss_w: float = field(default=0.3, metadata={"help": "gamma, weight of the utility-retaining loss"})
    retain_batch: int = field(default=5, metadata={"help": "retain prompts per iteration"})
    retain_templates: tuple[str, ...] = field(default=("a photo of {}",), metadata={
        "help": "templates the preserved concepts are filled into to form the retain set"})
    templates: tuple[str, ...] = field(default=("{}",), metadata={
        "help": "prompt templates of the concept (and anchor); one drawn per concept draw (official: bare concept)"})

    def __post_init__(self) -> None:
        self.check_bounds(at_least_one=("iterations", "ddim_steps", "batch_size", "adv_prompt_num", "attack_step",
                                        "adv_prompt_update_step", "retain_batch"),
                          non_negative=("warmup_iter", "retain_loss_w"), positive=("lr", "attack_lr"))
        self.check_choices(train_method=tuple(TRAIN_METHODS), attack_method=("pgd", "fast_at"),
                           attack_init=("random", "latest"), attack_grad=("fresh", "accumulate"))
        self.check_templates("templates", "retain_templates")


def prefix_attack(pipe, text: str, adv: Sequence[torch.Tensor],
                  draw: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], steps: int, lr: float,
                  signed: bool = False, accumulate: bool = False) -> tuple[list[torch.Tensor], list[float]]:
    """AdvUnlearn's lower level: ``steps`` Adam steps (lr ``lr``; on the gradient's sign if
    ``signed``: fast AT) on the prepended embeddings ``adv`` (one tensor per text encoder, optimised
    together) minimising ``|| model(x_t, t, tau([adv; prompt])) - e_p ||^2``, with
    ``(x_t, t, e_p) = draw()`` fresh each step and ``text`` from :func:`prefixed_prompt`. Model
    parameters get no gradient. Returns the embeddings and the loss before each step.

    ``accumulate``: Adam reads the official ``soft_prompt_attack``'s gradient, which is never cleared
    between steps: ``G_i = G_{i-1} + g_i`` (``G_0 = 0``), and with ``signed`` its in-place sign,
    ``G_i = sign(G_{i-1} + g_i)``, which keeps ``sign(g_1)`` wherever no later gradient exceeds 1."""
    adv = [a.detach().to(dtype=master_dtype(a.dtype), copy=True).requires_grad_(True) for a in adv]
    optimizer = torch.optim.Adam(adv, lr=lr)
    losses = []
    running: list[torch.Tensor | None] = [None] * len(adv)  # accumulate: the official uncleared .grad
    for _ in range(steps):
        x_t, t, e_p = draw()
        cond = prefixed_condition(pipe, text, adv)
        loss = F.mse_loss(predict(pipe, x_t, t, cond).float(), e_p.float())
        grads = torch.autograd.grad(loss, adv)
        for j, (a, grad) in enumerate(zip(adv, grads)):
            if accumulate:
                grad = grad if running[j] is None else running[j] + grad
            a.grad = grad.sign() if signed else grad
            if accumulate:
                running[j] = a.grad
        optimizer.step()
        losses.append(float(loss.detach()))
    return [a.detach() for a in adv], losses


@register_method("advunlearn")
class AdvUnlearn(ErasureMethod[AdvUnlearnConfig]):
    """ESD-style unlearning with adversarial training, of the text encoder by default (arXiv 2405.15234)."""

    Config = AdvUnlearnConfig
    paper = ("Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion Models "
             "(Zhang et al., NeurIPS 2024), arXiv 2405.15234")
    preserves: ClassVar[bool] = True
    families: ClassVar[frozenset[str]] = frozenset({"sd", "sdxl", "sd3", "flux"})
    family_notes: ClassVar[dict[str, str]] = dict.fromkeys(("sd3", "flux"), (
        "the attack's k slots in CLIP and T5 at once (each its own table; T5 has no start token); "
        "text_encoder_full trains every encoder's layers, T5's included (train_method=xattn for the transformer)"))

    @property
    def parameter_set(self) -> str:  # type: ignore[override]
        """The parameter set named by ``config.train_method``."""
        return TRAIN_METHODS[self.config.train_method]

    def check(self, pipe, request: ErasureRequest) -> None:
        super().check(pipe, request)
        k = self.config.adv_prompt_num
        for c in request.concepts:
            for t in self.config.templates:
                check_prefix_fits(pipe, fill(t, c), k, "adv_prompt_num")
                prefixed_prompt(pipe, fill(t, c), k)

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> None:
        cfg, den = self.config, family_of(pipe).denoiser(pipe)
        k = cfg.adv_prompt_num
        prompts = filled(cfg.templates, request.concepts)
        retain = filled(cfg.retain_templates, request.preserve)
        if not retain and cfg.retain_loss_w > 0:
            log.info("%s: nothing to preserve, the retain loss is left out", self.name)
        with torch.no_grad():  # tau*: the original encoders' conditionings (row i: prompts[i])
            concepts = encode(pipe, prompts).to(den.device, den.dtype)
            anchors = encode(pipe, filled(cfg.templates, request.anchors))
            anchors = anchors.to(den.device, den.dtype)
            empty = encode(pipe, [""]).to(den.device, den.dtype)
            retained = encode(pipe, retain).to(den.device, den.dtype) if retain else None
        prefixed = [prefixed_prompt(pipe, p, k) for p in prompts]
        params = trainable(pipe, self.parameter_set)
        trains_unet = not self.parameter_set.startswith("text_encoder")
        frozen = frozen_copy(den) if trains_unet else None  # theta*: None, the denoiser is unchanged otherwise
        timesteps = sampler(pipe, cfg.ddim_steps).timesteps
        tables = token_tables(pipe)
        same_vocab = len({t.shape[0] for t in tables}) == 1  # SD, SDXL: one CLIP vocabulary; SD3 / Flux: CLIP and T5
        n = cfg.batch_size
        state: dict = {"row": 0, "adv": None}

        def draw_x_t(c: Conditioning, batch: int):
            step = random_index(cfg.ddim_steps, generator)
            x_t = sample_to(pipe, c.expand(batch), empty, step, cfg.ddim_steps, cfg.start_guidance, generator,
                            initial_latents(pipe, batch, generator))
            return x_t, timesteps[step], step

        def attack_draw():
            c = concepts[state["row"] : state["row"] + 1]
            x_t, t, _ = draw_x_t(c, n)
            with torch.no_grad():
                e_p = predict(pipe, x_t, t, c, denoiser=frozen)
            return x_t, t, e_p

        def loss(i: int) -> torch.Tensor:
            update = i % cfg.adv_prompt_update_step == 0
            if update:
                state["row"] = draw_row(len(request.concepts), len(cfg.templates), generator)
            # the first adversarial iteration attacks even off the update grid (warmup_iter not a multiple)
            if i >= cfg.warmup_iter and (update or state["adv"] is None):
                if cfg.attack_init == "latest" and state["adv"] is not None:
                    start = state["adv"]
                elif same_vocab:  # the rows of the same k random tokens in every encoder's table
                    token_ids = random_index(tables[0].shape[0], generator, k)
                    start = [t[token_ids].detach() for t in tables]
                else:  # k random tokens of each encoder's own vocabulary
                    start = [t[random_index(t.shape[0], generator, k)].detach() for t in tables]
                state["adv"], _ = prefix_attack(pipe, prefixed[state["row"]], start, attack_draw, cfg.attack_step,
                                                cfg.attack_lr, cfg.attack_method == "fast_at",
                                                accumulate=cfg.attack_grad == "accumulate")
            row = state["row"]
            c, a = concepts[row : row + 1], anchors[row : row + 1]
            x_t, t, step = draw_x_t(c, n)
            with torch.no_grad():
                both = Conditioning.cat([a, c]).repeat(n)  # n rows of a, then n of c
                e_0, e_p = predict(pipe, torch.cat([x_t, x_t]), t, both, denoiser=frozen).chunk(2)
            if i >= cfg.warmup_iter:
                seen = prefixed_condition(pipe, prefixed[row], state["adv"])
            else:
                seen = encode(pipe, [prompts[row]], grad=True)
            e_n = predict(pipe, x_t, t, seen)
            total = F.mse_loss(e_n.float(), esd_target(e_0, e_p, cfg.negative_guidance).float())
            if retained is not None and cfg.retain_loss_w > 0:
                pick = torch.randperm(len(retain), generator=generator)[: cfg.retain_batch]
                r = retained[pick]
                x_r = sample_to(pipe, r, empty, step, cfg.ddim_steps, cfg.start_guidance, generator,
                                initial_latents(pipe, len(pick), generator))
                with torch.no_grad():
                    target = predict(pipe, x_r, t, r, denoiser=frozen)
                r_n = encode(pipe, [retain[j] for j in pick.tolist()], grad=True)
                total = total + cfg.retain_loss_w * F.mse_loss(predict(pipe, x_r, t, r_n).float(), target.float())
            return total

        train_steps(loss, list(params.values()), cfg.iterations, lr=cfg.lr, name=self.name, progress=progress,
                    state={"attack": state})  # the drawn concept row and the latest adversarial embeddings
