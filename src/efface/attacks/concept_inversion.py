"""Concept Inversion (Pham et al., ICLR 2024, arXiv 2308.01508): "Circumventing Concept Erasure
Methods for Text-to-Image Generative Models". Textual inversion through the *erased* model: one new
token embedding ``v`` is learned from images of the concept so that the erased model denoises them::

    min_v  E_{x_0, t, eps} || eps - eps_theta*(x_t, t, template(<v>)) ||^2,   t ~ U{0..T-1}

(with a v-prediction model the target is the velocity: :func:`~efface.models.diffusion.add_noise`'s).

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

from efface.attacks.base import (CLIP_ONLY_NOTES, TRAIN_SEED_OFFSET, Adversarial, Attack, AttackConfig, AttackContext,
                                 clip_states, clip_text, register_attack, target_latents)
from efface.errors import InputError
from efface.models.diffusion import add_noise, num_train_timesteps, predict
from efface.models.families import Conditioning
from efface.models.text import replaced_token_embeddings, token_embedding

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
    family_notes = CLIP_ONLY_NOTES
    target_seed_offset = TRAIN_SEED_OFFSET  # trained on images it is never judged on

    def _prepare(self, ctx: AttackContext) -> None:
        cfg, pipe, g = self.config, ctx.erased, ctx.generator
        tok, te = clip_text(pipe)
        captions = [placeholder_ids(tok, *t.split("{}", 1)) for t in cfg.templates]
        for p in ctx.prompts:
            placeholder_ids(tok, *split_at(p, ctx.concept))  # every prompt fits before any work
        table = token_embedding(te).weight.detach()
        init_ids = tok(cfg.initializer, truncation=False).input_ids[1:-1]
        vector = table[init_ids].float().mean(0).clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([vector], lr=cfg.lr, weight_decay=cfg.weight_decay)
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
            conds = []
            for c in caption.tolist():
                ids, pos = captions[c]
                with replaced_token_embeddings(te, [pos], vector.unsqueeze(0)):
                    conds.append(clip_states(pipe, torch.tensor([ids])))  # (clip_states moves ids to the encoder)
            pred = predict(pipe, x_t, t, Conditioning(torch.cat(conds)))
            loss = F.mse_loss(pred.float(), target.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
        ctx.state["vector"], ctx.state["loss"] = vector.detach(), loss_value
        ctx.learned[PLACEHOLDER] = vector.detach().to(table.dtype).unsqueeze(0)  # textual-inversion format: 1 x D

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        pipe = ctx.erased
        tok, te = clip_text(pipe)
        before, after = split_at(ctx.prompts[i], ctx.concept)
        ids, pos = placeholder_ids(tok, before, after)
        with torch.no_grad(), replaced_token_embeddings(te, [pos], ctx.state["vector"].unsqueeze(0)):
            embedding = clip_states(pipe, torch.tensor([ids]))
        text = " ".join(f"{before} {PLACEHOLDER} {after}".split())
        return Adversarial(text, embedding, ctx.state["loss"], meta={"token_position": pos})
