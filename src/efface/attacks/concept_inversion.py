"""Concept Inversion (Pham et al., ICLR 2024, arXiv 2308.01508): "Circumventing Concept Erasure
Methods for Text-to-Image Generative Models". Textual inversion through the *erased* model: one new
token embedding ``v`` is learned from images of the concept so that the erased model denoises them::

    min_v  E_{x_0, t, eps} || eps - eps_theta*(x_t, t, template(<v>)) ||^2,   t ~ U{0..T-1}

(with a v-prediction model the target is the velocity: :func:`~efface.models.diffusion.add_noise`'s).

On a pipeline that reads several text encoders (SDXL: two CLIPs; SD3: two CLIPs and T5; Flux:
CLIP for the pooled embedding and T5 for the token sequence; not in the paper, whose code is SD 1.x
only) the new token is one row per encoder, all trained together: the caption holds a placeholder
word that every tokenizer reads as one token, and each encoder's embedding at that word is its
row (:func:`efface.models.slots.word_slot`, :func:`~efface.models.slots.condition_at`); the
prompt is encoded by the pipeline's own ``encode_prompt``, so the pooled embedding (CLIP's state
at its end token) carries the learned token too. The first encoder's row is saved under
``<concept-inversion>``, the others' under ``<concept-inversion>/<encoder>`` (``text_encoder_2``,
...) in the same file: diffusers loads textual inversions into CLIP encoders only (SDXL: give it
that row with ``text_encoder=pipe.text_encoder_2``); a T5 row has no diffusers loader. The
adversarial prompt is then the pipeline's conditioning, sequence and pooled, saved side by side.

Then every prompt is generated with the concept's word replaced by ``<v>`` (``<v>`` prepended when
the prompt does not name it). Only ``v`` is trained; the models stay frozen. The learned token is
saved in diffusers' textual-inversion format (``learned_embeds.safetensors``, token
``<concept-inversion>``): ``pipe.load_textual_inversion(path)`` makes it usable in any prompt and any
pipeline with that text encoder. Target images made by the attack (none given) come from the original model
with seeds ``seed + 2**31 - 1``, never the judged images' seeds: the token is not fitted to the very
image and noise it is then judged on.

Defaults are the official runs (github.com/NYU-DICE-Lab/circumventing-concept-erasure,
``*/train.sh``, the diffusers textual-inversion script): 5000 steps, batch 4 x 4 accumulated, AdamW
at 5e-3 scaled by the batch (``--scale_lr``: 0.08), weight decay 1e-2, constant schedule,
initialised from "art". The images are the target images (one per attacked prompt: the original
model's image of it, made with a disjoint seed; the official runs use 25 images of the concept
prompt). Differences: no gradient accumulation (one batch of ``batch_size`` per step, lr given
directly); a multi-token initializer starts from the mean of its token embeddings (diffusers
requires a single token); images are not flipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from efface.attacks.base import (ALL_FAMILIES, TRAIN_SEED_OFFSET, Adversarial, Attack, AttackConfig, AttackContext,
                                 register_attack, target_latents)
from efface.errors import InputError
from efface.models.diffusion import add_noise, num_train_timesteps, predict
from efface.models.families import Conditioning, family_of
from efface.models.slots import condition_at, text_encoders, tokenizers, word_slot
from efface.models.text import token_embedding

STYLE_TEMPLATES = ("a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
                   "a photo of a {}", "a rendition of the {}", "an image of {}")
PLACEHOLDER = "<concept-inversion>"


@dataclass
class ConceptInversionConfig(AttackConfig):
    steps: int = field(default=5000, metadata={"help": "optimisation steps"})
    batch_size: int = field(default=16, metadata={"help": "images per step (official: 4 x 4 accumulated)"})
    lr: float = field(default=0.08, metadata={"help": "AdamW learning rate (official 5e-3 x 16, --scale_lr)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    initializer: str = field(default="art", metadata={"help": "word the new token starts from"})
    templates: tuple[str, ...] = field(default=STYLE_TEMPLATES, metadata={"help": "training captions, '{}' "
                                                                                  "is the new token"})

    def __post_init__(self) -> None:
        self.check_counts("steps", "batch_size")
        if not self.initializer.strip():
            raise InputError("initializer must be a word, e.g. 'art'")


def placeholder_ids(tokenizer, before: str, after: str) -> tuple[list[int], int]:
    """Token ids of ``before <token> after``, the learned token as one placeholder token, padded to
    the tokenizer's length, and the placeholder's position."""
    head = tokenizer(before.strip(), truncation=False).input_ids[:-1]  # start + words before
    tail = tokenizer(after.strip(), truncation=False).input_ids[1:]  # words after + end
    ids = [*head, tokenizer.pad_token_id, *tail]
    if len(ids) > tokenizer.model_max_length:
        raise InputError(f"{before} <token> {after!r} takes {len(ids)} tokens, more than the tokenizer's "
                         f"{tokenizer.model_max_length}; shorten it")
    return ids + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids)), len(head)


def split_at(text: str, concept: str) -> tuple[str, str]:
    """``text`` around the first whole-word ``concept`` (("", text) if it is not there: prepend)."""
    match = re.search(rf"\b{re.escape(concept)}\b", text, re.IGNORECASE)
    return (text[: match.start()], text[match.end():]) if match else ("", text)


@register_attack("concept-inversion")
class ConceptInversion(Attack[ConceptInversionConfig]):
    """Textual inversion through the erased model: one learned token stands for the concept."""

    Config = ConceptInversionConfig
    paper = ("Circumventing Concept Erasure Methods for Text-to-Image Generative Models (Pham et al., ICLR 2024), "
             "arXiv 2308.01508")
    needs = frozenset({"erased_model", "target_images"})
    families = ALL_FAMILIES
    target_seed_offset = TRAIN_SEED_OFFSET  # trained on images it is never judged on

    def _prepare(self, ctx: AttackContext) -> None:
        cfg, pipe, g = self.config, ctx.erased, ctx.generator
        family = family_of(pipe)
        captions = [word_slot(pipe, *t.split("{}", 1)) for t in cfg.templates]
        for text in [c for c, _ in captions] + [word_slot(pipe, *split_at(p, ctx.concept))[0] for p in ctx.prompts]:
            family.check_fits(pipe, text, "a prompt with the learned token")  # every prompt fits before any work
        tables = [token_embedding(te).weight.detach() for te in text_encoders(pipe)]
        init = [tok(cfg.initializer, add_special_tokens=False, truncation=False).input_ids for tok in tokenizers(pipe)]
        if not all(init):
            raise InputError(f"the initializer {cfg.initializer!r} gives no token in one of the tokenizers; name a word")
        vectors = [table[ids].float().mean(0).clone().requires_grad_(True) for table, ids in zip(tables, init)]
        optimizer = torch.optim.AdamW(vectors, lr=cfg.lr, weight_decay=cfg.weight_decay)
        dist = target_latents(pipe, ctx.target_images)  # on the denoiser's device
        mean, std = dist.mean, dist.stddev
        steps = num_train_timesteps(pipe)
        loss_value = None
        for _ in range(cfg.steps):
            pick = torch.randint(len(ctx.target_images), (cfg.batch_size,), generator=g).to(mean.device)
            caption = torch.randint(len(captions), (cfg.batch_size,), generator=g)
            x0 = mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=g).to(mean.device, mean.dtype)
            t = torch.randint(steps, (cfg.batch_size,), generator=g).to(mean.device)
            x_t, target = add_noise(pipe, x0, t, g)
            drawn = sorted(set(caption.tolist()))  # each drawn caption encoded once
            encoded = Conditioning.cat([condition_at(pipe, *captions[c], [v.unsqueeze(0) for v in vectors])
                                        for c in drawn])
            cond = encoded[torch.tensor([drawn.index(c) for c in caption.tolist()])]
            loss = F.mse_loss(predict(pipe, x_t, t, cond).float(), target.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
        ctx.state["vectors"], ctx.state["loss"] = [v.detach() for v in vectors], loss_value
        for k, (name, v, table) in enumerate(zip(family.text_encoders, vectors, tables)):  # textual-inversion rows
            ctx.learned[PLACEHOLDER if k == 0 else f"{PLACEHOLDER}/{name}"] = v.detach().to(table.dtype).unsqueeze(0)

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        pipe = ctx.erased
        before, after = split_at(ctx.prompts[i], ctx.concept)
        text, positions = word_slot(pipe, before, after)
        with torch.no_grad():
            cond = condition_at(pipe, text, positions, [v.unsqueeze(0) for v in ctx.state["vectors"]])
        text = " ".join(f"{before} {PLACEHOLDER} {after}".split())
        return Adversarial(text, cond.embeds if cond.pooled is None else cond, ctx.state["loss"],
                           meta={"token_position": positions[0][0]})
