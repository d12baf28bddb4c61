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

Flux (not in the paper, whose code is SD 1.x only): the prompt reaches the transformer through two
encoders, T5 (the token sequence) and CLIP (the pooled embedding), so ``v`` is one vector per
encoder, ``v = (v_CLIP, v_T5)``, both at the concept's place: the prompt is written with a
placeholder word that each tokenizer reads as one token (:func:`~efface.models.slots.word_slot`),
the two rows are put into that slot of each encoder and the conditioning is the pipeline's own
encoding of it (:func:`~efface.models.slots.condition_at`; CLIP has a start token, T5 none).
Both rows start from the first token of the concept's last word in their own tokenizer and are
optimised together (one AdamW). The surrogate's hardened "cross-attention" is what reads the text
in a joint-attention transformer, the keys and values the text is projected to (the ``xattn_kv``
set: double blocks' ``add_k_proj`` / ``add_v_proj``, single blocks' shared ``to_k`` / ``to_v``;
SD: every ``attn2`` parameter, ``xattn``, as the official code). The adversarial embedding is the
whole conditioning (T5 sequence and CLIP pooled). The learned rows are saved under ``<pund>``
(CLIP) and ``<pund>/text_encoder_2`` (T5), one textual-inversion row each; plain diffusers loads
them as for SDXL's two encoders::

    rows = safetensors.torch.load_file("learned_embeds.safetensors")
    pipe.load_textual_inversion(rows["<pund>"], token="<pund>")
    pipe.load_textual_inversion(rows["<pund>/text_encoder_2"], token="<pund>",
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)

after which the adversarial prompt (``... <pund> ...``) encodes to the attack's conditioning.

``meta``: the objective, the original model's denoising error of the prompt's target image with
``v`` in the concept's place, at one fixed (noise, timestep) draw per band (seeded by the prompt's
seed), for the start ``v`` (``objective_start``) and the final one (``objective``).
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
from efface.models.slots import condition_at, slot_start, text_encoders, tokenizers, word_slot
from efface.models.text import encode, replaced_token_embeddings, token_embedding


PLACEHOLDER = "<pund>"
# the surrogate's parameters hardened against v: what reads the text (SD: every cross-attention
# parameter, as the official code; Flux: the keys / values text is projected to)
HARDENED = {"sd": "xattn", "flux": "xattn_kv"}


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
    families = frozenset(HARDENED)
    family_notes = {**{k: v for k, v in CLIP_ONLY_NOTES.items() if k != "flux"},
                    "flux": "one learned row per text encoder (CLIP for the pooled embedding, T5 for the sequence) "
                            "at the concept's place; the surrogate's text keys / values (xattn_kv) are hardened"}
    target_seed_offset = TRAIN_SEED_OFFSET  # its search images are never the judged ones (official: other images)

    @staticmethod
    def _layout(pipe, prompt: str, concept: str):
        """Where ``v`` goes in ``prompt``: SD, the CLIP ids with a placeholder at the concept's
        position and that position; other families, a text with a placeholder word there and its
        position in every tokenizer (:func:`~efface.models.slots.word_slot`)."""
        before, after = split_at(prompt, concept)
        if family_of(pipe).name == "sd":
            return placeholder_ids(clip_text(pipe)[0], before, after)
        text, positions = word_slot(pipe, before, after)
        family_of(pipe).check_fits(pipe, text, "a prompt with the learned token")
        return text, positions

    @staticmethod
    def _cond(pipe, layout, vectors: list[torch.Tensor]) -> Conditioning:
        """``pipe``'s conditioning of the prompt of ``layout`` with ``vectors`` (one per text
        encoder) as the token(s) at the concept's place; differentiable in ``vectors``."""
        if family_of(pipe).name == "sd":
            ids, pos = layout
            with replaced_token_embeddings(clip_text(pipe)[1], [pos], vectors[0].unsqueeze(0)):
                return Conditioning(clip_states(pipe, torch.tensor([ids])))
        return condition_at(pipe, *layout, [v.unsqueeze(0) for v in vectors])

    def _prepare(self, ctx: AttackContext) -> None:
        cfg, g, original = self.config, ctx.generator, ctx.original
        family = family_of(original)
        layouts = [self._layout(original, p, ctx.concept) for p in ctx.prompts]  # every prompt fits
        if family.name == "sd":
            tok = clip_text(original)[0]
            context = [tok.decode(ids[1:pos], skip_special_tokens=True) for ids, pos in layouts]
        else:
            context = [" ".join(split_at(p, ctx.concept)[0].split()) for p in ctx.prompts]
        tables = [token_embedding(te).weight.detach() for te in text_encoders(original)]
        word = ctx.concept.split()[-1]
        first = [tok(word, truncation=False).input_ids[slot_start(tok)] for tok in tokenizers(original)]
        vectors = [table[i].clone().float().requires_grad_(True) for table, i in zip(tables, first)]
        optimizer = torch.optim.AdamW(vectors, lr=cfg.lr, weight_decay=cfg.weight_decay)
        surrogate = frozen_copy(family.denoiser(original))
        prefix = f"{family.denoiser_name}."  # the hardened parameters, named as in the surrogate
        names = {k.removeprefix(prefix) for k in select(original, HARDENED[family.name]) if k.startswith(prefix)}
        hardened = [p for n, p in surrogate.named_parameters() if n in names]
        surrogate_opt = torch.optim.Adam(hardened, lr=cfg.surrogate_lr)
        latents = target_latents(original, ctx.target_images).mean
        ctx.state["objective_start"] = self._objectives(ctx, layouts, latents, [v.detach() for v in vectors])
        width = num_train_timesteps(original) // cfg.bands
        loss_value = None
        for epoch in range(1, cfg.epochs + 1):
            i = int(torch.randint(len(layouts), (), generator=g))
            x0 = latents[i : i + 1]
            for band in reversed(range(cfg.bands)):
                for _ in range(cfg.steps_per_band):
                    t = band * width + int(torch.randint(width, (), generator=g))
                    x_t, target = add_noise(original, x0, t, g)
                    pred = predict(original, x_t, t, self._cond(original, layouts[i], vectors), denoiser=surrogate)
                    loss = F.mse_loss(pred.float(), target.float())
                    optimizer.zero_grad()
                    (loss / loss.detach()).backward()
                    optimizer.step()
                    loss_value = float(loss.detach())
            if epoch % cfg.surrogate_every == 0:
                self._harden(ctx, surrogate, hardened, surrogate_opt, layouts[i], context[i],
                             [v.detach() for v in vectors], x0)
        found = [v.detach() for v in vectors]
        ctx.state |= {"vector": found[0], "vectors": found, "loss": loss_value,
                      "objective": self._objectives(ctx, layouts, latents, found)}
        for k, (name, v, table) in enumerate(zip(family.text_encoders, found, tables)):  # textual-inversion rows, 1 x D
            ctx.learned[PLACEHOLDER if k == 0 else f"{PLACEHOLDER}/{name}"] = v.to(table.dtype).unsqueeze(0)

    @torch.no_grad()
    def _objectives(self, ctx: AttackContext, layouts, latents: torch.Tensor,
                    vectors: list[torch.Tensor]) -> list[float]:
        """Per prompt, the original model's denoising error of its target image with ``vectors`` in
        the concept's place, at one fixed (t, noise) per band (the band's middle; noise seeded by
        the prompt's seed)."""
        original, bands = ctx.original, self.config.bands
        width = num_train_timesteps(original) // bands
        out = []
        for i, layout in enumerate(layouts):
            g = torch.Generator("cpu").manual_seed(ctx.seeds[i])
            cond, total = self._cond(original, layout, vectors), 0.0
            for band in range(bands):
                t = band * width + width // 2
                x_t, target = add_noise(original, latents[i : i + 1], t, g)
                total += float(F.mse_loss(predict(original, x_t, t, cond).float(), target.float()))
            out.append(total / bands)
        return out

    def _harden(self, ctx: AttackContext, surrogate, hardened, optimizer, layout, context: str, vectors, x0) -> None:
        """Make the surrogate unlearn ``v``: its output with ``v`` pulled to its output without the concept."""
        cfg, g, original = self.config, ctx.generator, ctx.original
        for p in hardened:
            p.requires_grad_(True)
        with torch.no_grad():
            adv = self._cond(original, layout, vectors)
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
        layout = self._layout(pipe, ctx.prompts[i], ctx.concept)
        with torch.no_grad():
            cond = self._cond(pipe, layout, ctx.state["vectors"])
        sd = family_of(pipe).name == "sd"
        meta = {"token_position": layout[1] if sd else layout[1][0][0],
                "objective_start": ctx.state["objective_start"][i], "objective": ctx.state["objective"][i]}
        return Adversarial(" ".join(f"{before} {PLACEHOLDER} {after}".split()), cond.embeds if sd else cond,
                           ctx.state["loss"], meta=meta)
