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
