"""SalUn: the saliency mask keeps the stated fraction, only masked-in weights train, the forget term
maps the concept onto its pseudo prompt, the retain prompts are the preserved concepts."""

from __future__ import annotations

import pytest
import torch

from efface.errors import InputError
from efface.methods import ErasureRequest, erase
from efface.methods.salun import SalUn, SalUnConfig, guided_forget_loss, saliency_masks
from efface.models.diffusion import predict
from efface.models.params import select
from efface.models.text import encode

from conftest import build_tiny_pipeline

FAST = {"iterations": 3, "lr": 1e-3, "batch_size": 2, "num_images": 4, "sample_steps": 2, "templates": ("{}",)}


def test_saliency_mask_keeps_the_largest_fraction_over_all_tensors():
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(10, 7, generator=g), "b": 5 * torch.randn(33, generator=g), "c": torch.randn(2, 2, 2)}
    masks = saliency_masks(grads, 0.3)
    total = sum(v.numel() for v in grads.values())
    kept = torch.cat([grads[k].abs().flatten()[masks[k].flatten() > 0] for k in grads])
    dropped = torch.cat([grads[k].abs().flatten()[masks[k].flatten() == 0] for k in grads])
    assert len(kept) == int(0.3 * total)  # floor, as the official ranking
    assert kept.min() >= dropped.max()  # one global threshold, not one per tensor
    assert masks["b"].mean() > masks["a"].mean()  # the larger tensor-wide gradients win more entries
    assert all(masks[k].shape == grads[k].shape and set(masks[k].unique().tolist()) <= {0.0, 1.0} for k in grads)


def test_guided_forget_loss_is_the_negative_error_of_the_guided_prediction():
    pipe = build_tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    x_t, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([100, 700])
    c, u = encode(pipe, ["circle", "circle"]), encode(pipe, ["", ""])
    with torch.no_grad():
        e_c, e_u = predict(pipe, x_t, t, c), predict(pipe, x_t, t, u)
        got = guided_forget_loss(pipe, x_t, t, noise, c, u, 7.5)
    torch.testing.assert_close(got, -((noise - (8.5 * e_c - 7.5 * e_u)) ** 2).mean(), rtol=1e-4, atol=1e-6)


def test_only_salient_weights_change_and_hooks_are_removed():
    pipe = build_tiny_pipeline()
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    erased = erase(pipe, "salun", ["circle"], preserve=["square"], progress=False, mask_ratio=0.1, **FAST)
    total = sum(p.numel() for p in before.values())
    changed = sum(int((v != before[k.removeprefix("unet.")]).sum()) for k, v in erased.tensors.items())
    assert 0 < changed <= int(0.1 * total)
    assert all(not p._backward_hooks for p in pipe.unet.parameters())  # the masking hooks are gone


def test_forget_term_brings_the_concept_to_its_pseudo_prompt():
    pipe = build_tiny_pipeline()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 16, 16, generator=g), torch.tensor([200, 400, 600, 800])
    c, p = encode(pipe, ["circle"]), encode(pipe, [""])

    def gap() -> float:
        with torch.no_grad():
            return float((predict(pipe, x, t, c) - predict(pipe, x, t, p)).norm())

    base = gap()
    erased = erase(pipe, "salun", ["circle"], progress=False, **{**FAST, "alpha": 0.0, "iterations": 20,
                                                                  "lr": 1e-4, "num_images": 16})
    with erased.applied(pipe):
        assert gap() < 0.7 * base


def test_retain_prompts_are_the_preserved_concepts_then_the_anchor():
    method = SalUn(templates=("a {}", "a red {}"))
    forget, retain = method.prompts(ErasureRequest.build(["circle"], "square", ["star", "heart"]))
    assert forget == [("a circle", "a square"), ("a red circle", "a red square")]
    assert retain == ["a star", "a red star", "a heart", "a red heart", "a square", "a red square"]
    assert method.prompts(ErasureRequest.build(["circle"]))[1] == ["a", "a red"]  # nothing named: the anchor ""


def test_salun_config_refuses_bad_values():
    with pytest.raises(InputError, match="mask_ratio"):
        SalUnConfig(mask_ratio=0)
    with pytest.raises(InputError, match="alpha"):
        SalUnConfig(alpha=-1)
    with pytest.raises(InputError, match="retain_target"):
        SalUnConfig(retain_target="frozen")
    with pytest.raises(InputError, match=r"\{\}"):
        SalUnConfig(templates=("no slot",))


@pytest.mark.parametrize("family", ["sd2-v", "sdxl", "sd3", "flux"])
def test_salun_on_other_families_trains_only_the_denoiser_and_moves_the_concept(family_pipe, family):
    """v-prediction, SDXL's two encoders and pooled embedding, flow matching: only the denoiser's
    masked-in weights change (no text encoder) and the concept's prediction moves. (The tiny random
    models barely read the text, so the direction is checked on SD above, not here.)"""
    from efface.models.families import family_of

    pipe = family_pipe(family)
    fam = family_of(pipe)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, *fam.latent_shape(pipe), generator=g), torch.tensor([300, 700])
    c = encode(pipe, ["circle"])
    with torch.no_grad():
        before = predict(pipe, x, t, c)
    weights = {k: v.detach().clone() for k, v in select(pipe, "all").items()}
    erased = erase(pipe, "salun", ["circle"], preserve=["square"], progress=False, mask_ratio=0.1, **FAST)
    assert erased.tensors and set(erased.tensors) <= set(weights)
    assert all(k.startswith(f"{fam.denoiser_name}.") for k in erased.tensors)
    changed = sum(int((v != weights[k]).sum()) for k, v in erased.tensors.items())
    assert 0 < changed <= int(0.1 * sum(w.numel() for w in weights.values()))  # the mask's share at most
    assert erased.manifest["base"]["family"] == fam.name
    with erased.applied(pipe), torch.no_grad():
        after = predict(pipe, x, t, c)
    assert not torch.allclose(after, before)
    assert all(torch.equal(p, weights[k]) for k, p in select(pipe, "all").items())  # the base is as it was
