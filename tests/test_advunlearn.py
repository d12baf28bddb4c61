"""AdvUnlearn's pieces: the prefix attack edits only its k slots and brings the concept back (lowers
its own loss); the default trains only text-encoder layers; the retain term holds preserved prompts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efface.errors import InputError
from efface.methods import erase
from efface.methods.advunlearn import AdvUnlearnConfig, prefix_attack
from efface.models.slots import prefixed_condition, prefixed_prompt
from efface.models.diffusion import predict
from efface.models.params import select
from efface.models.text import encode, token_embedding
from efface.toy.presets import method_preset

from conftest import build_tiny_pipeline

FAST = {"preset": method_preset("advunlearn"), "iterations": 4, "warmup_iter": 2, "attack_step": 2, "lr": 1e-2,
        "ddim_steps": 4, "batch_size": 2, "retain_batch": 2, "progress": False}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def test_prefixed_prompt_puts_k_slots_between_start_and_prompt(pipe):
    tok = pipe.tokenizer
    ids = tok(prefixed_prompt(pipe, "a red circle", 2)).input_ids
    prompt = tok("a red circle").input_ids
    assert ids[0] == tok.bos_token_id and ids[1] == ids[2] not in (tok.bos_token_id, tok.eos_token_id)
    assert ids[3:] == prompt[1:]  # the prompt's tokens and its end token


def test_adversarial_condition_changes_only_the_k_slots(pipe):
    """The attack's budget is k token embeddings: with the slots' own embeddings the conditioning is
    exactly the plain encoding, and only through the slots does it change."""
    text = prefixed_prompt(pipe, "a circle", 3)
    ids = torch.tensor(pipe.tokenizer(text).input_ids)
    own = token_embedding(pipe.text_encoder).weight[ids[1:4]].detach()
    with torch.no_grad():
        plain = encode(pipe, [text]).embeds
        same = prefixed_condition(pipe, text, [own]).embeds
        moved = prefixed_condition(pipe, text, [own + 1.0]).embeds
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    assert torch.equal(moved[:, 0], plain[:, 0])  # the start token sees nothing after it (causal)
    assert not torch.allclose(moved[:, 1:], plain[:, 1:])


@pytest.mark.parametrize("signed", [False, True])
def test_prefix_attack_brings_the_concept_prediction_closer(pipe, signed):
    unet, te = pipe.unet, pipe.text_encoder
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500)
    with torch.no_grad():
        e_p = predict(pipe, x_t, t, encode(pipe, ["a circle"])) + 0.1 * torch.randn(2, 4, 16, 16, generator=g)
    text = prefixed_prompt(pipe, "a circle", 2)
    start = [token_embedding(te).weight[torch.tensor([5, 9])].detach()]

    def attack_loss(adv):
        with torch.no_grad():
            return float(F.mse_loss(predict(pipe, x_t, t, prefixed_condition(pipe, text, adv)), e_p))

    adv, losses = prefix_attack(pipe, text, start, lambda: (x_t, t, e_p), 20, 0.05, signed)
    assert len(adv) == 1 and adv[0].shape == start[0].shape
    assert attack_loss(adv) < attack_loss(start)
    assert losses[0] == pytest.approx(attack_loss(start), rel=1e-5)
    assert all(p.grad is None for p in [*unet.parameters(), *te.parameters()])  # the model gets no gradient


def test_default_trains_only_text_encoder_layers(pipe):
    erased = erase(pipe, "advunlearn", ["circle"], preserve=["square"], seed=0, **FAST)
    assert erased.tensors
    assert all(k.startswith("text_encoder.") for k in erased.tensors)
    assert not any(".embeddings." in f".{k.partition('.')[2]}" for k in erased.tensors)
    assert any("final_layer_norm" in k for k in erased.tensors)


def test_unet_train_method_changes_only_that_unet_set(pipe):
    erased = erase(pipe, "advunlearn", ["circle"], preserve=["square"], seed=0, train_method="xattn", **FAST)
    assert erased.tensors
    assert all(k.startswith("unet.") and ".attn2." in k for k in erased.tensors)


def test_retain_loss_holds_the_preserved_prompts(pipe):
    """Same schedule with and without the utility-retaining term: with it, the preserved prompt's
    encoding and the UNet's prediction on it move less (on the tiny model "circle" and "square"
    embed nearly alike, so without the term they move alike)."""
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor(500)

    def state():
        with torch.no_grad():
            c = encode(pipe, ["square"])
            return c.embeds, predict(pipe, x_t, t, c)

    (c0, e0) = state()

    def drift(weight: float) -> tuple[float, float]:
        erased = erase(pipe, "advunlearn", ["circle"], preserve=["square"], seed=0,
                       **{**FAST, "iterations": 6, "lr": 1e-3, "retain_loss_w": weight, "templates": ("{}",),
                          "retain_templates": ("{}",)})
        with erased.applied(pipe):
            c, e = state()
        return float((c - c0).norm() / c0.norm()), float((e - e0).norm() / e0.norm())

    held, free = drift(3.0), drift(0.0)
    assert held[0] < 0.7 * free[0] and held[1] < 0.7 * free[1]


def test_refuses_a_prompt_without_room_for_the_prefix(pipe):
    with pytest.raises(InputError, match="adv_prompt_num"):
        erase(pipe, "advunlearn", ["circle"], seed=0, **{**FAST, "adv_prompt_num": pipe.tokenizer.model_max_length})


def test_config_refuses_bad_values():
    with pytest.raises(InputError, match="train_method"):
        AdvUnlearnConfig(train_method="text_encoder_layer0")
    with pytest.raises(InputError, match="attack_method"):
        AdvUnlearnConfig(attack_method="free_at")
    with pytest.raises(InputError, match="attack_step"):
        AdvUnlearnConfig(attack_step=0)
    with pytest.raises(InputError, match="retain_templates"):
        AdvUnlearnConfig(retain_templates=("a photo",))


def test_an_attack_starts_even_when_warmup_ends_off_the_update_grid(pipe):
    erased = erase(pipe, "advunlearn", ["circle"], seed=0, **{**FAST, "warmup_iter": 1, "adv_prompt_update_step": 2})
    assert erased.tensors


# --- other model families ------------------------------------------------------------------------------


def test_sdxl_attack_perturbs_both_text_encoders(family_pipe):
    """On SDXL each encoder has its own table: with the slots' own rows in both the conditioning is the
    plain encoding; a perturbation in the second encoder's slots alone moves its states and the pooled
    embedding, not the first encoder's part of the sequence."""
    pipe = family_pipe("sdxl")
    text = prefixed_prompt(pipe, "a circle", 2)
    own = []
    for tok, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = torch.tensor(tok(text).input_ids)
        own.append(token_embedding(te).weight[ids[1:3]].detach())
    width = pipe.text_encoder.config.hidden_size
    with torch.no_grad():
        plain = encode(pipe, [text])
        same = prefixed_condition(pipe, text, own)
        moved = prefixed_condition(pipe, text, [own[0], own[1] + 1.0])
    torch.testing.assert_close(same.embeds, plain.embeds, rtol=0, atol=0)
    torch.testing.assert_close(same.pooled, plain.pooled, rtol=0, atol=0)
    assert torch.equal(moved.embeds[..., :width], plain.embeds[..., :width])
    assert not torch.allclose(moved.embeds[..., width:], plain.embeds[..., width:])
    assert not torch.allclose(moved.pooled, plain.pooled)
    with pytest.raises(ValueError, match="2 text encoders"):
        prefixed_condition(pipe, text, own[:1])


@pytest.mark.parametrize("family,encoders", [("sd2-v", ("text_encoder",)), ("sdxl", ("text_encoder", "text_encoder_2"))])
def test_default_trains_every_text_encoders_layers_and_moves_the_concept(family_pipe, family, encoders):
    pipe = family_pipe(family)
    declared = {k: v.detach().clone() for k, v in select(pipe, "text_encoder_layers").items()}
    with torch.no_grad():
        before = encode(pipe, ["circle"])
    erased = erase(pipe, "advunlearn", ["circle"], preserve=["square"], seed=0, **{**FAST, "lr": 1e-3})
    assert erased.tensors and set(erased.tensors) <= set(declared)
    assert {k.partition(".")[0] for k in erased.tensors} == set(encoders)  # SDXL: both encoders are trained
    assert not any(".embeddings." in f".{k.partition('.')[2]}" for k in erased.tensors)
    assert erased.manifest["base"]["family"] == {"sd2-v": "sd"}.get(family, family)
    with erased.applied(pipe), torch.no_grad():
        after = encode(pipe, ["circle"])
    assert not torch.allclose(after.embeds, before.embeds)
    if before.pooled is not None:
        assert not torch.allclose(after.pooled, before.pooled)
    assert all(torch.equal(p, declared[k]) for k, p in select(pipe, "text_encoder_layers").items())


def test_sdxl_unet_train_method_changes_only_that_unet_set(family_pipe):
    pipe = family_pipe("sdxl")
    erased = erase(pipe, "advunlearn", ["circle"], preserve=["square"], seed=0, train_method="xattn", **FAST)
    assert erased.tensors and set(erased.tensors) <= set(select(pipe, "xattn"))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_on_clip_and_t5_families_the_text_encoders_are_trained_with_t5_slots(family_pipe, family):
    """On SD3 / Flux the plug-in text encoders are CLIP and T5: text_encoder_full trains the layers of
    both (and only them), with the attack's slots in both."""
    pipe = family_pipe(family)
    erased = erase(pipe, "advunlearn", ["circle"], seed=0, **FAST)
    changed = {n.split(".")[0] for n in erased.tensors}
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    assert {"text_encoder", t5} <= changed, changed
    assert not any(n.startswith("transformer") for n in changed)
