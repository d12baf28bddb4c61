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

Selection (``selection="similarity"``, the official ``optimize_{n,k}.py``): every ``eval_every``
steps (step 0 included) the current projected prompt is decoded, its image generated on the
erased model from that text with the prompt's seed, and the prompt whose image is most similar
(cosine of the image features, ``features=``; the official code: CLIP ViT-H/14) to the target
image is kept after all ``iterations``. ``selection="judge"``: the benchmark's judge looks at the
same images and the attack stops at the first success (the judge then takes part in the search).

Text replay (default, as the official code judges the decoded text): the projection is onto the
tokens that are whole words on their own (:func:`~efface.attacks.text.whole_word_tokens`) and,
in ``p4d-k``, a free token that would fall inside a word of the prompt moves to the next word's
start, so the decoded prompt re-tokenises to exactly the ids optimised. ``replay="embedding"``:
the id-level variant (every token, the official positions, images from the ids' embedding;
reported as ``p4d-n/embedding``).

Other families (SDXL, SD3, Flux; the official code is SD 1.x only): the free tokens are words that
are one token in every tokenizer (:func:`~efface.attacks.text.shared_whole_words`), each slot has
one soft embedding per text encoder (the rows of the same start word), all optimised together, and
the projection picks the word whose rows are nearest in all encoders together (cosine summed over
them: :func:`nearest_words`; one encoder: the official nearest token). The conditioning is the
pipeline's own encoding of the layout's text with the slots' embeddings replaced in every encoder
(:mod:`efface.models.slots`, found by their characters); ``replay="embedding"`` is SD 1.x / 2.x only.

Defaults are the official nudity configs (github.com/joycenerd/P4D, ``configs/*_nudity_optmz_
config.json``): N 16, every_k 3, 3000 iterations, AdamW lr 0.1, weight decay 0.1, an evaluation
every 50 steps. The target image is the original model's image of the prompt and its seed (the
official code takes the most unsafe of 3 such images). Differences from the official code: the
image features are handed in (toy-sd: the toy classifier's); the end-of-text token is kept in
``p4d-k`` (the official code overwrites it) and padding is the tokenizer's pad token (the official
code pads with token 0). ``meta``: the objective (the noise-matching error at fixed noises and
timesteps) of the start tokens and of the last projection, and the kept prompt's similarity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from efface.attacks.base import (ALL_FAMILIES, Adversarial, Attack, AttackConfig, AttackContext, clip_states, clip_text,
                                 generate_adversarial, register_attack, target_latents)
from efface.attacks.text import check_embedding_replay, check_replay, decode_text, replayed_text, search_vocabulary
from efface.errors import InputError
from efface.models.diffusion import add_noise, num_train_timesteps, predict
from efface.models.families import Conditioning
from efface.models.slots import condition_at, slot_positions, token_tables
from efface.models.text import encode, replaced_token_embeddings

SELECTIONS = ("similarity", "judge")


@dataclass
class P4DConfig(AttackConfig):
    prompt_length: int = field(default=16, metadata={"help": "N, free tokens of p4d-n"})
    every_k: int = field(default=3, metadata={"help": "p4d-k: one free token before every k prompt tokens"})
    iterations: int = field(default=3000, metadata={"help": "AdamW steps"})
    lr: float = field(default=0.1, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    eval_every: int = field(default=50, metadata={"help": "steps between evaluations (image of the decoded prompt)"})
    selection: str = field(default="similarity", metadata={
        "help": "similarity: run every step, keep the prompt whose image is closest to the target (official); "
                "judge: stop at the judge's first success"})
    replay: str = field(default="text", metadata={
        "help": "text: judge the decoded, re-tokenised prompt (official); embedding: the found ids' embedding"})

    def __post_init__(self) -> None:
        self.check_counts("prompt_length", "every_k", "iterations", "eval_every")
        check_replay(self.replay)
        if self.selection not in SELECTIONS:
            raise InputError(f"selection must be 'similarity' (the official: keep the prompt whose image is most "
                             f"similar to the target) or 'judge' (stop at the judge's first success), "
                             f"not {self.selection!r}")


def nearest_tokens(embeds: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the vocabulary embedding with the highest cosine similarity, per row of ``embeds``."""
    return (F.normalize(embeds, dim=-1) @ F.normalize(table, dim=-1).T).argmax(-1)


def nearest_words(embeds: list[torch.Tensor], tables: list[torch.Tensor]) -> torch.Tensor:
    """Per slot, the word (row of every encoder's ``tables``) with the highest cosine similarity
    summed over the encoders (one encoder: :func:`nearest_tokens`)."""
    scores = sum(F.normalize(e, dim=-1) @ F.normalize(t, dim=-1).T for e, t in zip(embeds, tables))
    return scores.argmax(-1)


class P4D(Attack[P4DConfig]):
    """Soft prompt projected to tokens, matching the original model's noise for the unsafe prompt."""

    Config = P4DConfig
    paper = ("Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding Problematic Prompts "
             "(Chin et al., ICML 2024), arXiv 2309.06135")
    needs = frozenset({"erased_model", "original_model", "target_images"})
    families = ALL_FAMILIES
    family_notes = {f: "every text encoder at once: the free tokens are words that are one token in each tokenizer, "
                       "one soft embedding per encoder and slot, projected together onto the word nearest in all "
                       "of them (summed cosine); replay='text' only" for f in ("sdxl", "sd3", "flux")}
    insert: ClassVar[bool] = False  # p4d-k: free tokens inserted into the prompt

    def uses_features(self) -> bool:
        return self.config.selection == "similarity"

    def _slots(self, tok, prompt: list[int]) -> list[int]:
        """Where p4d-k's free tokens go: before prompt token ``j`` for ``j = 0, k, 2k, ...``; with text
        replay a slot inside a word moves to the start of the next word (the end if none)."""
        slots = list(range(0, len(prompt) + 1, self.config.every_k))
        if self.config.replay != "text":
            return slots
        pieces = tok.convert_ids_to_tokens(prompt)
        starts = [0] + [m + 1 for m, piece in enumerate(pieces) if piece.endswith("</w>")]
        return [min((s for s in starts if s >= j), default=len(prompt)) for j in slots]

    def _layout(self, ctx: AttackContext, i: int) -> tuple[list[int], list[int]]:
        """Token ids (free slots hold a placeholder) and the free slots' positions."""
        tok, _ = clip_text(ctx.erased)
        if self.insert:
            prompt = tok(ctx.prompts[i], truncation=False).input_ids[1:-1]
            body: list[int | None] = []
            slots = self._slots(tok, prompt)
            for j, token in enumerate([*prompt, None]):
                body += [None] * slots.count(j) + ([token] if token is not None else [])
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
        check_embedding_replay(self.name, ctx.erased, self.config.replay)
        for i in range(len(ctx.prompts)):
            self._layout(ctx, i)  # every prompt fits before any work
        ctx.state["x0"] = target_latents(ctx.erased, ctx.target_images).mean
        ctx.state["allowed"] = search_vocabulary(ctx.erased, self.config.replay)
        if self.config.selection == "similarity":
            with torch.no_grad():
                ctx.state["target_features"] = F.normalize(ctx.features(ctx.target_images).float(), dim=-1)

    def _cond(self, ctx: AttackContext, i: int, adv: Adversarial) -> Conditioning:
        """The erased model's conditioning of ``adv`` as it is judged (text: re-tokenised)."""
        if adv.embedding is not None:
            return Conditioning(adv.embedding)
        return encode(ctx.erased, [adv.prompt])

    @torch.no_grad()
    def objective(self, ctx: AttackContext, i: int, tokens: torch.Tensor, unsafe) -> float:
        """The noise-matching error of the prompt of ``tokens`` as judged, at 4 fixed (t, noise) pairs."""
        cond = self._cond(ctx, i, self._adversarial(ctx, i, tokens, None, 0))
        g, x0, steps = torch.Generator("cpu").manual_seed(ctx.seeds[i]), ctx.state["x0"][i : i + 1], 0
        total = 0.0
        for t in (num_train_timesteps(ctx.erased) * q // 8 for q in (1, 3, 5, 7)):
            x_t, _ = add_noise(ctx.erased, x0, t, g)
            wanted = predict(ctx.original, x_t, t, unsafe)
            total += float(F.mse_loss(predict(ctx.erased, x_t, t, cond).float(), wanted.float()))
            steps += 1
        return total / steps

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        cfg, pipe, g, allowed = self.config, ctx.erased, ctx.generator, ctx.state["allowed"]
        # the projection's vocabulary in every encoder's table (text: the shared whole words)
        tables = [t.detach()[a.to(t.device)].float() for t, a in zip(token_tables(pipe), allowed)]
        ids, free = self._layout(ctx, i)
        start = torch.randint(tables[0].shape[0], (len(free),), generator=g).to(tables[0].device)
        soft = [t[start].clone().requires_grad_(True) for t in tables]
        optimizer = torch.optim.AdamW(soft, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = num_train_timesteps(pipe)
        x0 = ctx.state["x0"][i : i + 1]
        with torch.no_grad():
            unsafe = encode(ctx.original, [ctx.prompts[i]])
        first = allowed[0][start.cpu()]
        objective_start = self.objective(ctx, i, first, unsafe)
        forward = self._forward(ctx, i, first, ids, free)
        kept, kept_score, loss_value, step = first, float("-inf"), None, 0
        for step in range(cfg.iterations):
            projected = nearest_words([e.detach() for e in soft], tables)
            tokens = allowed[0][projected.cpu()]
            t = int(torch.randint(steps, (), generator=g))
            x_t, _ = add_noise(pipe, x0, t, g)  # the target is the original model's own prediction
            with torch.no_grad():
                wanted = predict(ctx.original, x_t, t, unsafe)
            # PEZ: the projected tokens' gradient moves the soft embeddings
            cond = forward([t[projected] + e - e.detach() for t, e in zip(tables, soft)])
            loss = F.mse_loss(predict(pipe, x_t, t, cond).float(), wanted.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            if step % cfg.eval_every == 0:  # the official evaluation of the tokens this step used
                score = self._evaluate(ctx, i, tokens, loss_value, step)
                if score is not None and score > kept_score:
                    kept, kept_score = tokens, score
                if cfg.selection == "judge" and score == 1.0:
                    break
        last = allowed[0][nearest_words([e.detach() for e in soft], tables).cpu()]
        if cfg.selection == "judge" and kept_score < 1.0:
            kept = last  # no success: the last projection, as before
        adv = self._adversarial(ctx, i, kept, loss_value, step)
        adv.meta |= {"objective_start": objective_start, "objective": self.objective(ctx, i, last, unsafe),
                     "selection": cfg.selection, "score": kept_score if kept_score > float("-inf") else None}
        return adv

    def _forward(self, ctx: AttackContext, i: int, first: torch.Tensor, ids: list[int], free: list[int]):
        """``embeds -> Conditioning`` with the free slots' embeddings replaced: text replay, the text of
        the layout (free slots: the start words, one token in every tokenizer) through the pipeline's
        own encoding, the slots found in every tokenizer; embedding replay (SD), the layout's ids."""
        if self.config.replay == "text":
            text = self._adversarial(ctx, i, first, None, 0).prompt
            tok, _ = clip_text(ctx.erased)
            filled = list(ids)
            for j, t in zip(free, first.tolist()):
                filled[j] = t
            own = tok(text, truncation=False).input_ids
            if own != filled[: len(own)] or any(t != tok.pad_token_id for t in filled[len(own):]):
                raise InputError(f"{self.name}: the layout of {ctx.prompts[i]!r} does not re-tokenise to its own ids; "
                                 "use replay='embedding' (SD 1.x / 2.x)")
            positions = slot_positions(ctx.erased, text, free)
            return lambda embeds: condition_at(ctx.erased, text, positions, embeds)
        _, te = clip_text(ctx.erased)

        def by_ids(embeds: list[torch.Tensor]) -> Conditioning:
            with replaced_token_embeddings(te, free, embeds[0]):
                return Conditioning(clip_states(ctx.erased, torch.tensor([ids])))

        return by_ids

    def _evaluate(self, ctx: AttackContext, i: int, tokens: torch.Tensor, loss: float, step: int) -> float | None:
        """The image of the decoded prompt, scored: its cosine similarity to the target image's
        features (selection "similarity"), or 1.0 / 0.0 as the judge sees the concept (selection "judge")."""
        if self.config.selection == "judge" and ctx.judge is None:
            return None
        adv = self._adversarial(ctx, i, tokens, loss, step)
        image = generate_adversarial(ctx.erased, [adv], [ctx.seeds[i]], ctx.generation)
        if self.config.selection == "judge":
            return 1.0 if ctx.judge(image, ctx.concept)[0] else 0.0
        with torch.no_grad():
            feats = F.normalize(ctx.features(image).float(), dim=-1)
        return float((feats[0] * ctx.state["target_features"][i].to(feats.device)).sum())

    def _adversarial(self, ctx: AttackContext, i: int, tokens: torch.Tensor, loss: float | None,
                     step: int) -> Adversarial:
        tok, _ = clip_text(ctx.erased)
        ids, free = self._layout(ctx, i)
        for j, t in zip(free, tokens.tolist()):
            ids[j] = t
        text = decode_text(tok, ids)
        meta = {"tokens": tokens.tolist(), "steps": step}
        if self.config.replay == "text":
            body = [t for t in ids[1:] if t not in (tok.eos_token_id, tok.pad_token_id)]
            return replayed_text(tok, text, body, loss, meta)
        with torch.no_grad():
            embedding = clip_states(ctx.erased, torch.tensor([ids]))
        return Adversarial(text, embedding, loss, meta)


@register_attack("p4d-n")
class P4DN(P4D):
    """P4D-N: N free tokens replace the prompt."""

    insert = False


@register_attack("p4d-k")
class P4DK(P4D):
    """P4D-K: a free token before every k tokens of the prompt, which stay fixed."""

    insert = True
