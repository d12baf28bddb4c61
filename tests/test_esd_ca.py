"""ESD and Concept Ablation on the tiny pipeline: the targets they regress to, the parameters they
train, seeded partial DDIM sampling and divergence handling."""

from __future__ import annotations

import math

import pytest
import torch

import efface.methods.ca as ca_module
import efface.methods.esd as esd_module
from efface.errors import InputError, TrainingDiverged
from efface.methods import erase
from efface.methods.ca import ConceptAblation, prompt_pairs
from efface.methods.esd import esd_target
from efface.models.diffusion import frozen_copy, initial_latents, predict, sample_to, sampler, train_steps
from efface.models.params import named_parameters, select
from efface.models.text import encode

FAST_ESD = {"iterations": 2, "lr": 1e-2, "ddim_steps": 3, "batch_size": 2}
FAST_CA = {"iterations": 2, "lr": 1e-2, "batch_size": 2, "num_anchor_images": 2, "anchor_steps": 2}


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    from efface import load_pipeline

    return load_pipeline(tiny_sd_dir)


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c, n, p in named_parameters(pipe)}


class _Recorder(torch.nn.Module):
    """Wraps a UNet and records every call's inputs and output."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    @property
    def device(self) -> torch.device:  # read by the seam's predict, as of a real denoiser
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x, t, encoder_hidden_states):
        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states)
        self.calls.append((x.clone(), t.clone() if isinstance(t, torch.Tensor) else t,
                           encoder_hidden_states.clone(), out.sample.clone()))
        return out


def test_esd_target_is_negative_guidance_away_from_the_concept():
    e_0, e_p = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(esd_target(e_0, e_p, 1.5), e_0 - 1.5 * (e_p - e_0))
    torch.testing.assert_close(esd_target(e_0, e_p, 0.0), e_0)  # eta = 0: map the concept to ""
    # the target lies on the line through e_p and e_0, on the far side of e_0
    torch.testing.assert_close(esd_target(e_0, e_p, 1.0) - e_0, e_0 - e_p)


def test_esd_regresses_onto_the_frozen_original_model(pipe, monkeypatch):
    seen = []
    real = esd_module.esd_target
    monkeypatch.setattr(esd_module, "esd_target", lambda e_0, e_p, eta: seen.append((e_0, e_p)) or real(e_0, e_p, eta))
    frozen = []
    monkeypatch.setattr(esd_module, "frozen_copy", lambda m: frozen.append(_Recorder(frozen_copy(m))) or frozen[-1])
    erase(pipe, "esd-x", ["circle"], seed=0, progress=False, **{**FAST_ESD, "iterations": 3})
    (recorder,) = frozen
    assert len(recorder.calls) == len(seen) == 3
    empty, circle = encode(pipe, [""]), encode(pipe, ["circle"])
    for (x, t, emb, out), (e_0, e_p) in zip(recorder.calls, seen):
        # the pipeline is the original again: the frozen predictions are the original model's ...
        with torch.no_grad():
            again = pipe.unet(x, t, encoder_hidden_states=emb).sample
        torch.testing.assert_close(out, again)
        # ... for "" then the concept, on the same x_t
        n = len(x) // 2
        torch.testing.assert_close(emb[:n], empty.embeds.expand(n, -1, -1))
        torch.testing.assert_close(emb[n:], circle.embeds.expand(n, -1, -1))
        torch.testing.assert_close(torch.cat([e_0, e_p]), out)


@pytest.mark.parametrize("name, parameter_set", [("esd-x", "xattn"), ("esd-x-strict", "xattn_kv"),
                                                 ("esd-u", "noxattn"), ("esd-all", "all")])
def test_each_esd_variant_trains_exactly_its_parameter_set(pipe, name, parameter_set):
    erased = erase(pipe, name, ["circle"], seed=0, progress=False, **FAST_ESD)
    assert set(erased.tensors) == set(select(pipe, parameter_set))


def test_esd_x_strict_is_cross_attention_keys_and_values_only(pipe):
    keys = set(select(pipe, "xattn_kv"))
    assert keys and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in keys)
    assert any(".attn2.to_q." in k for k in select(pipe, "xattn"))


def test_esd_u_leaves_cross_attention_time_embedding_and_output_layer_alone(pipe):
    keys = set(select(pipe, "noxattn"))
    assert not [k for k in keys if ".attn2." in k or k.startswith(("unet.time_embedding.", "unet.conv_out.",
                                                                   "unet.conv_norm_out."))]
    assert "unet.conv_in.weight" in keys and any(".attn1." in k for k in keys)


def test_partial_ddim_sampling_is_seeded_and_stops_where_asked(pipe):
    cond, uncond = encode(pipe, ["circle"] * 2), encode(pipe, [""])

    def run(seed, stop, steps=4):
        return sample_to(pipe, cond, uncond, stop, steps, 3.0, torch.Generator().manual_seed(seed))

    assert torch.equal(run(0, 2), run(0, 2))
    assert not torch.allclose(run(0, 2), run(1, 2))
    assert not torch.allclose(run(0, 2), run(0, 3))
    # no step: x_T itself; one step: one guided DDIM update from x_T
    x_T = initial_latents(pipe, 2, torch.Generator().manual_seed(0))
    assert torch.equal(run(0, 0), x_T)
    scheduler = sampler(pipe, 4)
    t = scheduler.timesteps[0]
    with torch.no_grad():
        e_u = pipe.unet(x_T, t, encoder_hidden_states=uncond.embeds.expand(2, -1, -1)).sample
        e_c = pipe.unet(x_T, t, encoder_hidden_states=cond.embeds).sample
    expected = scheduler.step(e_u + 3.0 * (e_c - e_u), t, x_T).prev_sample
    torch.testing.assert_close(run(0, 1), expected)
    with pytest.raises(InputError, match="stop_index"):
        run(0, 5)


def test_guided_prediction_is_classifier_free_guidance(pipe):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = encode(pipe, ["circle"]), encode(pipe, [""])
    with torch.no_grad():
        guided = predict(pipe, x, 500, cond, 4.0, uncond)
        e_c, e_u = predict(pipe, x, 500, cond), predict(pipe, x, 500, uncond)
    torch.testing.assert_close(guided, e_u + 4.0 * (e_c - e_u), rtol=1e-4, atol=1e-5)


def test_ca_model_target_is_the_frozen_models_anchor_prediction(pipe, monkeypatch):
    frozen = []
    monkeypatch.setattr(ca_module, "frozen_copy", lambda m: frozen.append(_Recorder(frozen_copy(m))) or frozen[-1])
    erased = erase(pipe, "ca", ["circle"], anchor="square", seed=0, progress=False, **{**FAST_CA, "iterations": 3})
    assert set(erased.tensors) == set(select(pipe, "xattn_kv"))
    (recorder,) = frozen
    assert len(recorder.calls) == 3  # one target per iteration, from the frozen copy
    anchors = encode(pipe, [a for _, a in prompt_pairs("circle", "square", "object", pipe.tokenizer)]).embeds
    for x, t, emb, out in recorder.calls:
        with torch.no_grad():  # the pipeline is the original again
            torch.testing.assert_close(out, pipe.unet(x, t, encoder_hidden_states=emb).sample)
        assert all(any(torch.equal(e, a) for a in anchors) for e in emb)  # conditioned on anchor prompts


def test_ca_noise_variant_needs_no_frozen_model(pipe, monkeypatch):
    monkeypatch.setattr(ca_module, "frozen_copy", lambda m: pytest.fail("noise-based CA copied the model"))
    erased = erase(pipe, "ca", ["circle"], seed=0, progress=False, variant="noise", **FAST_CA)
    assert set(erased.tensors) == set(select(pipe, "xattn_kv"))


def test_ca_prompts_swap_the_anchor_for_the_concept(pipe):
    pairs = prompt_pairs("grumpy cat", "cat", "object")
    assert ("a picture of a grumpy cat", "a picture of a cat") in pairs and ("grumpy cat", "cat") in pairs
    assert {a for _, a in prompt_pairs("circle", "", "object")} == {"", "a", "a picture of a", "an image of a"}
    assert ("a red circle", "a red") in prompt_pairs("circle", "", "object", templates=("a red {}",))
    assert ("a painting, in the style of van gogh", "a painting") in prompt_pairs("van gogh", "painting", "style")
    limit = pipe.tokenizer.model_max_length
    word = "circle " * (limit - 4)  # fits alone, not inside the longer templates
    assert all(len(pipe.tokenizer(t).input_ids) <= limit for t, _ in prompt_pairs(word.strip(), "", "object",
                                                                                  pipe.tokenizer))


def test_ca_options_are_checked_and_select_the_trained_parameters():
    assert ConceptAblation().parameter_set == "xattn_kv"
    assert ConceptAblation(parameters="all").parameter_set == "all"
    with pytest.raises(InputError, match="variant must be one of model, noise"):
        ConceptAblation(variant="kl")


def test_a_non_finite_loss_names_the_method_and_iteration():
    w = torch.nn.Parameter(torch.ones(3))
    losses = iter([1.0, 0.5, math.nan])
    with pytest.raises(TrainingDiverged, match=r"toy: the loss became nan at iteration 3 of 5"):
        train_steps(lambda i: w.sum() * next(losses), [w], 5, lr=0.1, name="toy", progress=False)
    assert w.grad is None


def test_esd_divergence_raises_and_leaves_the_pipeline_as_it_was(pipe):
    before = _state(pipe)
    with pytest.raises(TrainingDiverged, match="esd-x: .* at iteration 1 of 2"):
        erase(pipe, "esd-x", ["circle"], progress=False, **{**FAST_ESD, "negative_guidance": math.nan})
    after = _state(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- Concept Ablation on the other model families ----------------------------------------------------


def test_ca_noise_comes_before_the_timesteps_and_the_target_is_add_noise_s(family_pipe):
    """CA's draws (noise, then timesteps: seeded runs reproduce), through add_noise: on a
    v-prediction model the regression target is v, not the noise."""
    from efface.models.diffusion import add_noise

    pipe = family_pipe("sd2-v")
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x_t, target, t = ca_module.noised(pipe, x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, torch.randint(1000, (3,), generator=g))
    a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)  # v
    torch.testing.assert_close(target, add_noise(pipe, x0, t, torch.Generator().manual_seed(5))[1])


def test_ca_prompt_pairs_fit_every_tokenizer_given():
    class Short:  # a tokenizer that keeps 4 tokens
        model_max_length = 4

        def __call__(self, text, truncation=False):
            return type("Ids", (), {"input_ids": [0, *text.split(), 1]})()

    pairs = prompt_pairs("circle", "square", "object", [Short(), Short()])
    assert pairs == [("circle", "square"), ("a circle", "a square")]


@pytest.mark.parametrize("family,parameters", [("sd2-v", "xattn_kv"), ("sdxl", "xattn_kv"), ("sdxl", "all"),
                                               ("sd3", "xattn_kv"), ("flux", "xattn_kv")])
def test_ca_on_other_families_changes_only_its_set_and_moves_the_concept(family_pipe, family, parameters):
    from efface.models.families import family_of

    pipe = family_pipe(family)
    fam = family_of(pipe)
    x, t = torch.randn(2, *fam.latent_shape(pipe), generator=torch.Generator().manual_seed(1)), torch.tensor([300, 700])
    c = encode(pipe, ["circle"])
    with torch.no_grad():
        before = predict(pipe, x, t, c)
    declared = {k: v.detach().clone() for k, v in select(pipe, parameters).items()}
    erased = erase(pipe, "ca", ["circle"], anchor="square", seed=0, progress=False, parameters=parameters,
                   **{**FAST_CA, "iterations": 3, "regularization_weight": 0.5})
    assert erased.tensors and set(erased.tensors) <= set(declared)
    if parameters == "xattn_kv":
        assert set(erased.tensors) == set(declared)
    assert erased.manifest["base"]["family"] == fam.name
    with erased.applied(pipe), torch.no_grad():
        assert not torch.allclose(predict(pipe, x, t, c), before)
    assert all(torch.equal(p, declared[k]) for k, p in select(pipe, parameters).items())  # the base is as it was
