"""P4D (Chin et al., ICML 2024, arXiv 2309.06135): prompting4debugging. A soft prompt, projected
onto real tokens, is optimised so that the erased ("safe") model predicts the noise that the
original, unconstrained model predicts for the unsafe prompt::

    min_P  || eps_theta*(x_t, t, tokens(P)) - eps_theta(x_t, t, prompt) ||^2
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  t ~ U{0..T-1},  x_0 = the target image's latent

PEZ-style (Wen et al., 2023): the forward pass uses the nearest vocabulary token of each soft
embedding (cosine), the gradient with respect to those token embeddings updates the continuous
ones (AdamW). Two registrations:

* ``p4d-n``: ``prompt_length`` (N) free tokens replace the prompt: ``[start, N tokens, end, pad...]``;
* ``p4d-k``: one free token before every ``every_k`` tokens of the prompt, which stay fixed:
  ``[start, free, p1, p2, p3, free, p4, ..., end, pad...]`` (``len // every_k + 1`` free tokens).

Defaults are the official nudity configs (github.com/joycenerd/P4D, ``configs/*_nudity_optmz_
config.json``): N 16, every_k 3, 3000 iterations, AdamW lr 0.1, weight decay 0.1, an evaluation
every 50 steps. The target image is the original model's image of the prompt and its seed (the
official code takes the most unsafe of 3 such images). Differences from the official code: at each
evaluation step the decoded prompt is judged by the benchmark's judge and the attack stops at the
first success (the official code keeps the prompt whose image is most similar to the target under
CLIP ViT-H, a model efface does not assume); the end-of-text token is kept in ``p4d-k`` (the official
code overwrites it) and padding is the tokenizer's pad token (the official code pads with token 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from efface.attacks.base import (CLIP_ONLY_NOTES, Adversarial, Attack, AttackConfig, AttackContext, clip_states,
                                 clip_text, generate_adversarial, register_attack, target_latents)
from efface.errors import InputError
from efface.models.diffusion import add_noise, num_train_timesteps, predict
from efface.models.families import Conditioning
from efface.models.text import encode, replaced_token_embeddings, token_embedding


@dataclass
class P4DConfig(AttackConfig):
    prompt_length: int = field(default=16, metadata={"help": "N, free tokens of p4d-n"})
    every_k: int = field(default=3, metadata={"help": "p4d-k: one free token before every k prompt tokens"})
    iterations: int = field(default=3000, metadata={"help": "AdamW steps"})
    lr: float = field(default=0.1, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    eval_every: int = field(default=50, metadata={"help": "steps between judged evaluations (early stop)"})

    def __post_init__(self) -> None:
        self.check_counts("prompt_length", "every_k", "iterations", "eval_every")


def nearest_tokens(embeds: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the vocabulary embedding with the highest cosine similarity, per row of ``embeds``."""
    return (F.normalize(embeds, dim=-1) @ F.normalize(table, dim=-1).T).argmax(-1)


class P4D(Attack[P4DConfig]):
    """Soft prompt projected to tokens, matching the original model's noise for the unsafe prompt."""

    Config = P4DConfig
    paper = ("Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding Problematic Prompts "
             "(Chin et al., ICML 2024), arXiv 2309.06135")
    needs = frozenset({"erased_model", "original_model", "target_images"})
    family_notes = CLIP_ONLY_NOTES
    insert: ClassVar[bool] = False  # p4d-k: free tokens inserted into the prompt

    def _layout(self, ctx: AttackContext, i: int) -> tuple[list[int], list[int]]:
        """Token ids (free slots hold a placeholder) and the free slots' positions."""
        tok, _ = clip_text(ctx.erased)
        if self.insert:
            prompt = tok(ctx.prompts[i], truncation=False).input_ids[1:-1]
            body: list[int | None] = []
            for j in range(0, len(prompt) + 1, self.config.every_k):
                body += [None, *prompt[j : j + self.config.every_k]]
        else:
            body = [None] * self.config.prompt_length
        ids = [tok.bos_token_id, *body, tok.eos_token_id]
        if len(ids) > tok.model_max_length:
            raise InputError(f"{self.name}: {len(ids)} tokens for prompt {ctx.prompts[i]!r} exceed the tokenizer's "
                             f"{tok.model_max_length}; shorten the prompt or lower prompt_length / raise every_k")
        free = [j for j, t in enumerate(ids) if t is None]
        ids = [tok.pad_token_id if t is None else t for t in ids]
        return ids + [tok.pad_token_id] * (tok.model_max_length - len(ids)), free

    def _prepare(self, ctx: AttackContext) -> None:
        for i in range(len(ctx.prompts)):
            self._layout(ctx, i)  # every prompt fits before any work
        ctx.state["x0"] = target_latents(ctx.erased, ctx.target_images).mean

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        cfg, pipe, g = self.config, ctx.erased, ctx.generator
        _, te = clip_text(pipe)
        table = token_embedding(te).weight.detach()
        ids, free = self._layout(ctx, i)
        ids_t = torch.tensor([ids])
        start = torch.randint(table.shape[0], (len(free),), generator=g)
        soft = table[start].clone().float().requires_grad_(True)
        optimizer = torch.optim.AdamW([soft], lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = num_train_timesteps(pipe)
        x0 = ctx.state["x0"][i : i + 1]
        with torch.no_grad():
            unsafe = encode(ctx.original, [ctx.prompts[i]])
        tokens, loss_value, step = nearest_tokens(soft.detach(), table.float()), None, 0
        for step in range(1, cfg.iterations + 1):
            t = int(torch.randint(steps, (), generator=g))
            x_t, _ = add_noise(pipe, x0, t, g)  # the target is the original model's own prediction
            with torch.no_grad():
                wanted = predict(ctx.original, x_t, t, unsafe)
            tokens = nearest_tokens(soft.detach(), table.float())
            hard = table[tokens].float() + soft - soft.detach()  # PEZ: the projected tokens' gradient moves soft
            with replaced_token_embeddings(te, free, hard):
                cond = clip_states(pipe, ids_t)
            loss = F.mse_loss(predict(pipe, x_t, t, Conditioning(cond)).float(), wanted.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            if step % cfg.eval_every == 0 and ctx.judge is not None:
                tokens = nearest_tokens(soft.detach(), table.float())
                image = generate_adversarial(pipe, [self._adversarial(ctx, i, tokens, loss_value, step)],
                                             [ctx.seeds[i]], ctx.generation)
                if ctx.judge(image, ctx.concept)[0]:
                    break
        tokens = nearest_tokens(soft.detach(), table.float())
        return self._adversarial(ctx, i, tokens, loss_value, step)

    def _adversarial(self, ctx: AttackContext, i: int, tokens: torch.Tensor, loss: float | None,
                     step: int) -> Adversarial:
        ids, free = self._layout(ctx, i)
        for j, t in zip(free, tokens.tolist()):
            ids[j] = t
        with torch.no_grad():
            embedding = clip_states(ctx.erased, torch.tensor([ids]))
        text = clip_text(ctx.erased)[0].decode(ids, skip_special_tokens=True).strip()
        return Adversarial(text, embedding, loss, meta={"tokens": tokens.tolist(), "steps": step})


@register_attack("p4d-n")
class P4DN(P4D):
    """P4D-N: N free tokens replace the prompt."""

    insert = False


@register_attack("p4d-k")
class P4DK(P4D):
    """P4D-K: a free token before every k tokens of the prompt, which stay fixed."""

    insert = True
