"""AdvUnlearn's pieces: the prefix attack edits only its k slots and brings the concept back (lowers
its own loss); the default trains only text-encoder layers; the retain term holds preserved prompts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efface.errors import InputError
from efface.methods import erase
from efface.methods.advunlearn import AdvUnlearnConfig, adversarial_condition, prefix_attack, prefixed_ids
from efface.models.diffusion import predict_noise
from efface.models.text import encode, token_embedding

from conftest import build_tiny_pipeline

FAST = {"preset": "toy", "iterations": 4, "warmup_iter": 2, "attack_step": 2, "lr": 1e-2, "ddim_steps": 4,
        "batch_size": 2, "retain_batch": 2, "progress": False}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def test_prefixed_ids_put_k_slots_between_start_and_prompt(pipe):
    tok = pipe.tokenizer
    ids = prefixed_ids(tok, "a red circle", 2)[0].tolist()
    prompt = tok("a red circle").input_ids
    assert ids[:3] == [tok.bos_token_id, tok.pad_token_id, tok.pad_token_id]
    assert ids[3 : 3 + len(prompt) - 1] == prompt[1:]  # the prompt's tokens and its end token
    assert len(ids) == tok.model_max_length


def test_adversarial_condition_changes_only_the_k_slots(pipe):
    """The attack's budget is k token embeddings: with the slots' own embeddings the conditioning is
    exactly the plain encoding, and only through the slots does it change."""
    te = pipe.text_encoder
    ids = prefixed_ids(pipe.tokenizer, "a circle", 3)
    own = token_embedding(te).weight[ids[0, 1:4]].detach()
    with torch.no_grad():
        plain = te(ids)[0]
        same = adversarial_condition(te, ids, own)
        moved = adversarial_condition(te, ids, own + 1.0)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    assert torch.equal(moved[:, 0], plain[:, 0])  # the start token sees nothing after it (causal)
    assert not torch.allclose(moved[:, 1:], plain[:, 1:])


@pytest.mark.parametrize("signed", [False, True])
def test_prefix_attack_brings_the_concept_prediction_closer(pipe, signed):
    unet, te = pipe.unet, pipe.text_encoder
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500)
    with torch.no_grad():
        e_p = predict_noise(unet, x_t, t, encode(pipe, ["a circle"])) + 0.1 * torch.randn(2, 4, 16, 16, generator=g)
    ids = prefixed_ids(pipe.tokenizer, "a circle", 2)
    start = token_embedding(te).weight[torch.tensor([5, 9])].detach()

    def attack_loss(adv):
        with torch.no_grad():
            return float(F.mse_loss(predict_noise(unet, x_t, t, adversarial_condition(te, ids, adv)), e_p))

    adv, losses = prefix_attack(te, unet, ids, start, lambda: (x_t, t, e_p), 20, 0.05, signed)
    assert adv.shape == start.shape
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
            return c, predict_noise(pipe.unet, x_t, t, c)

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
