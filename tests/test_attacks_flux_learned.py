"""PUND and MMA-Diffusion on Flux (not in the papers): PUND learns one row per text encoder (CLIP for
the pooled embedding, T5 for the sequence) against a surrogate hardened on the text keys / values,
MMA-Diffusion searches words of both tokenizers for CLIP's pooled state and the T5 states' mean.
Each is seeded, lowers its own objective, and gives what plain diffusers reproduces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import efface.attacks  # noqa: F401  (registers the attacks)
from efface.attacks.base import AttackResult
from efface.attacks.text import decode_text
from efface.models.families import Conditioning
from efface.models.slots import slot_start, tokenizers
from efface.registry import ATTACKS
from efface.sampling import GenerationConfig, generate_many

GEN = GenerationConfig(steps=2)
PROMPTS = ["a red circle", "a circle on a striped background"]
PUND_BUDGET = {"epochs": 6, "bands": 2, "steps_per_band": 2, "surrogate_every": 3, "surrogate_steps": 1,
               "surrogate_lr": 1e-3}
MMA_BUDGET = {"tokens": 3, "steps": 6, "topk": 8, "batch": 16}


@pytest.fixture(scope="module")
def flux(family_pipe):
    return family_pipe("flux")


@pytest.fixture(scope="module")
def pund_runs(flux, monkeypatch_module):
    """Two PUND runs with the same seed, and the parameter sets the surrogate hardening selected."""
    import efface.attacks.pund as pund

    chosen = []
    real = pund.select
    monkeypatch_module.setattr(pund, "select", lambda pipe, name: chosen.append(name) or real(pipe, name))
    targets = generate_many(flux, PROMPTS, GEN, seed=11)
    runs = [ATTACKS.get("pund")(**PUND_BUDGET).run(flux, "circle", PROMPTS, original=flux, seed=0, generation=GEN,
                                                   progress=False, target_images=targets) for _ in range(2)]
    return runs, chosen


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_pund_on_flux_learns_a_row_per_encoder_hardens_the_text_keys_values_and_lowers_its_objective(flux, pund_runs):
    (result, again), chosen = pund_runs
    assert set(chosen) == {"xattn_kv"}
    assert list(result.learned) == ["<pund>", "<pund>/text_encoder_2"]
    assert result.learned["<pund>"].shape == (1, flux.text_encoder.config.hidden_size)
    assert result.learned["<pund>/text_encoder_2"].shape == (1, flux.text_encoder_2.config.d_model)
    for key, value in result.learned.items():  # seeded: the same rows and images
        assert torch.equal(value, again.learned[key])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, again.images))
    start = np.mean([a.meta["objective_start"] for a in result.adversarial])
    end = np.mean([a.meta["objective"] for a in result.adversarial])
    assert end < start, f"pund on flux: objective {start:.6g} -> {end:.6g}"


def test_pund_on_flux_rows_load_into_plain_diffusers_and_give_the_attack_s_conditioning(flux, pund_runs, family_dirs,
                                                                                       tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    result = pund_runs[0][0]
    out = result.save(tmp_path / "atk")
    rows = load_file(str(out / "learned_embeds.safetensors"))
    fresh = FluxPipeline.from_pretrained(str(family_dirs("flux")))  # never saw the attack
    fresh.load_textual_inversion(rows["<pund>"], token="<pund>")
    fresh.load_textual_inversion(rows["<pund>/text_encoder_2"], token="<pund>", text_encoder=fresh.text_encoder_2,
                                 tokenizer=fresh.tokenizer_2)
    loaded = AttackResult.load(out)
    for adv, saved in zip(result.adversarial, loaded.adversarial):
        assert "<pund>" in adv.prompt and isinstance(adv.embedding, Conditioning)
        embeds, pooled, _ = fresh.encode_prompt(adv.prompt, None, device="cpu",
                                                max_sequence_length=adv.embedding.embeds.shape[1])
        assert torch.allclose(embeds, adv.embedding.embeds, atol=1e-5)
        assert torch.allclose(pooled, adv.embedding.pooled, atol=1e-5)
        assert torch.equal(saved.embedding.embeds, adv.embedding.embeds)
        assert torch.equal(saved.embedding.pooled, adv.embedding.pooled)
    replayed = loaded.replay(flux)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, replayed))


def _mma(flux, **overrides):
    return ATTACKS.get("mma-diffusion")(**{**MMA_BUDGET, **overrides}).run(flux, "circle", PROMPTS, seed=0,
                                                                          generation=GEN, progress=False)


def _pipeline_objective(pipe, adversarial: str, prompt: str) -> float:
    """MMA-Diffusion's Flux loss from the pipeline's own encoding: 1 - cos of the pooled CLIP
    embeddings plus 1 - cos of the T5 states' means over each prompt's own tokens."""
    length = pipe.tokenizer_2.model_max_length
    with torch.no_grad():
        (a, pa, _), (b, pb, _) = (pipe.encode_prompt(p, None, device="cpu", max_sequence_length=length)
                                  for p in (adversarial, prompt))
    na, nb = (len(pipe.tokenizer_2(p).input_ids) for p in (adversarial, prompt))
    return float(2 - F.cosine_similarity(pa, pb)[0]
                 - F.cosine_similarity(a[0, :na].mean(0), b[0, :nb].mean(0), dim=0))


def test_mma_diffusion_on_flux_finds_words_of_both_tokenizers_is_seeded_and_lowers_its_objective(flux):
    result = _mma(flux)
    assert [a.prompt for a in _mma(flux).adversarial] == [a.prompt for a in result.adversarial]
    for a, prompt in zip(result.adversarial, PROMPTS):
        assert a.replay == "text" and a.embedding is None and a.meta["stable"]
        words = [decode_text(flux.tokenizer, [t]) for t in a.meta["tokens"]]
        assert "circle" not in a.prompt
        for tok in tokenizers(flux):  # every word is one token of CLIP and of T5
            assert all(len(tok(w).input_ids) == 1 + slot_start(tok) + 1 for w in words), (tok, words)
        assert a.meta["objective"] < a.meta["objective_start"]
        # the objective is the one the transformer reads: the pipeline's own T5 states and CLIP pooled
        assert a.meta["objective"] == pytest.approx(_pipeline_objective(flux, a.prompt, prompt), abs=1e-4)
    again = generate_many(flux, [a.prompt for a in result.adversarial], GEN, seeds=result.seeds)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(result.images, again))


def test_pund_and_mma_diffusion_declare_flux_and_refuse_embedding_replay_there(flux):
    from efface.attacks.base import CLIP_ONLY_NOTES
    from efface.errors import InputError

    for name in ("pund", "mma-diffusion"):
        cls = ATTACKS.get(name)
        assert cls.families == {"sd", "flux"} and set(cls.family_notes) == {"sdxl", "sd3", "flux"}
        assert cls.family_notes["flux"] != CLIP_ONLY_NOTES["flux"]  # what differs there, not why it is refused
    with pytest.raises(InputError, match="replay='embedding'.*only on SD 1.x"):
        _mma(flux, replay="embedding")
