"""Attacks that learn a token (concept inversion, PUND; issue 13): the token is saved in diffusers'
textual-inversion format and works in plain diffusers; concept inversion trains on images whose
seeds are disjoint from the judged ones."""

from __future__ import annotations

import json

import pytest
import torch

import efface.attacks  # noqa: F401  (registers the attacks)
from efface.attacks.base import TRAIN_SEED_OFFSET, AttackResult
from efface.methods import erase
from efface.models.loading import load_pipeline
from efface.registry import ATTACKS
from efface.sampling import generate_many

from test_attacks import GEN, PROMPTS, TINY


@pytest.fixture(scope="module")
def pipes(tiny_sd_dir):
    original = load_pipeline(str(tiny_sd_dir))
    original.set_progress_bar_config(disable=True)
    erased_pipe = erase(original, "uce", ["circle"], seed=0, progress=False).applied_copy(original)
    return original, erased_pipe


@pytest.mark.parametrize("name, token", [("concept-inversion", "<concept-inversion>"), ("pund", "<pund>")])
def test_the_learned_token_loads_into_plain_diffusers_and_gives_the_attack_s_prompt(name, token, pipes, tmp_path,
                                                                                   tiny_sd_dir):
    original, erased_pipe = pipes
    result = ATTACKS.get(name)(**TINY[name]).run(erased_pipe, "circle", PROMPTS, original=original, seed=0,
                                                 generation=GEN, progress=False)
    out = result.save(tmp_path / "atk")
    data = json.loads((out / "attack.json").read_text())
    assert data["placeholder_token"] == token and data["run"]["placeholder_tokens"] == [token]
    assert set(AttackResult.load(out).learned) == {token}
    fresh = load_pipeline(str(tiny_sd_dir))  # a pipeline that never saw the attack
    fresh.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    for adv in result.adversarial:
        assert token in adv.prompt and adv.embedding is not None
        embeds, _ = fresh.encode_prompt(adv.prompt, "cpu", 1, False)
        assert torch.allclose(embeds, adv.embedding.to(embeds.dtype), atol=1e-5)


def test_concept_inversion_trains_on_images_it_is_not_judged_on(pipes, monkeypatch):
    original, erased_pipe = pipes
    cls = ATTACKS.get("concept-inversion")
    seen = {}
    real = cls._prepare

    def prepare(self, ctx):
        seen["images"] = ctx.target_images
        real(self, ctx)

    monkeypatch.setattr(cls, "_prepare", prepare)
    cls(**TINY["concept-inversion"]).run(erased_pipe, "circle", PROMPTS, original=original, seed=3, generation=GEN,
                                         progress=False)
    seeds = [3 + i for i in range(len(PROMPTS))]
    disjoint = generate_many(original, PROMPTS, GEN, seeds=[s + TRAIN_SEED_OFFSET for s in seeds])
    judged_seeds = generate_many(original, PROMPTS, GEN, seeds=seeds)
    as_arrays = [torch.tensor(list(im.getdata())) for im in seen["images"]]
    assert all(torch.equal(a, torch.tensor(list(b.getdata()))) for a, b in zip(as_arrays, disjoint))
    assert not all(torch.equal(a, torch.tensor(list(b.getdata()))) for a, b in zip(as_arrays, judged_seeds))
    assert ATTACKS.get("unlearndiffatk").target_seed_offset == 0  # the prompt's own image, as the official attack


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_concept_inversion_learns_a_row_per_encoder_lowers_its_loss_and_saves_the_pooled(family, family_pipe,
                                                                                         tmp_path):
    """On every encoder at once (SDXL: both CLIPs; Flux: CLIP for the pooled embedding, T5 for the
    sequence): one learned row per encoder, the denoising loss of the learned token below that of its
    initializer on fixed draws, and the adversarial conditioning (sequence and pooled) saved and loaded."""
    from efface.attacks.base import target_latents
    from efface.attacks.concept_inversion import PLACEHOLDER
    from efface.models.diffusion import add_noise, predict
    from efface.models.families import Conditioning, family_of
    from efface.models.slots import condition_at, text_encoders, tokenizers, word_slot
    from efface.models.text import token_embedding

    pipe = family_pipe(family)
    options = {**TINY["concept-inversion"], "steps": 40, "lr": 0.05}
    targets = generate_many(pipe, ["a circle", "a red circle"], GEN, seed=7)
    result = ATTACKS.get("concept-inversion")(**options).run(pipe, "circle", PROMPTS, original=pipe, seed=0,
                                                            generation=GEN, progress=False, target_images=targets)
    names = family_of(pipe).text_encoders
    assert list(result.learned) == [PLACEHOLDER, *(f"{PLACEHOLDER}/{n}" for n in names[1:])]
    init = [token_embedding(te).weight[tok("a", add_special_tokens=False).input_ids].mean(0)
            for te, tok in zip(text_encoders(pipe), tokenizers(pipe))]
    learned = [v[0] for v in result.learned.values()]
    caption = word_slot(pipe, "a", "")  # "a {}"
    dist, g = target_latents(pipe, targets), torch.Generator().manual_seed(3)

    def loss(vectors):
        g.manual_seed(3)
        total = 0.0
        with torch.no_grad():
            cond = condition_at(pipe, *caption, [v.float().unsqueeze(0) for v in vectors])
            for _ in range(8):
                t = torch.randint(1000, (2,), generator=g)
                x_t, target = add_noise(pipe, dist.mean, t, g)
                total += float(torch.nn.functional.mse_loss(predict(pipe, x_t, t, cond.expand(2)), target))
        return total

    assert loss(learned) < loss(init)
    adv = result.adversarial[0]
    assert isinstance(adv.embedding, Conditioning) and adv.embedding.pooled is not None
    loaded = AttackResult.load(result.save(tmp_path / "atk")).adversarial[0].embedding
    assert torch.equal(loaded.embeds, adv.embedding.embeds) and torch.equal(loaded.pooled, adv.embedding.pooled)
