"""Attacks: the contract over the whole registry on a tiny seeded pipeline (loaded from disk), the
mathematics they rest on, pre-ASR / ASR, and `efface attack`."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import efface.attacks  # noqa: F401  (registers the attacks)
from efface.attacks.base import AttackResult
from efface.attacks.baselines import substitute
from efface.attacks.unlearndiffatk import project_simplex, timesteps
from efface.cli import main
from efface.errors import InputError
from efface.models.text import replaced_token_embeddings, token_embedding
from efface.registry import ATTACKS
from efface.robustness import attack_success
from efface.sampling import GenerationConfig

# The smallest budget of each attack (tiny pipeline, 2 CPU cores). A new attack adds one row.
TINY = {
    "no-attack": {},
    "synonyms": {"synonyms": ("disc", "ring")},
    "ring-a-bell": {"prompt_length": 4, "population": 8, "survivors": 4, "generations": 3, "templates": ("{}", "a {}")},
    "unlearndiffatk": {"tokens": 2, "iterations": 2, "n_timesteps": 2, "early_stop": False},
    "p4d-n": {"prompt_length": 3, "iterations": 2},
    "p4d-k": {"every_k": 2, "iterations": 2},
    "pund": {"epochs": 2, "bands": 2, "steps_per_band": 1, "surrogate_every": 1, "surrogate_steps": 1},
    "riatig": {"population": 4, "children": 2, "elites": 2, "generations": 2, "neighbours": 3},
    "mma-diffusion": {"tokens": 3, "steps": 2, "topk": 4, "batch": 4},
    "concept-inversion": {"steps": 2, "batch_size": 2, "initializer": "a", "templates": ("a {}", "{} on dots")},
}
PROMPTS = ["a red circle", "a circle"]
GEN = GenerationConfig(steps=2)


def test_every_registered_attack_has_a_tiny_budget():
    assert set(ATTACKS.names()) == set(TINY)


def pixel_features(images):
    """A real, simple image feature space: 8x8 thumbnails, flattened."""
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32)).flatten()
                        for im in images])


def _run(name, attack_pipes, seed=0):
    original, erased_pipe = attack_pipes
    attack = ATTACKS.get(name)(**TINY[name])
    return attack.run(erased_pipe, "circle", PROMPTS, original=original, seed=seed, generation=GEN, progress=False,
                      features=pixel_features)


@pytest.mark.parametrize("name", sorted(TINY))
def test_attack_contract(name, attack_pipes, tmp_path):
    original, erased_pipe = attack_pipes
    result = _run(name, attack_pipes)
    assert len(result.adversarial) == len(result.images) == len(PROMPTS)
    assert all(np.isfinite(np.asarray(im, dtype=float)).all() for im in result.images)
    assert all(isinstance(a.prompt, str) for a in result.adversarial)
    again = _run(name, attack_pipes)  # same seed, same adversarial prompts and images
    assert [a.prompt for a in again.adversarial] == [a.prompt for a in result.adversarial]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, again.images))
    out = result.save(tmp_path / name)  # every adversarial prompt / embedding saved and replayable
    loaded = AttackResult.load(out)
    assert json.loads((out / "attack.json").read_text())["run"]["attack"] == name
    replayed = loaded.replay(erased_pipe)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, replayed))


def test_attacks_refuse_to_run_without_what_they_need(attack_pipes):
    original, erased_pipe = attack_pipes
    attack = ATTACKS.get("unlearndiffatk")(**TINY["unlearndiffatk"])
    with pytest.raises(InputError, match="needs images that show the concept"):
        attack.run(erased_pipe, "circle", PROMPTS, generation=GEN, progress=False)
    with pytest.raises(InputError, match="one per prompt"):
        attack.run(erased_pipe, "circle", PROMPTS, target_images=[None], generation=GEN, progress=False)
    with pytest.raises(InputError, match="needs an image feature extractor"):
        ATTACKS.get("riatig")(**TINY["riatig"]).run(erased_pipe, "circle", PROMPTS, original=original, progress=False)
    with pytest.raises(InputError, match="empty concept"):
        attack.run(erased_pipe, " ", PROMPTS, original=original, generation=GEN, progress=False)
    with pytest.raises(InputError, match="has no option"):
        ATTACKS.get("ring-a-bell")(population_size=3)
    with pytest.raises(InputError, match="does not fit"):
        too_long = erased_pipe.tokenizer.model_max_length - 1
        ATTACKS.get("ring-a-bell")(prompt_length=too_long, generations=1).run(erased_pipe, "circle", PROMPTS,
                                                                              generation=GEN, progress=False)


def test_simplex_projection_is_the_closest_point_on_the_simplex():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(64, 7, generator=g, dtype=torch.float64) * 3
    p = project_simplex(u)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(64, dtype=torch.float64))
    assert torch.allclose(project_simplex(p), p)  # idempotent
    for _ in range(200):  # no other point of the simplex is closer
        q = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample((64,))
        assert ((u - p) ** 2).sum(-1).le(((u - q) ** 2).sum(-1) + 1e-12).all()


def test_timesteps_are_the_official_schedule():
    assert timesteps(50) == list(range(10, 1000, 20))
    assert timesteps(10) == list(range(50, 1000, 100))


def test_replaced_token_embeddings_equal_encoding_those_tokens(attack_pipes):
    _, pipe = attack_pipes
    te, tok = pipe.text_encoder, pipe.tokenizer
    ids = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    swapped = ids.clone()
    swapped[0, 1:3] = torch.tensor([5, 7])
    with torch.no_grad():
        with replaced_token_embeddings(te, [1, 2], token_embedding(te).weight[[5, 7]]):
            hooked = te(ids)[0]
        plain = te(swapped)[0]
        after = te(ids)[0]
    assert torch.allclose(hooked, plain)
    assert not torch.allclose(after, plain)  # the hook is gone


def test_substitute_swaps_the_word_or_prepends():
    assert substitute("a red circle on dots", "circle", "disc") == "a red disc on dots"
    assert substitute("a red shape", "circle", "disc") == "disc, a red shape"


def test_attack_success_counts_pre_attack_successes_in_asr(attack_pipes):
    original, erased_pipe = attack_pipes
    calls = []

    def judge(images, concept):  # concept "present" in the first image without attack, and in every attacked one
        calls.append(len(images))
        return [len(calls) == 1 and i == 0 or len(calls) > 1 for i in range(len(images))]

    attack = ATTACKS.get("synonyms")(**TINY["synonyms"])
    measures, result = attack_success(attack, erased_pipe, "circle", PROMPTS + ["circle"], judge=judge,
                                      generation=GEN, progress=False)
    assert measures["pre_asr"] == pytest.approx(1 / 3) and measures["asr"] == 1.0
    assert measures["attacked"] == 2 and len(result.adversarial) == 2
    assert [p["success_without_attack"] for p in measures["prompts"]] == [True, False, False]
    assert measures["prompts"][1]["adversarial_prompt"] == "a disc"


def test_cli_attack_on_toy_writes_attack_json(tmp_path):
    out = tmp_path / "atk"
    assert main(["-q", "attack", "--model", "toy", "--attack", "synonyms", "--concept", "circle", "--n", "3",
                 "--steps", "4", "--seed", "0", "--out", str(out)]) == 0
    data = json.loads((out / "attack.json").read_text())
    assert {"pre_asr", "asr", "prompts", "n"} <= set(data) and data["n"] == 3
    assert 0 <= data["pre_asr"] <= data["asr"] <= 1


def test_cli_attack_refuses_bad_input(tmp_path, tiny_sd_dir, caplog):
    caplog.set_level(logging.ERROR)
    out = str(tmp_path / "o")
    assert main(["attack", "--attack", "nope", "--concept", "circle", "--out", out]) == 2
    assert "valid attacks" in caplog.text
    caplog.clear()
    assert main(["attack", "--model", str(tiny_sd_dir), "--attack", "no-attack", "--concept", "circle",
                 "--prompt", "a circle", "--out", out]) == 2
    assert "no built-in judge" in caplog.text
    caplog.clear()
    options = tmp_path / "p4d.toml"
    options.write_text("iterations = 3\nstep = 1\n")
    assert main(["attack", "--attack", "p4d-n", "--concept", "circle", "--options", str(options), "--out", out]) == 2
    assert "p4d-n has no option 'step'" in caplog.text and "valid options: " in caplog.text


def test_p4d_layouts_and_projection(attack_pipes):
    from efface.attacks.base import AttackContext
    from efface.attacks.p4d import P4DK, P4DN, nearest_tokens

    _, pipe = attack_pipes
    tok = pipe.tokenizer
    ctx = AttackContext(pipe, "circle", ["a red circle"], [0], None, None, torch.Generator(), GEN, False)
    prompt = tok("a red circle").input_ids[1:-1]
    ids, free = P4DK(every_k=2)._layout(ctx, 0)
    expected = [tok.bos_token_id]
    for j in range(0, len(prompt) + 1, 2):
        expected += [tok.pad_token_id, *prompt[j : j + 2]]
    assert ids[: len(expected) + 1] == expected + [tok.eos_token_id]
    assert len(free) == len(prompt) // 2 + 1 and all(ids[j] == tok.pad_token_id for j in free)
    ids, free = P4DN(prompt_length=5)._layout(ctx, 0)
    assert free == [1, 2, 3, 4, 5] and ids[6] == tok.eos_token_id and len(ids) == tok.model_max_length
    table = token_embedding(pipe.text_encoder).weight.detach()
    rows = torch.tensor([3, 9, 17])
    assert nearest_tokens(table[rows] * 2.5, table).tolist() == rows.tolist()  # cosine: scale-free


def test_concept_inversion_places_the_learned_token_where_the_concept_was(attack_pipes):
    from efface.attacks.concept_inversion import placeholder_ids, split_at
    from efface.models.slots import word_slot

    _, pipe = attack_pipes
    tok = pipe.tokenizer
    before, after = split_at("a red circle on dots", "circle")
    ids, pos = placeholder_ids(tok, before, after)
    plain = tok("a red circle on dots").input_ids
    red = tok("a red").input_ids[:-1]
    tail = tok("on dots").input_ids[1:]  # words and the end token
    assert pos == len(red) and ids[:pos] == red and ids[pos + 1 : pos + 1 + len(tail)] == tail
    assert split_at("a red square", "circle") == ("", "a red square")
    assert placeholder_ids(tok, "", "a red square")[1] == 1 and len(plain) < tok.model_max_length
    text, positions = word_slot(pipe, before, after)  # concept inversion's caption: a placeholder word there
    ids = tok(text).input_ids
    assert positions == [[len(red)]] and ids[: len(red)] == red and ids[len(red) + 1 :] == tail


def test_mma_diffusion_never_uses_a_banned_token(attack_pipes):
    _, erased_pipe = attack_pipes
    tok = erased_pipe.tokenizer
    attack = ATTACKS.get("mma-diffusion")(tokens=4, steps=3, topk=8, batch=16, banned_words=("red",))
    result = attack.run(erased_pipe, "circle", ["a red circle"], generation=GEN, progress=False)
    pieces = [tok.convert_ids_to_tokens(t).replace("</w>", "") for t in result.adversarial[0].meta["tokens"]]
    assert not any("circle" in p or "red" in p for p in pieces)
    assert result.adversarial[0].loss <= 2.0


SD_AND_FLUX = ("pund", "mma-diffusion")  # ported to Flux only (tests/test_attacks_flux_learned.py)
TEXT_ONLY = ("no-attack", "riatig", "synonyms")  # change the prompt's text only; every family
EVERY_ENCODER = ("unlearndiffatk", "p4d-n", "p4d-k", "ring-a-bell", "concept-inversion")  # token attacks over every text encoder at once (efface.models.slots); every family


def _tiny(family):
    from families import build

    pipe = build(family)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_token_attacks_refuse_other_families_before_any_work_saying_why(attack_pipes):
    original, _ = attack_pipes
    sdxl = _tiny("sdxl")
    for name in sorted(TINY):
        cls = ATTACKS.get(name)
        if name in TEXT_ONLY + EVERY_ENCODER:
            assert cls.families == {"sd", "sdxl", "sd3", "flux"}
            continue
        expected = {"sd", "flux"} if name in SD_AND_FLUX else {"sd"}
        assert cls.families == expected and set(cls.family_notes) == {"sdxl", "sd3", "flux"}
        with pytest.raises(InputError, match=f"{name} supports {', '.join(sorted(expected))} models, not sdxl: .*CLIP"):
            cls(**TINY[name]).run(sdxl, "circle", PROMPTS, original=sdxl, generation=GEN, progress=False)
    with pytest.raises(InputError, match=r"not sdxl \(the original model\)"):  # the original is checked too
        ATTACKS.get("pund")(**TINY["pund"]).run(original, "circle", PROMPTS, original=sdxl, generation=GEN,
                                                progress=False)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_text_only_attacks_run_on_every_family(family):
    pipe = _tiny(family)
    for name in TEXT_ONLY:
        result = ATTACKS.get(name)(**TINY[name]).run(pipe, "circle", PROMPTS, original=pipe, generation=GEN,
                                                     progress=False, features=pixel_features)
        assert len(result.images) == len(PROMPTS) and result.images[0].size == (32, 32)


@pytest.mark.parametrize("name", ["concept-inversion", "unlearndiffatk"])
def test_denoising_attacks_regress_the_models_own_target_on_v_prediction(name, monkeypatch):
    """The regression target is add_noise's (v on a v-prediction model): a denoiser that outputs
    exactly that target has zero loss."""
    import importlib

    module = importlib.import_module(f"efface.attacks.{name.replace('-', '_')}")
    pipe, seen = _tiny("sd2-v"), []
    add_noise, predict = module.add_noise, module.predict

    def recording(*args):
        x_t, target = add_noise(*args)
        seen.append(target)
        return x_t, target

    def oracle(pipe, x_t, t, cond, *args, **kwargs):
        return seen[-1] + 0 * predict(pipe, x_t, t, cond, *args, **kwargs)  # keeps the graph to the prompt

    monkeypatch.setattr(module, "add_noise", recording)
    monkeypatch.setattr(module, "predict", oracle)
    result = ATTACKS.get(name)(**TINY[name]).run(pipe, "circle", PROMPTS, original=pipe, generation=GEN,
                                                 progress=False)
    assert seen and all(a.loss == 0.0 for a in result.adversarial)
