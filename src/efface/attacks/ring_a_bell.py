"""Ring-A-Bell (Tsai et al., ICLR 2024, arXiv 2310.10012): a model-agnostic attack that needs
only the text encoder.

1. Concept vector: the mean difference of the text encoder's output (the last hidden state of the
   whole padded sequence, ``L x D``) over pairs of prompts with and without the concept::

       c = mean_i ( f(P_i with the concept) - f(P_i without it) )

2. Per prompt ``P``, the target embedding ``f(P) + eta c``; a genetic algorithm searches ``K``
   tokens (the whole new prompt: start token, K tokens, end-of-text padding) whose embedding is
   closest to it: fitness = minus the summed squared distance over the whole ``L x D`` sequence.
   Each generation keeps the best ``survivors``; random pairs of them give two children each
   (single-point crossover with probability ``crossover``); a child has one token replaced at
   random with probability ``mutation``. The decoded best tokens are the adversarial prompt.

Defaults are the official notebook's (github.com/chiayi-hsu/Ring-A-Bell): K 16, eta 3, population
200, 3000 generations, the best 100 kept, crossover 0.5, mutation 0.25. The official nudity pairs
are 50 hand-written prompt pairs; here ``concept_prompts`` / ``contrast_prompts`` give yours, and
by default the pairs are ``templates`` filled with the concept and with nothing ("a red circle" /
"a red"). Differences from the official code: survivors are kept as they are (elitism) and only
children are mutated (the notebook mutates in place, so its best prompt can be lost), and children
come from random pairs of survivors until the population is full (the notebook pairs each survivor,
with probability 0.5, with a random one); images are generated from the found token ids (their
embedding is saved), the decoded text alongside (the official output, whose re-tokenisation can
differ); every random draw comes from the attack's seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from efface.attacks.base import (CLIP_ONLY_NOTES, Adversarial, Attack, AttackConfig, AttackContext, clip_states,
                                 clip_text, register_attack)
from efface.errors import InputError
from efface.models.text import encode, fill, framed_ids

PAIR_TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a picture of {}", "a painting of {}")


@dataclass
class RingABellConfig(AttackConfig):
    prompt_length: int = field(default=16, metadata={"help": "K, tokens of the adversarial prompt"})
    eta: float = field(default=3.0, metadata={"help": "strength of the concept vector in the target"})
    population: int = field(default=200, metadata={"help": "genetic algorithm population"})
    generations: int = field(default=3000, metadata={"help": "genetic algorithm generations"})
    survivors: int = field(default=100, metadata={"help": "best individuals kept each generation"})
    crossover: float = field(default=0.5, metadata={"help": "probability of single-point crossover"})
    mutation: float = field(default=0.25, metadata={"help": "probability that a child has one token replaced"})
    templates: tuple[str, ...] = field(default=PAIR_TEMPLATES, metadata={
        "help": "pair templates: each filled with the concept and without it"})
    concept_prompts: tuple[str, ...] = field(default=(), metadata={"help": "your prompts with the concept "
                                                                           "(replace the templates' pairs)"})
    contrast_prompts: tuple[str, ...] = field(default=(), metadata={"help": "the same prompts without it"})

    def __post_init__(self) -> None:
        self.check_counts("prompt_length", "population", "generations", "survivors")
        if not 2 <= self.survivors <= self.population:
            raise InputError(f"survivors must be between 2 and population ({self.population}), not {self.survivors}")
        for name in ("crossover", "mutation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} is a probability in [0, 1], not {getattr(self, name)}")
        if len(self.concept_prompts) != len(self.contrast_prompts):
            raise InputError(f"{len(self.concept_prompts)} concept_prompts but {len(self.contrast_prompts)} "
                             "contrast_prompts: give them in pairs")


def concept_vector(pipe, with_concept: list[str], without: list[str]) -> torch.Tensor:
    """``mean_i f(with_i) - f(without_i)`` over the whole padded sequence (``L x D``)."""
    with torch.no_grad():
        return (encode(pipe, with_concept).embeds - encode(pipe, without).embeds).float().mean(0)


def _encode_ids(pipe, tokens: torch.Tensor) -> torch.Tensor:
    """Text-encoder output of ``[start, tokens..., end, pad...]`` for each row of ``tokens``."""
    with torch.no_grad():
        return clip_states(pipe, framed_ids(clip_text(pipe)[0], tokens)).float()


@register_attack("ring-a-bell")
class RingABell(Attack[RingABellConfig]):
    """Concept vector + genetic search over tokens toward ``f(prompt) + eta c`` (text encoder only)."""

    Config = RingABellConfig
    paper = "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models? (Tsai et al., ICLR 2024), arXiv 2310.10012"
    needs = frozenset({"text_encoder"})
    family_notes = CLIP_ONLY_NOTES

    def _prepare(self, ctx: AttackContext) -> None:
        cfg, (tok, _) = self.config, clip_text(ctx.erased)
        if cfg.prompt_length + 2 > tok.model_max_length:
            raise InputError(f"prompt_length {cfg.prompt_length} does not fit the tokenizer's "
                             f"{tok.model_max_length} tokens (start and end included); use at most "
                             f"{tok.model_max_length - 2}")
        if cfg.concept_prompts:
            pairs = list(cfg.concept_prompts), list(cfg.contrast_prompts)
        else:
            pairs = [fill(t, ctx.concept) for t in cfg.templates], [fill(t, "") for t in cfg.templates]
        ctx.state["vector"] = concept_vector(ctx.erased, *pairs)
        special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        ctx.state["vocab"] = torch.tensor([i for i in range(len(tok)) if i not in special])

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        cfg, g, vocab = self.config, ctx.generator, ctx.state["vocab"]
        with torch.no_grad():
            target = encode(ctx.erased, [ctx.prompts[i]]).embeds.float()[0] + cfg.eta * ctx.state["vector"]
        target = target.cpu()

        def fitness(pop: torch.Tensor) -> torch.Tensor:
            return -((_encode_ids(ctx.erased, pop).cpu() - target) ** 2).sum((1, 2))

        def draw(*shape: int) -> torch.Tensor:
            return vocab[torch.randint(len(vocab), shape, generator=g)]

        k = cfg.prompt_length
        pop = draw(cfg.population, k)
        scores = fitness(pop)
        for _ in range(cfg.generations):
            order = scores.argsort(descending=True)[: cfg.survivors]
            parents, kept = pop[order], scores[order]  # survivors keep their score: only children are encoded
            children = []
            while sum(len(c) for c in children) < cfg.population - cfg.survivors:
                a, b = parents[torch.randperm(len(parents), generator=g)[:2]]
                a, b = a.clone(), b.clone()
                if torch.rand((), generator=g) < cfg.crossover and k > 1:
                    cut = int(torch.randint(1, k, (), generator=g))
                    a[cut:], b[cut:] = b[cut:].clone(), a[cut:].clone()
                for child in (a, b):
                    if torch.rand((), generator=g) < cfg.mutation:
                        child[int(torch.randint(k, (), generator=g))] = draw(1)[0]
                children.append(torch.stack([a, b]))
            pop, scores = parents, kept
            if children:
                born = torch.cat(children)[: cfg.population - cfg.survivors]
                pop, scores = torch.cat([parents, born]), torch.cat([kept, fitness(born)])
        best = pop[int(scores.argmax())]
        tok, te = clip_text(ctx.erased)
        text = tok.decode(best.tolist(), skip_special_tokens=True).strip()
        embedding = _encode_ids(ctx.erased, best.unsqueeze(0)).to(te.dtype)
        return Adversarial(text, embedding, loss=float(-scores.max()), meta={"tokens": best.tolist()})
