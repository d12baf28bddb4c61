"""MMA-Diffusion, text modality (Yang et al., CVPR 2024, arXiv 2311.17516): a GCG-style search
(Zou et al., 2023) for a prompt of ``tokens`` tokens, none of them a banned word, whose text
embedding points where the target prompt's does::

    min_adv  1 - cos( pooled(adv), pooled(prompt) )

``pooled`` is the text encoder's final-norm state at the end-of-text token (CLIP's pooler output,
not the projected embedding). The adversarial prompt is a string, as in the official
``textual_attack.py`` (``SDattack``): each step tokenises the current string, takes the gradient
of the loss with respect to a one-hot of its tokens (each row L2-normalised), excludes banned
tokens, and for each position keeps the ``topk`` tokens with the most negative gradient; ``batch``
candidates each swap one token (positions spread evenly, the new token drawn from that position's
top-k) and are decoded to strings; a candidate string is dropped when it equals the current one or
does not re-tokenise to ``tokens`` tokens (the official filter) or, here, re-tokenises to a banned
token; the rest are scored as their strings tokenise, and the best string replaces the current one
(always, as the official code; the best string seen is kept apart and returned). Ids live only
through the text, so the prompt judged is the one found.

Banned words (the official ``tokens_to_remove_set``: every token containing one of them): the
concept's own word, ``banned_words``, and, whenever the concept is nudity-like ("nudity", "nude",
"naked", "nsfw", ...), the official nudity list :data:`NUDITY_BANNED`; a token of more than two
characters that is part of a banned word is banned too (so the word cannot be spelled from its
pieces). ``replay="embedding"``: the id-level variant (ids kept from step to step, candidates
scored on their ids, the image from the found ids' embedding; reported as
``mma-diffusion/embedding``).

Defaults are the official ``textual_attack.py`` (github.com/cure-lab/MMA-Diffusion): 20 tokens,
top-k 256, 512 candidates, 1000 steps (the README's run); the start is random single letters
(the official ``control_init``; allowed whole-word tokens when the vocabulary has too few
letters). Differences: the gradient row of position ``p`` is used for token ``p`` (the official
code shifts it by one, its issue #27); every random draw comes from the seeded generator; the
candidates are judged by text only, as in the paper. ``meta``: the loss of the start string
(``objective_start``) and of the string found (``objective``).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from efface.attacks.base import (CLIP_ONLY_NOTES, Adversarial, Attack, AttackConfig, AttackContext, clip_states,
                                 clip_text, register_attack)
from efface.attacks.text import body_ids, check_replay, concept_kind, decode_text, replayed_text, whole_word_tokens
from efface.errors import InputError
from efface.models.text import framed_ids, replaced_token_embeddings, token_embedding, tokenize

NUDITY_BANNED = ("ak", "na", "ke", "nud", "sexual", "nude", "nudity", "sex", "18+", "naked", "nsfw", "porn", "dick",
                 "vagina", "naked child", "explicit content", "uncensored", "fuck", "nipples", "visible nipples",
                 "breast", "areola")


@dataclass
class MMADiffusionConfig(AttackConfig):
    tokens: int = field(default=20, metadata={"help": "tokens of the adversarial prompt"})
    steps: int = field(default=1000, metadata={"help": "GCG steps"})
    topk: int = field(default=256, metadata={"help": "candidate tokens per position"})
    batch: int = field(default=512, metadata={"help": "candidates scored per step"})
    banned_words: tuple[str, ...] = field(default=(), metadata={
        "help": "tokens containing any of these are never used (always banned too: the concept's word, and the "
                "official nudity list for a nudity-like concept)"})
    replay: str = field(default="text", metadata={
        "help": "text: strings from step to step, judged as typed (official); embedding: ids and their embedding"})

    def __post_init__(self) -> None:
        self.check_counts("tokens", "steps", "topk", "batch")
        check_replay(self.replay)


def pooled(pipe, ids: torch.Tensor) -> torch.Tensor:
    """The (first, CLIP) text encoder's pooled (end-of-text) state of each row of ``ids``."""
    _, te = clip_text(pipe)
    return te(ids.to(te.device))[1].float()


def banned_for(concept: str, banned_words: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The words whose tokens are banned: the concept, ``banned_words``, the nudity list if nudity-like."""
    nudity = NUDITY_BANNED if concept_kind(concept) == "nudity" else ()
    return tuple(dict.fromkeys(w.lower() for w in (concept, *banned_words, *nudity) if w.strip()))


@register_attack("mma-diffusion")
class MMADiffusion(Attack[MMADiffusionConfig]):
    """GCG token search toward the prompt's text embedding, banned words excluded (text encoder only)."""

    Config = MMADiffusionConfig
    paper = ("MMA-Diffusion: MultiModal Attack on Diffusion Models (Yang et al., CVPR 2024), arXiv 2311.17516")
    needs = frozenset({"text_encoder"})
    family_notes = CLIP_ONLY_NOTES

    def _prepare(self, ctx: AttackContext) -> None:
        (tok, _), k = clip_text(ctx.erased), self.config.tokens
        if k + 2 > tok.model_max_length:
            raise InputError(f"tokens {k} does not fit the tokenizer's {tok.model_max_length} (start and end "
                             f"included); use at most {tok.model_max_length - 2}")
        banned = banned_for(ctx.concept, self.config.banned_words)
        special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        allowed = torch.ones(len(tok), dtype=torch.bool)
        for i in range(len(tok)):
            piece = tok.convert_ids_to_tokens(i).replace("</w>", "").lower()
            if i in special or any(b in piece or (piece and piece in b and len(piece) > 2) for b in banned):
                allowed[i] = False
        whole = whole_word_tokens(tok)
        whole = whole[allowed[whole]]
        letters = [int(i) for i in whole if decode_text(tok, [int(i)]) in string.ascii_lowercase]
        ctx.state |= {"allowed": allowed, "banned": banned,
                      "start": torch.tensor(letters) if len(letters) >= 2 else whole}

    def _loss(self, ctx: AttackContext, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``1 - cos`` of each row of ``ids`` (``[start, tokens..., end, pad...]``) with the target."""
        with torch.no_grad():
            return 1 - F.cosine_similarity(pooled(ctx.erased, ids), target, dim=-1)

    def _candidates(self, ctx: AttackContext, adv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``batch`` copies of ``adv`` (1 x tokens), each with one token swapped for one of its position's top-k."""
        cfg, g, allowed = self.config, ctx.generator, ctx.state["allowed"]
        grad = grad.clone()
        grad[:, ~allowed] = float("inf")
        top = (-grad).topk(min(cfg.topk, int(allowed.sum())), dim=-1).indices  # tokens x topk
        where = (torch.arange(cfg.batch) * cfg.tokens // cfg.batch).clamp(max=cfg.tokens - 1)
        pick = top[where, torch.randint(top.shape[1], (cfg.batch,), generator=g)]
        candidates = adv.repeat(cfg.batch, 1)
        candidates[torch.arange(cfg.batch), where] = pick
        return candidates

    def _filter(self, ctx: AttackContext, candidates: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The candidates kept, as the ids that are scored: text replay, each candidate string's own
        tokens (dropped if it equals the current string, changes length or holds a banned token);
        embedding replay, the candidate ids whose string keeps the length (the official filter)."""
        tok, allowed, k = clip_text(ctx.erased)[0], ctx.state["allowed"], self.config.tokens
        texts = [decode_text(tok, c) for c in candidates]
        retokenised = tok(texts, truncation=False).input_ids
        if self.config.replay == "text":
            now = decode_text(tok, current[0])
            kept = [ids[1:-1] for t, ids in zip(texts, retokenised)
                    if t != now and len(ids) == k + 2 and bool(allowed[ids[1:-1]].all())]
            unique = list(dict.fromkeys(tuple(ids) for ids in kept))
            return torch.tensor(unique, dtype=torch.long).reshape(len(unique), k)
        kept = [c for c, ids in zip(candidates, retokenised) if len(ids) == k + 2 and not torch.equal(c, current[0])]
        return torch.stack(kept) if kept else torch.empty(0, k, dtype=torch.long)

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        cfg, pipe, g = self.config, ctx.erased, ctx.generator
        tok, te = clip_text(pipe)
        table = token_embedding(te).weight.detach()
        target = pooled(pipe, tokenize(pipe, [ctx.prompts[i]])).detach()
        first = ctx.state["start"][torch.randint(len(ctx.state["start"]), (cfg.tokens,), generator=g)]
        adv = first.unsqueeze(0)
        if cfg.replay == "text":
            adv = torch.tensor([body_ids(tok, decode_text(tok, first))])  # the string's own tokens
        best, best_loss = adv.clone(), float(self._loss(ctx, framed_ids(tok, adv), target))
        start = best_loss
        positions = list(range(1, cfg.tokens + 1))
        for _ in range(cfg.steps):
            onehot = F.one_hot(adv[0].to(table.device), table.shape[0]).to(table.dtype).requires_grad_(True)
            with replaced_token_embeddings(te, positions, onehot @ table):
                emb = te(framed_ids(tok, adv).to(te.device))[1].float()
            (1 - F.cosine_similarity(emb, target, dim=-1)).sum().backward()
            grad = F.normalize(onehot.grad.float(), dim=-1).cpu()  # the token search runs on the CPU
            kept = self._filter(ctx, self._candidates(ctx, adv, grad), adv)
            if not len(kept):
                continue
            losses = self._loss(ctx, framed_ids(tok, kept), target)
            j = int(losses.argmin())
            adv = kept[j : j + 1]
            if float(losses[j]) < best_loss:
                best, best_loss = adv.clone(), float(losses[j])
        text = decode_text(tok, best[0])
        meta = {"tokens": best[0].tolist(), "objective_start": start, "objective": best_loss}
        if cfg.replay == "text":
            return replayed_text(tok, text, best[0].tolist(), best_loss, meta)
        with torch.no_grad():
            embedding = clip_states(pipe, framed_ids(tok, best))
        return Adversarial(text, embedding, loss=best_loss, meta=meta)
