"""Receler's maths on the tiny pipeline: zero-init erasers, the concept-localised regulariser, the
attention masks, and adversarial soft prompts that really reach the erasure loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efface.errors import InputError
from efface.methods import erase
from efface.methods.esd import esd_target
from efface.methods.receler import ReceLerErasers, adversarial_embedding, attack_steps
from efface.methods.receler_maps import concept_attention, concept_masks, localisation_loss
from efface.models.diffusion import predict
from efface.models.text import encode

from conftest import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def _x(seed: int = 0, n: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _erasers(pipe, seed: int = 0, scale: float = 0.0) -> ReceLerErasers:
    g = torch.Generator().manual_seed(seed)
    erasers = ReceLerErasers.for_pipe(pipe, rank=8)
    for e in erasers.erasers.values():
        e.init_(g)
        with torch.no_grad():  # a non-zero up projection, as after training
            e.up.weight.copy_(torch.randn(e.up.weight.shape, generator=g) * scale)
    return erasers


def test_erasers_start_at_zero_so_the_model_starts_as_the_base(pipe):
    erasers = _erasers(pipe)
    for e in erasers.erasers.values():
        o = torch.randn(3, 5, e.down.in_features)
        assert torch.equal(e(o), torch.zeros_like(o))
    assert all(e.down.weight.abs().sum() > 0 for e in erasers.erasers.values())  # only the up projection is zero
    c = encode(pipe, ["a circle"])
    with torch.no_grad():
        base = predict(pipe, _x(), 500, c)
        with erasers.installed(pipe):
            assert len(erasers.dims) == sum(k.endswith("attn2.processor") for k in pipe.unet.attn_processors)
            same = predict(pipe, _x(), 500, c)
    torch.testing.assert_close(same, base, rtol=0, atol=0)


def test_trained_erasers_change_the_output_and_are_removed(pipe):
    erasers = _erasers(pipe, scale=1.0)
    c = encode(pipe, ["a circle"])
    with torch.no_grad():
        base = predict(pipe, _x(), 500, c)
        with erasers.installed(pipe):
            changed = predict(pipe, _x(), 500, c)
            erasers.active = False  # the original model, as the training's e_0 / e_p pass sees it
            off = predict(pipe, _x(), 500, c)
        again = predict(pipe, _x(), 500, c)
    assert not torch.allclose(changed, base)
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    torch.testing.assert_close(again, base, rtol=0, atol=0)


def test_regulariser_is_zero_inside_the_mask_and_positive_outside():
    mask = torch.zeros(2, 16)
    mask[:, 3:7] = 1
    e = torch.randn(2, 16, 4)
    assert localisation_loss({"l": e * mask[..., None]}, {"l": mask}) == 0
    assert localisation_loss({"l": e}, {"l": mask}) > 0
    # the official normalisation: channel mean of the squares, summed over outside positions / their number
    expected = (e[:, ~mask[0].bool()] ** 2).mean(-1).mean()
    torch.testing.assert_close(localisation_loss({"l": e}, {"l": mask}), expected)


def test_masks_threshold_the_normalised_map_at_the_chosen_resolution():
    fine = torch.zeros(1, 16)  # 4x4 map: one hot position, the rest at 5 % of it
    fine[0, 2], fine[0, [0, 1]] = 1.0, 0.05  # hot at row 0, column 2
    coarse = torch.rand(1, 4)  # 2x2 layer: ignored for the mask, gets it resized
    masks = concept_masks({"fine": fine, "coarse": coarse}, (4, 4), resolution=4, threshold=0.1)
    assert masks["fine"].sum() == 1 and masks["fine"][0, 2] == 1
    assert masks["coarse"].shape == (1, 4) and masks["coarse"][0, 1] == 1 and masks["coarse"].sum() == 1
    low = concept_masks({"fine": fine}, (4, 4), resolution=4, threshold=0.04)["fine"]
    assert low.sum() == 3  # 0.05 is above 0.04 after min-max normalisation


def test_concept_attention_is_a_softmax_over_text_positions(pipe):
    attn = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    hidden, context = torch.randn(2, 256, 4), encode(pipe, ["a circle", "a square"]).embeds
    every = concept_attention(attn, hidden, context, torch.arange(context.shape[1]))
    torch.testing.assert_close(every, torch.full_like(every, 1 / context.shape[1]))  # rows sum to 1
    one = concept_attention(attn, hidden, context, torch.tensor([2]))
    assert one.shape == (2, 256) and (one > 0).all() and (one < 1).all()


def _attack_setup(pipe):
    c = encode(pipe, ["circle"])
    x_t, t = _x(1, 2), 400
    with torch.no_grad():
        e_p = predict(pipe, x_t, t, c)  # the original model's concept prediction
    prompt = torch.nn.Parameter(torch.rand(1, 4, c.shape[-1], generator=torch.Generator().manual_seed(3)))
    return c.expand(2), x_t, t, e_p, prompt


def test_adversarial_steps_lower_the_attack_loss(pipe):
    """The attack makes the erased model regenerate the concept: || eps'(c_adv) - e_p || goes down."""
    erasers = _erasers(pipe, scale=2.0)
    c, x_t, t, e_p, prompt = _attack_setup(pipe)
    attack = torch.optim.Adam([prompt], lr=0.1, weight_decay=0.1)

    def recovery() -> float:
        with torch.no_grad():
            return float(F.mse_loss(predict(pipe, x_t, t, c.with_embeds(adversarial_embedding(c.embeds, 2, prompt))),
                                    e_p))

    with erasers.installed(pipe):
        before = recovery()
        attack_steps(pipe, prompt, attack, x_t, t, c, 2, e_p, steps=15)
        after = recovery()
    assert after < 0.9 * before
    assert all(p.grad is None for p in erasers.parameters())  # the attack does not train the erasers


def test_adversarial_prompt_reaches_the_erasure_loss(pipe):
    """The official ``emb[:, idx, :].data = P.data`` leaves the embedding clean (advanced indexing
    returns a copy); here the soft tokens enter the erased model and the erasure loss's gradient."""
    c, x_t, t, e_p, prompt = _attack_setup(pipe)
    start, idx = 2, torch.arange(2, 6)
    official = c.embeds.detach().clone()
    official[:, idx, :].data = prompt.data.expand(2, -1, -1)
    assert torch.equal(official, c.embeds)  # the released code's bug: the soft tokens never arrive
    c_adv = adversarial_embedding(c.embeds, start, prompt)
    assert torch.equal(c_adv[:, idx], prompt.detach().expand(2, -1, -1))
    assert torch.equal(c_adv[:, :start], c.embeds[:, :start]) and torch.equal(c_adv[:, 6:], c.embeds[:, 6:])

    erasers = _erasers(pipe, scale=1.0)
    target = esd_target(predict(pipe, x_t, t, encode(pipe, [""])).detach(), e_p, 1.0)
    params = list(erasers.parameters())
    with erasers.installed(pipe):
        erasers.requires_grad_(True)
        e_clean = predict(pipe, x_t, t, c)
        g_clean = torch.autograd.grad(F.mse_loss(e_clean, target), params)
        attack = torch.optim.Adam([prompt], lr=0.1)
        e_n = attack_steps(pipe, prompt, attack, x_t, t, c, start, e_p, steps=2)
        g_adv = torch.autograd.grad(F.mse_loss(e_n, target), params)
        loss_of_prompt = F.mse_loss(predict(pipe, x_t, t, c.with_embeds(adversarial_embedding(c.embeds, start, prompt))),
                                    target)
        (g_prompt,) = torch.autograd.grad(loss_of_prompt, prompt)
    assert not torch.allclose(e_n, e_clean)
    assert any(not torch.allclose(a, b) for a, b in zip(g_adv, g_clean))
    assert g_prompt.abs().sum() > 0


def test_multi_concept_and_input_checks(pipe):
    fast = {"iterations": 2, "lr": 1e-2, "ddim_steps": 4, "batch_size": 1, "rank": 4, "adversarial_steps": 1,
            "adversarial_tokens": 2}
    erased = erase(pipe, "receler", ["circle", "square"], seed=0, progress=False, **fast)
    assert erased.adapter is not None and not erased.tensors
    with pytest.raises(InputError, match="adversarial_tokens"):
        erase(pipe, "receler", ["circle"], progress=False, **{**fast, "adversarial_tokens": 30})
    with pytest.raises(InputError, match="mask_resolution"):
        erase(pipe, "receler", ["circle"], progress=False, **{**fast, "mask_resolution": 5})
    with pytest.raises(InputError, match="mask_threshold"):
        erase(pipe, "receler", ["circle"], progress=False, **{**fast, "mask_threshold": 2.0})


def test_receler_runs_on_sdxl_through_the_seam(family_pipe):
    """On the tiny SDXL pipeline: erasers after every cross-attention module, no base tensor changed,
    the installed erasers change the prediction and come off exactly; SD's mask resolution is refused
    with the sides this UNet has."""
    from efface.models.params import named_parameters

    sdxl = family_pipe("sdxl")
    for _, _, p in named_parameters(sdxl):  # as fit() leaves it (see test_doco_runs_on_sdxl_through_the_seam)
        p.requires_grad_(False)
    fast = {"iterations": 2, "lr": 1e-2, "ddim_steps": 4, "batch_size": 2, "rank": 4, "adversarial_steps": 1,
            "adversarial_tokens": 2}

    def eps() -> torch.Tensor:
        with torch.no_grad():
            return predict(sdxl, _x(), 500, encode(sdxl, ["a circle"]))

    state = {f"{c}.{n}": p.detach().clone() for c, n, p in named_parameters(sdxl)}
    base = eps()
    with pytest.raises(InputError, match="mask_resolution=16: .*\\[8\\]"):
        erase(sdxl, "receler", ["circle"], progress=False, **fast)
    erased = erase(sdxl, "receler", ["circle"], seed=0, progress=False, mask_resolution=8, **fast)
    assert not erased.tensors and erased.manifest["base"]["family"] == "sdxl"
    assert all(torch.equal(p, state[f"{c}.{n}"]) for c, n, p in named_parameters(sdxl))
    assert len(erased.adapter.dims) == sum(k.endswith("attn2.processor") for k in sdxl.unet.attn_processors)
    with erased.applied(sdxl):
        changed = eps()
    assert torch.isfinite(changed).all() and not torch.allclose(changed, base)
    torch.testing.assert_close(eps(), base, rtol=0, atol=0)


def test_flux_joint_attention_probabilities_are_the_processors(family_pipe):
    """The mask's image-to-text probabilities on Flux are those the double-stream processor attends
    with: probabilities times the values (text then image), through to_out, give its image output."""
    from efface.methods.receler_maps import eraser_sites, joint_probabilities

    pipe = family_pipe("flux")
    den = pipe.transformer
    key = next(iter(eraser_sites(pipe)))
    attn = den.get_submodule(key.removesuffix(".processor"))
    g = torch.Generator().manual_seed(0)
    dim = attn.to_q.in_features
    hidden, context = torch.randn(1, 16, dim, generator=g), torch.randn(1, 5, dim, generator=g)
    ids = torch.cat([torch.zeros(5, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0),
                                                                   torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3)])
    rotary = den.pos_embed(ids)
    with torch.no_grad():
        image_out, _ = attn(hidden, context, image_rotary_emb=rotary)
        probs = joint_probabilities(attn, hidden, context, rotary)
        v = torch.cat([attn.add_v_proj(context), attn.to_v(hidden)], 1).unflatten(-1, (-1, attn.head_dim))
        mixed = torch.einsum("bhnm,bmhd->bnhd", probs, v.float()).flatten(2)
    torch.testing.assert_close(attn.to_out[0](mixed), image_out, rtol=1e-4, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(()))


def test_receler_on_flux_puts_erasers_on_the_double_blocks_image_stream(family_pipe):
    from efface.methods.receler_maps import attention_sides, eraser_sites

    pipe = family_pipe("flux")
    sites = eraser_sites(pipe)
    assert sites and all(k.startswith("transformer_blocks.") for k in sites)  # double-stream blocks only
    assert attention_sides(pipe) == {8}  # 16 x 16 latents, one token per 2 x 2 patch
    erased = erase(pipe, "receler", ["circle"], seed=0, progress=False, iterations=2, ddim_steps=4, rank=4,
                   adversarial_steps=1, adversarial_tokens=2, mask_resolution=8)
    with erased.applied(pipe):
        out = predict(pipe, torch.zeros(1, 16, 16, 16), 500, encode(pipe, ["a circle"]))
    assert torch.isfinite(out).all()
