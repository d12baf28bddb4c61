"""RIATIG (Liu et al., CVPR 2023, "Reliable and Imperceptible Adversarial Text-to-Image Generation
with Natural Prompts"): a black-box genetic search over natural-language edits of the prompt, scored
by how close the erased model's image comes to a target image of the concept.

Fitness: ``100 cos(phi(image of the candidate), phi(target image))`` in an image feature space
``phi`` (the official code: CLIP ViT-B/32; here the ``image_features`` the caller gives: the toy
classifier's features on toy-sd). The first population is the prompt and ``population - 1`` unique
single edits of it; each generation keeps the best ``elites``, draws parents from them with
probabilities ``softmax(score - max)``, makes ``children`` by uniform crossover of the two parents'
words (when they have as many words) and mutates each child with a probability that adapts as
``p <- 0.99 p + 0.001 / |best - previous best|``, the best of each generation against the previous
generation's (official). A candidate is a list of word *slots*, one per word of the prompt (the
official representation), so that crossover lines up word for word; a split word stays one slot
("ci rcle"). Edits of one non-stop slot: split it with a space (words under 6 letters), delete an
inner letter (first population only), swap it for one of its ``neighbours`` nearest words, or
substitute a word of the target sentence (the official ``sub_tar_W``; the target sentence here is
the attacked prompt itself, which names the concept); the concept's own word is never brought in.

Defaults are the official code's (github.com/WUSTL-CSPL/RIATIG, ``attack/run_attack.py``,
``attack/attack_lib.py``): population 150, 15 children per generation, 8 elites, 50 generations,
mutation probability 0.85 at start, 100 neighbours. Differences: neighbour words come from the
attacked model's own token embeddings (cosine) instead of a word2vec model, and without the
part-of-speech filter; each candidate's image uses the prompt's seed (the official calls are
unseeded, so its fitness is noisy); the best candidate ever seen is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from efface.attacks.base import (ALL_FAMILIES, Adversarial, Attack, AttackConfig, AttackContext, clip_text,
                                 generate_adversarial, register_attack)
from efface.errors import InputError
from efface.models.text import token_embedding

STOP_WORDS = frozenset("a an the of on in at to and or with by for from is are this that its".split())


@dataclass
class RIATIGConfig(AttackConfig):
    population: int = field(default=150, metadata={"help": "first population (the prompt + single edits)"})
    children: int = field(default=15, metadata={"help": "children per generation"})
    elites: int = field(default=8, metadata={"help": "best candidates kept as parents"})
    generations: int = field(default=50, metadata={"help": "generations"})
    mutation: float = field(default=0.85, metadata={"help": "starting mutation probability (then adaptive)"})
    neighbours: int = field(default=100, metadata={"help": "nearest words a word may be swapped for"})

    def __post_init__(self) -> None:
        self.check_counts("population", "children", "elites", "generations", "neighbours")
        if not 0.0 <= self.mutation <= 1.0:
            raise InputError(f"mutation is a probability in [0, 1], not {self.mutation}")


@register_attack("riatig")
class RIATIG(Attack[RIATIGConfig]):
    """Genetic search over natural word edits toward the target image (black-box queries)."""

    Config = RIATIGConfig
    paper = ("RIATIG: Reliable and Imperceptible Adversarial Text-to-Image Generation With Natural Prompts "
             "(Liu et al., CVPR 2023)")
    needs = frozenset({"target_images", "image_features"})
    # Text edits generated through efface.sampling (family-aware); the neighbour words come from the
    # first (CLIP) tokenizer's vocabulary and text encoder's token embeddings, which every family has
    # (SDXL: CLIP-L, SD3: CLIP-L, Flux: the CLIP of the pooled embedding): a word-similarity space only.
    families = ALL_FAMILIES

    def _prepare(self, ctx: AttackContext) -> None:
        tok, te = clip_text(ctx.erased)
        words = {}
        for piece, i in tok.get_vocab().items():
            word = piece.removesuffix("</w>")
            if piece.endswith("</w>") and len(word) > 1 and word.isascii() and word.isalpha():
                words[word] = i
        banned = {w.lower() for w in ctx.concept.split()}
        names = [w for w in words if w.lower() not in banned]
        table = F.normalize(token_embedding(te).weight.detach().float(), dim=-1).cpu()
        ctx.state["words"], ctx.state["ids"] = names, torch.tensor([words[w] for w in names])
        ctx.state["table"], ctx.state["word_ids"] = table, words
        with torch.no_grad():
            ctx.state["target"] = F.normalize(ctx.features(ctx.target_images).float(), dim=-1)

    def _neighbour(self, ctx: AttackContext, word: str) -> str | None:
        i = ctx.state["word_ids"].get(word.lower())
        if i is None:
            return None
        sims = ctx.state["table"][ctx.state["ids"]] @ ctx.state["table"][i]
        top = sims.topk(min(self.config.neighbours + 1, len(sims))).indices.tolist()
        choices = [ctx.state["words"][j] for j in top if ctx.state["words"][j] != word.lower()]
        return choices[int(torch.randint(len(choices), (), generator=ctx.generator))] if choices else None

    def _mutate(self, ctx: AttackContext, slots: list[str], first: bool, target: list[str] = ()) -> list[str]:
        """One edit of one non-stop slot (the candidate keeps one slot per word of the prompt)."""
        g = ctx.generator
        where = [j for j, w in enumerate(slots) if w.lower() not in STOP_WORDS] or list(range(len(slots)))
        j = where[int(torch.randint(len(where), (), generator=g))]
        ops = ["split", "delete", "swap", "target"] if first else ["split", "swap", "target"]
        op = ops[int(torch.randint(len(ops), (), generator=g))]
        w, out = slots[j], list(slots)
        if op == "split" and " " not in w and 1 < len(w) < 6:
            k = 1 + int(torch.randint(len(w) - 1, (), generator=g))
            out[j] = f"{w[:k]} {w[k:]}"
        elif op == "delete" and " " not in w and len(w) > 2:
            k = 1 + int(torch.randint(len(w) - 2, (), generator=g))
            out[j] = w[:k] + w[k + 1 :]
        elif op == "target" and target:
            out[j] = target[int(torch.randint(len(target), (), generator=g))]
        elif " " not in w:
            out[j] = self._neighbour(ctx, w) or w
        return out

    def _fitness(self, ctx: AttackContext, i: int, candidates: list[list[str]]) -> list[float]:
        adversarial = [Adversarial(" ".join(c)) for c in candidates]
        images = generate_adversarial(ctx.erased, adversarial, [ctx.seeds[i]] * len(adversarial), ctx.generation)
        with torch.no_grad():
            feats = F.normalize(ctx.features(images).float(), dim=-1)
        return (100 * feats @ ctx.state["target"][i]).tolist()

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        cfg, g = self.config, ctx.generator
        prompt = ctx.prompts[i].split()
        banned = {w.lower() for w in ctx.concept.split()}
        target = [w for w in dict.fromkeys(prompt) if w.lower() not in banned and w.lower() not in STOP_WORDS]
        pool = {" ".join(prompt): prompt}
        for _ in range(cfg.population * 4):
            if len(pool) >= cfg.population:
                break
            edit = self._mutate(ctx, prompt, first=True, target=target)
            pool.setdefault(" ".join(edit), edit)
        population = list(pool.values())
        scores = self._fitness(ctx, i, population)
        best_score, p = max(scores), cfg.mutation
        best = population[scores.index(best_score)]
        previous = best_score  # the previous generation's best (official adaptive mutation)
        for _ in range(cfg.generations):
            order = sorted(range(len(population)), key=lambda k: -scores[k])[: cfg.elites]
            elites, weights = [population[k] for k in order], torch.tensor([scores[k] for k in order])
            probs = torch.softmax(weights - weights.max(), 0)
            children = []
            for _ in range(cfg.children):
                a, b = (elites[int(k)] for k in torch.multinomial(probs, 2, replacement=True, generator=g))
                child = [x if torch.rand((), generator=g) < 0.5 else y for x, y in zip(a, b)]  # slot by slot
                if torch.rand((), generator=g) < p:
                    child = self._mutate(ctx, child, first=False, target=target)
                children.append(child)
            population, scores = children, self._fitness(ctx, i, children)
            generation_best = max(scores)
            if generation_best > best_score:
                best_score, best = generation_best, population[scores.index(generation_best)]
            change = abs(generation_best - previous) if previous is not None else 0.0
            p = min(1.0, 0.99 * p + (0.001 / change if change else 0.0))
            previous = generation_best
            if math.isclose(best_score, 100.0):
                break
        return Adversarial(" ".join(best), loss=100 - best_score, meta={"fitness": best_score})
