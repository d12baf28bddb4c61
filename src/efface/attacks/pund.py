"""PUND (Han et al., arXiv 2404.19382): "Probing Unlearned Diffusion Models: A Transferable
Adversarial Attack Perspective". A black-box attack: one soft token ``v`` (a token-embedding-space
vector) is learned on the *original* model, made to transfer to unlearned models by hardening a
surrogate against it, then used on the erased model.

* Embedding search, on a surrogate copy of the original UNet: the denoising error of images of the
  concept under the prompt with ``v`` in the concept's place, normalised by its own value (a unit
  gradient scale)::

      min_v  L(v) / sg(L(v)),   L(v) = || eps - eps_s(x_t, t, [context, v]) ||^2

  (``eps``: the model's own target, the velocity on a v-prediction model.) Each epoch takes one
  image and walks ``bands`` timestep bands from high noise to low (``steps_per_band`` draws in
  each); AdamW.
* Transfer: every ``surrogate_every`` epochs the surrogate's cross-attention is updated for
  ``surrogate_steps`` Adam steps to *erase* the current ``v`` (ESD / CA style: its output with ``v``
  is pulled to its own detached output for the context without the concept), so that the search
  goes on against an ever more unlearned surrogate.

Defaults are the official code's (github.com/hxxdtd/PUND, ``src/attackers/adv_search_.py``): 3000
epochs of 5 bands x 2 steps, AdamW lr 0.1, weight decay 0.1, the surrogate updated every 200
epochs with 5 Adam steps at lr 1e-5, ``v`` initialised from the first token of the concept's last
word. The images are the target images (the original model's images of the attacked prompts; the
official runs use 1000 images of "a photo of <concept>"). Differences: ``v`` is placed at the
concept's own position in each prompt (the official code removes the concept from "a photo of
<concept>" and appends ``v``: the same place for that prompt); the final ``v`` is the last one (the
official repository picks one by hand from its logs); the images are made (when none are given) with
seeds ``seed + 2**31 - 1``, disjoint from the judged ones. ``v`` is saved in diffusers' textual-
inversion format (``learned_embeds.safetensors``, token ``<pund>``), loadable with
``pipe.load_textual_inversion(path)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from efface.attacks.base import (CLIP_ONLY_NOTES, TRAIN_SEED_OFFSET, Adversarial, Attack, AttackConfig, AttackContext,
                                 clip_states, clip_text, register_attack, target_latents)
from efface.attacks.concept_inversion import placeholder_ids, split_at
from efface.models.diffusion import add_noise, frozen_copy, num_train_timesteps, predict
from efface.models.families import Conditioning, family_of
from efface.models.params import select
from efface.models.text import replaced_token_embeddings, token_embedding


PLACEHOLDER = "<pund>"


@dataclass
class PUNDConfig(AttackConfig):
    epochs: int = field(default=3000, metadata={"help": "epochs (one image each)"})
    bands: int = field(default=5, metadata={"help": "timestep bands per epoch, high noise to low"})
    steps_per_band: int = field(default=2, metadata={"help": "steps in each band"})
    lr: float = field(default=0.1, metadata={"help": "AdamW learning rate of v"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of v"})
    surrogate_every: int = field(default=200, metadata={"help": "epochs between surrogate hardening rounds"})
    surrogate_steps: int = field(default=5, metadata={"help": "Adam steps of each hardening round"})
    surrogate_lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of the surrogate's cross-attention"})

    def __post_init__(self) -> None:
        self.check_counts("epochs", "bands", "steps_per_band", "surrogate_every", "surrogate_steps")


@register_attack("pund")
class PUND(Attack[PUNDConfig]):
    """A soft token learned on the original model against a hardened surrogate, transferred to the erased one."""

    Config = PUNDConfig
    paper = ("Probing Unlearned Diffusion Models: A Transferable Adversarial Attack Perspective (Han et al., 2024), "
             "arXiv 2404.19382")
    needs = frozenset({"original_model", "target_images"})
    family_notes = CLIP_ONLY_NOTES
    target_seed_offset = TRAIN_SEED_OFFSET  # its search images are never the judged ones (official: other images)

    def _cond(self, pipe, ids: list[int], pos: int, v: torch.Tensor) -> torch.Tensor:
        """``pipe``'s first text encoder's states of ``ids`` with ``v`` as the token at ``pos``."""
        with replaced_token_embeddings(clip_text(pipe)[1], [pos], v.unsqueeze(0)):
            return clip_states(pipe, torch.tensor([ids]))

    def _prepare(self, ctx: AttackContext) -> None:
        cfg, g, original = self.config, ctx.generator, ctx.original
        tok, te = clip_text(original)
        layouts = [placeholder_ids(tok, *split_at(p, ctx.concept)) for p in ctx.prompts]  # every prompt fits
        context = [tok.decode(ids[1:pos], skip_special_tokens=True) for ids, pos in layouts]
        table = token_embedding(te).weight.detach()
        first = tok(ctx.concept.split()[-1], truncation=False).input_ids[1]
        v = table[first].clone().float().requires_grad_(True)
        optimizer = torch.optim.AdamW([v], lr=cfg.lr, weight_decay=cfg.weight_decay)
        family = family_of(original)
        surrogate = frozen_copy(family.denoiser(original))
        prefix = f"{family.denoiser_name}."  # the cross-attention parameters, named as in the surrogate
        xattn = {k.removeprefix(prefix) for k in select(original, "xattn") if k.startswith(prefix)}
        hardened = [p for n, p in surrogate.named_parameters() if n in xattn]
        surrogate_opt = torch.optim.Adam(hardened, lr=cfg.surrogate_lr)
        latents = target_latents(original, ctx.target_images).mean
        width = num_train_timesteps(original) // cfg.bands
        loss_value = None
        for epoch in range(1, cfg.epochs + 1):
            i = int(torch.randint(len(layouts), (), generator=g))
            ids, pos = layouts[i]
            x0 = latents[i : i + 1]
            for band in reversed(range(cfg.bands)):
                for _ in range(cfg.steps_per_band):
                    t = band * width + int(torch.randint(width, (), generator=g))
                    x_t, target = add_noise(original, x0, t, g)
                    cond = Conditioning(self._cond(original, ids, pos, v))
                    pred = predict(original, x_t, t, cond, denoiser=surrogate)
                    loss = F.mse_loss(pred.float(), target.float())
                    optimizer.zero_grad()
                    (loss / loss.detach()).backward()
                    optimizer.step()
                    loss_value = float(loss.detach())
            if epoch % cfg.surrogate_every == 0:
                self._harden(ctx, surrogate, hardened, surrogate_opt, layouts[i], context[i], v.detach(), x0)
        ctx.state["vector"], ctx.state["loss"] = v.detach(), loss_value
        ctx.learned[PLACEHOLDER] = v.detach().to(table.dtype).unsqueeze(0)  # textual-inversion format: 1 x D

    def _harden(self, ctx: AttackContext, surrogate, hardened, optimizer, layout, context: str, v, x0) -> None:
        """Make the surrogate unlearn ``v``: its output with ``v`` pulled to its output without the concept."""
        from efface.models.text import encode

        cfg, g, original = self.config, ctx.generator, ctx.original
        for p in hardened:
            p.requires_grad_(True)
        with torch.no_grad():
            adv = Conditioning(self._cond(original, *layout, v))
            plain = encode(original, [context])
        for _ in range(cfg.surrogate_steps):
            t = int(torch.randint(num_train_timesteps(original), (), generator=g))
            x_t, _ = add_noise(original, x0, t, g)
            with torch.no_grad():
                wanted = predict(original, x_t, t, plain, denoiser=surrogate)
            loss = F.mse_loss(predict(original, x_t, t, adv, denoiser=surrogate).float(), wanted.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for p in hardened:
            p.requires_grad_(False)

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        pipe = ctx.erased
        before, after = split_at(ctx.prompts[i], ctx.concept)
        ids, pos = placeholder_ids(clip_text(pipe)[0], before, after)
        with torch.no_grad():
            embedding = self._cond(pipe, ids, pos, ctx.state["vector"])
        return Adversarial(" ".join(f"{before} {PLACEHOLDER} {after}".split()), embedding, ctx.state["loss"],
                           meta={"token_position": pos})
