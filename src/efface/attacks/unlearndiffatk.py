"""UnlearnDiffAtk (Zhang et al., ECCV 2024, arXiv 2310.11868): the erased model as its own
classifier. ``k`` tokens prepended to the prompt are optimised so that the erased model denoises an
image of the concept well::

    min_u  E_eps || eps - eps_theta*(x_t, t, [start, tokens(u), prompt...]) ||^2
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   x_0 = the target image's latent

``u`` is a relaxed one-hot (``k x V``, rows on the probability simplex, uniform at start). Each
step samples one token per row from ``u`` (forward: the sampled one-hot times the embedding table;
backward: straight-through, the gradient clipped to [-1, 1]), takes an Adam step (coupled weight
decay) and projects every row back onto the simplex. Timesteps are visited in ascending order
(``t = T / n / 2, ... ``, ``n_timesteps`` of them), ``iterations`` steps each; after each, the
argmax tokens are read off and, when a judge is given, the image is generated with the prompt's
seed and the attack stops as soon as the concept is back.

The target image (``x_0``) is the original model's image of the same prompt and seed (as the
official ``generate_dataset.py``), unless ``target_images`` are given. Defaults are the official
nudity config (github.com/OPTML-Group/Diffusion-MU-Attack, ``configs/nudity/text_grad_*.json``):
k 5, 40 iterations per timestep, Adam lr 0.01, weight decay 0.1, 50 timesteps ``t = 10, 30, ..., 990``;
its object and style configs use k 3. The adversarial prompt is text, judged as the official code judges it (``classifier_.py eval()``:
the decoded prompt, re-tokenised): the k tokens are drawn from the tokens that are whole words on
their own (:func:`~efface.attacks.text.whole_word_tokens`), so the decoded ``"w1 w2 w3 <prompt>"``
re-tokenises to exactly the ids optimised, and its image (early stop included) is the pipeline's
for that text. ``replay="embedding"``: the id-level variant over the whole vocabulary, whose image
comes from the found ids' embedding (reported as ``unlearndiffatk/embedding``).

Other families (SDXL, SD3, Flux; the official code is SD 1.x only): the prompt reaches the model
through several text encoders (Flux: CLIP for the pooled embedding, T5 for the token sequence), so
the k tokens are words that are one token in every tokenizer (the first tokenizer's whole-word
tokens that each other tokenizer also reads as one: :func:`~efface.attacks.text.shared_whole_words`);
one relaxed one-hot over those words selects the same word's row of every encoder's table, put
into the k slots after each tokenizer's start token (T5 has none: :mod:`efface.models.slots`), and
the conditioning is the pipeline's own encoding of it. The decoded text re-tokenises to the same
words in every tokenizer, so text replay is exact there too; ``replay="embedding"`` (one CLIP
encoder's states as the whole conditioning) is SD 1.x / 2.x only.

Differences from the official code: the simplex projection is the exact sort-based one (the
official code bisects to 1e-5: the same point up to that tolerance); the noise comes from the
attack's seeded generator; the official vocabulary is every token (text replay: the whole-word
ones); with a v-prediction model the target is the velocity. ``meta`` records the objective (the
denoising error at fixed noises and timesteps) of the start tokens and of the tokens found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from efface.attacks.base import (ALL_FAMILIES, Adversarial, Attack, AttackConfig, AttackContext, clip_states, clip_text,
                                 generate_adversarial, register_attack, target_latents)
from efface.attacks.text import (body_ids, check_embedding_replay, check_replay, decode_text, replayed_text,
                                 search_vocabulary)
from efface.models.diffusion import add_noise, num_train_timesteps, predict
from efface.models.families import Conditioning
from efface.models.slots import check_prefix_fits, prefixed_condition, prefixed_prompt, token_tables
from efface.models.text import encode, framed_ids


@dataclass
class UnlearnDiffAtkConfig(AttackConfig):
    tokens: int = field(default=5, metadata={"help": "k, adversarial tokens prepended to the prompt"})
    iterations: int = field(default=40, metadata={"help": "Adam steps per timestep"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "Adam (coupled L2) weight decay"})
    n_timesteps: int = field(default=50, metadata={"help": "timesteps visited in ascending order"})
    early_stop: bool = field(default=True, metadata={"help": "stop once the judge sees the concept"})
    replay: str = field(default="text", metadata={
        "help": "text: judge the decoded, re-tokenised prompt (official); embedding: the found ids' embedding"})

    def __post_init__(self) -> None:
        self.check_counts("tokens", "iterations", "n_timesteps")
        check_replay(self.replay)


def project_simplex(u: torch.Tensor) -> torch.Tensor:
    """Each row of ``u`` projected (Euclidean) onto the probability simplex {x >= 0, sum x = 1}."""
    s, _ = torch.sort(u, dim=-1, descending=True)
    cumulative = s.cumsum(-1) - 1
    index = torch.arange(1, u.shape[-1] + 1, device=u.device, dtype=u.dtype)
    rho = (s - cumulative / index > 0).sum(-1, keepdim=True)
    theta = cumulative.gather(-1, rho - 1) / rho
    return (u - theta).clamp(min=0)


def timesteps(n: int, train_steps: int = 1000) -> list[int]:
    """``n`` timesteps in ascending order, the official ``range(T // n // 2, T, T // n)``."""
    step = max(train_steps // n, 1)
    return list(range(step // 2, train_steps, step))[:n]


@register_attack("unlearndiffatk")
class UnlearnDiffAtk(Attack[UnlearnDiffAtkConfig]):
    """k prepended tokens optimised (relaxed one-hot) against the erased model's denoising error."""

    Config = UnlearnDiffAtkConfig
    paper = ("To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate Unsafe "
             "Images ... For Now (Zhang et al., ECCV 2024), arXiv 2310.11868")
    needs = frozenset({"erased_model", "target_images"})
    families = ALL_FAMILIES
    family_notes = {f: "every text encoder at once: the k tokens are words that are one token in each tokenizer, "
                       "one relaxed one-hot over them selects the same word's row of every encoder's table "
                       "(replay='text' only)" for f in ("sdxl", "sd3", "flux")}

    def _prepare(self, ctx: AttackContext) -> None:
        pipe, k = ctx.erased, self.config.tokens
        check_embedding_replay(self.name, pipe, self.config.replay)
        for p in ctx.prompts:
            check_prefix_fits(pipe, p, k, "tokens")
        ctx.state["x0"] = target_latents(pipe, ctx.target_images).mean
        ctx.state["allowed"] = search_vocabulary(pipe, self.config.replay)

    def _loss(self, ctx: AttackContext, x0: torch.Tensor, t: int, g: torch.Generator, cond: Conditioning):
        x_t, target = add_noise(ctx.erased, x0, t, g)  # target: the noise, the velocity (v) or the flow velocity
        return F.mse_loss(predict(ctx.erased, x_t, t, cond).float(), target.float())

    @torch.no_grad()
    def objective(self, ctx: AttackContext, i: int, tokens: torch.Tensor) -> float:
        """The denoising error of the prompt with ``tokens`` (the first tokenizer's ids) prepended,
        as it is judged (text replay: re-tokenised), at fixed noises (seeded by the prompt's seed),
        at most 10 of the timesteps."""
        adv = self._adversarial(ctx, i, tokens, None, 0)
        cond = Conditioning(adv.embedding) if adv.embedding is not None else encode(ctx.erased, [adv.prompt])
        g = torch.Generator("cpu").manual_seed(ctx.seeds[i])
        x0 = ctx.state["x0"][i : i + 1]
        ts = timesteps(min(self.config.n_timesteps, 10), num_train_timesteps(ctx.erased))
        return sum(float(self._loss(ctx, x0, t, g, cond)) for t in ts) / len(ts)

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        cfg, pipe, g, k, allowed = self.config, ctx.erased, ctx.generator, self.config.tokens, ctx.state["allowed"]
        tables = [t.detach()[a.to(t.device)] for t, a in zip(token_tables(pipe), allowed)]  # W x D_e each
        vocab = tables[0].shape[0]
        u = torch.full((k, vocab), 1.0 / vocab, device=tables[0].device, requires_grad=True)
        optimizer = torch.optim.Adam([u], lr=cfg.lr, weight_decay=cfg.weight_decay)
        x0 = ctx.state["x0"][i : i + 1]
        text = prefixed_prompt(pipe, ctx.prompts[i], k)
        best = allowed[0][u.detach().argmax(-1).cpu()]
        start = self.objective(ctx, i, best)
        loss_value, t = None, 0
        for t in timesteps(cfg.n_timesteps, num_train_timesteps(pipe)):
            for _ in range(cfg.iterations):
                sampled = torch.multinomial(u.detach().float().cpu(), 1, generator=g).squeeze(-1).to(u.device)
                onehot = F.one_hot(sampled, vocab).to(u.dtype)
                onehot = onehot + u - u.detach()  # straight-through: d onehot = d u
                cond = prefixed_condition(pipe, text, [onehot.to(tb.dtype) @ tb for tb in tables])
                loss = self._loss(ctx, x0, t, g, cond)
                optimizer.zero_grad()
                loss.backward()
                u.grad.clamp_(-1, 1)  # the official straight-through estimator's hardtanh
                optimizer.step()
                with torch.no_grad():
                    u.copy_(project_simplex(u))
                loss_value = float(loss.detach())
            best = allowed[0][u.detach().argmax(-1).cpu()]
            if cfg.early_stop and ctx.judge is not None:
                adv = self._adversarial(ctx, i, best, loss_value, t)
                if ctx.judge(generate_adversarial(pipe, [adv], [ctx.seeds[i]], ctx.generation), ctx.concept)[0]:
                    break
        adv = self._adversarial(ctx, i, best, loss_value, t)
        adv.meta |= {"objective_start": start, "objective": self.objective(ctx, i, best)}
        return adv

    def _adversarial(self, ctx: AttackContext, i: int, tokens: torch.Tensor, loss: float | None, t: int) -> Adversarial:
        """The prompt ``tokens`` (the first tokenizer's ids) + prompt: its text (text replay) or the ids' embedding."""
        tok, _ = clip_text(ctx.erased)
        text = f"{decode_text(tok, tokens)} {ctx.prompts[i]}".strip()
        meta = {"tokens": tokens.tolist(), "last_timestep": t}
        if self.config.replay == "text":
            expected = [*tokens.tolist(), *body_ids(tok, ctx.prompts[i])]
            return replayed_text(tok, text, expected, loss, meta)
        prompt = torch.tensor([body_ids(tok, ctx.prompts[i])], dtype=torch.long)
        with torch.no_grad():
            embedding = clip_states(ctx.erased, framed_ids(tok, torch.cat([tokens[None].long(), prompt], 1)))
        return Adversarial(text, embedding, loss, meta)
