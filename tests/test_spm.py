"""SPM: the membranes start as the identity, facilitated transport opens them only for their concept,
several compose as stated, and the LoRA export is what plain diffusers loads; on SD and on Flux."""

from __future__ import annotations

import pytest
import torch

from efface.errors import InputError
from efface.methods import erase
from efface.methods.spm import SPMConfig, anchor_conditioning, anchor_embeddings
from efface.methods.spm_membranes import SPMAdapter, membrane_blocks, membrane_layers, transport_rates
from efface.models.diffusion import predict
from efface.models.families import Conditioning, family_of
from efface.models.text import encode

from conftest import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def _eps(pipe, prompts: list[str], seed: int = 0) -> torch.Tensor:
    x = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=encode(pipe, prompts).embeds).sample


def _adapter(pipe, concepts: list[str], seed: int = 0, **options) -> SPMAdapter:
    """Membranes with random (non-zero) up-projections, so that they act (on the pipeline's family)."""
    g = torch.Generator().manual_seed(seed)
    family = family_of(pipe)
    layers = membrane_layers(family.denoiser(pipe), membrane_blocks(pipe))
    adapter = SPMAdapter(layers, concepts, denoiser=family.denoiser_name, **options).reset(g)
    with torch.no_grad():
        for membrane in adapter.membranes:
            for up in membrane.up.values():
                up.copy_(torch.randn(up.shape, generator=g) * 0.5)
    return adapter


def test_membranes_sit_on_every_linear_and_conv_of_the_transformer_blocks(pipe):
    layers = membrane_layers(pipe.unet)
    assert any(n.endswith("attn2.to_k") for n in layers) and any(n.endswith("ff.net.2") for n in layers)
    assert any(n.endswith("proj_in") and len(s) == 8 for n, s in layers.items())  # a 1x1 convolution here
    assert all(".attentions." in n for n in layers)  # nothing outside Transformer2DModel


def test_membrane_is_the_identity_at_initialisation(pipe):
    adapter = SPMAdapter(membrane_layers(pipe.unet), ["circle"]).reset(torch.Generator().manual_seed(0))
    assert all(not u.detach().any() for u in adapter.membranes[0].up.values())
    assert all(d.detach().all() for d in adapter.membranes[0].down.values())
    base = _eps(pipe, ["circle", "a square"])
    with adapter.installed(pipe), adapter.fixed(1.0):
        torch.testing.assert_close(_eps(pipe, ["circle", "a square"]), base, rtol=0, atol=0)


def test_transport_rate_is_one_for_the_concept_and_zero_for_an_unrelated_prompt():
    concept = torch.zeros(1, 4, 3)
    concept[0, 1, 0] = 1.0
    unrelated = torch.zeros(1, 4, 3)
    unrelated[0, 2, 1] = 1.0  # orthogonal hidden states
    both = torch.cat([concept, unrelated, unrelated, unrelated])
    tokens = [frozenset({5}), frozenset({7, 8}), frozenset({7, 5}), None]
    rates = transport_rates(both, tokens, concept, [frozenset({5})])
    assert rates[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]  # same / unrelated / names it / tokens unknown
    half = transport_rates(unrelated, [frozenset({5})], concept, [frozenset({5, 6})])
    assert half.item() == pytest.approx(0.5)  # half the concept's tokens


def test_each_batch_row_gets_its_own_rate_in_a_plain_diffusers_call(pipe):
    adapter = _adapter(pipe, ["circle"])
    with adapter.installed(pipe):
        pipe("a red circle", negative_prompt="a square", num_inference_steps=1, guidance_scale=2.0,
             output_type="latent", generator=torch.Generator().manual_seed(0))
        rates = adapter.last_rates
    assert rates.shape == (2, 1)
    negative, positive = rates[:, 0].tolist()  # diffusers puts the negative prompt first
    assert positive == 1.0 and negative < 1.0
    concept, square = encode(pipe, ["circle", "a square"]).embeds
    cosine = torch.cosine_similarity(concept.flatten(), square.flatten(), dim=0).item()
    assert negative == pytest.approx(cosine, abs=1e-5)


def test_transport_opens_the_membrane_for_its_concept_only(pipe):
    adapter = _adapter(pipe, ["circle"])
    prompts = ["a red circle", "a square"]
    base = _eps(pipe, prompts)
    with adapter.installed(pipe):
        transported = _eps(pipe, prompts)
        gamma = adapter.last_rates[:, 0].tolist()
        with adapter.fixed(1.0):
            full = _eps(pipe, prompts)
    assert gamma[0] == 1.0 and 0 < gamma[1] < 1
    torch.testing.assert_close(transported[0], full[0])  # the concept's row passes fully
    change, full_change = (transported[1] - base[1]).norm(), (full[1] - base[1]).norm()
    assert 0 < change < full_change  # the unrelated row gets a smaller dose (gamma^2 when merged)


@pytest.mark.parametrize("composition", ["merged", "sum"])
def test_two_membranes_compose_as_stated(pipe, composition):
    adapter = _adapter(pipe, ["circle", "square"], composition=composition)
    name = next(n for n, s in adapter.layers.items() if n.endswith("attn2.to_v"))
    x = torch.randn(3, 5, adapter.layers[name][0], generator=torch.Generator().manual_seed(1))
    m = torch.tensor([[1.0, 0.0], [0.3, 0.9], [0.5, 0.5]])
    key = name.replace(".", "_")
    (d1, d2), (u1, u2) = [mb.down[key] for mb in adapter.membranes], [mb.up[key] for mb in adapter.membranes]
    with torch.no_grad():
        got = adapter.delta(name, x, m)
        for b in range(3):
            m1, m2 = m[b]
            if composition == "merged":  # official infer_spm.py: rate-scaled weights summed
                want = x[b] @ (m1 * d1 + m2 * d2).T @ (m1 * u1 + m2 * u2).T
            else:
                want = m1 * x[b] @ d1.T @ u1.T + m2 * x[b] @ d2.T @ u2.T
            torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)
    # a membrane at multiplier 0 is no membrane: the pair equals the first alone
    single = SPMAdapter(adapter.layers, ["circle"], composition=composition)
    single.membranes[0].load_state_dict(adapter.membranes[0].state_dict())
    with adapter.installed(pipe), adapter.fixed([1.0, 0.0]):
        pair = _eps(pipe, ["circle"])
    with single.installed(pipe), single.fixed(1.0):
        torch.testing.assert_close(_eps(pipe, ["circle"]), pair, rtol=1e-5, atol=1e-6)


def test_anchor_batch_alternates_empty_and_random_embeddings_of_the_concepts_norm():
    target, empty = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    anchors = anchor_embeddings(target, empty, 6, torch.Generator().manual_seed(0))
    assert anchors.shape == (6, 6, 4)
    assert all(torch.equal(anchors[j], empty[0]) for j in (0, 2, 4))
    ratios = [float(anchors[j].norm() / target.norm()) for j in (1, 3, 5)]
    assert all(0.8 <= r <= 1.2 for r in ratios)
    again = anchor_embeddings(target, empty, 6, torch.Generator().manual_seed(0))
    assert torch.equal(anchors, again)


def test_fit_trains_one_membrane_per_concept_and_changes_no_base_weight(pipe):
    erased = erase(pipe, "spm", ["circle", "square"], progress=False, iterations=2, lr=5e-2, ddim_steps=3,
                   anchor_batch=2, seed=0)
    assert not erased.tensors and erased.adapter.concepts == ["circle", "square"]
    for membrane in erased.adapter.membranes:
        assert any(u.detach().any() for u in membrane.up.values())


def test_bad_options_are_refused():
    with pytest.raises(InputError, match="multiple of batch_size"):
        SPMConfig(batch_size=3, anchor_batch=4)
    with pytest.raises(InputError, match="composition"):
        SPMConfig(composition="product")
    with pytest.raises(InputError, match="ddim_steps"):
        SPMConfig(ddim_steps=1)


def test_sdxl_is_refused_before_work_with_the_reason(family_pipe):
    with pytest.raises(InputError, match="spm supports flux, sd models, not sdxl: .*transport"):
        erase(family_pipe("sdxl"), "spm", ["circle"], progress=False)


def test_the_official_learning_rate_schedule_warms_up_then_restarts_three_cosines():
    from efface.methods.spm import SPMConfig
    from efface.models.precision import cosine_with_restarts

    cfg = SPMConfig()
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.lr_cycles) == ("cosine_with_restarts", 500, 3)
    f = cosine_with_restarts(500, 3000, 3)
    assert f(0) == 0 and f(250) == 0.5 and f(500) == 1.0
    values = [f(i) for i in range(500, 3000)]
    restarts = sum(1 for a, b in zip(values, values[1:]) if b > a + 0.5)
    assert restarts == 2 and min(values) >= 0 and f(3000) == 0.0


def test_train_steps_follows_the_schedule_step_by_step():
    import torch

    from efface.models.diffusion import train_steps

    p = torch.nn.Parameter(torch.zeros(1))
    seen = []

    def loss(i):
        return (p - 1).pow(2).sum()

    def schedule(i):
        seen.append(i)
        return 0.0 if i == 0 else 1.0

    train_steps(loss, [p], 3, lr=0.1, name="s", progress=False, optimizer="adamw", lr_schedule=schedule)
    assert seen == [0, 1, 2] and 0 < float(p.detach()) < 1  # steps 1 and 2 moved p
    q = torch.nn.Parameter(torch.zeros(1))
    train_steps(lambda i: (q - 1).pow(2).sum(), [q], 3, lr=0.1, name="s", progress=False, lr_schedule=lambda i: 0.0)
    assert float(q.detach()) == 0.0  # at lr 0 nothing moves


# --- Flux: the joint-attention transformer's form (spm.py's module doc) -----------------------------


@pytest.fixture(scope="module")
def flux(family_dirs):
    from efface import load_pipeline

    pipe = load_pipeline(family_dirs("flux"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_out(pipe, prompts: list[str], seed: int = 0) -> torch.Tensor:
    x = torch.randn(len(prompts), *family_of(pipe).latent_shape(pipe), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return predict(pipe, x, 500, encode(pipe, prompts))


def test_flux_membranes_sit_on_every_linear_of_both_block_kinds(flux):
    layers = membrane_layers(flux.transformer, membrane_blocks(flux))
    assert membrane_blocks(flux) == ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    assert any(n.startswith("transformer_blocks.") and n.endswith("attn.add_k_proj") for n in layers)
    assert any(n.startswith("single_transformer_blocks.") and n.endswith("attn.to_k") for n in layers)
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in layers)
    assert all(len(shape) == 2 for shape in layers.values())  # Linear only: Flux blocks hold no convolution
    linears = {n for n, m in flux.transformer.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert set(layers) == linears


def test_flux_transport_reads_the_t5_sequence_and_its_token_ids(flux):
    """A prompt naming the concept opens its membrane fully (its T5 ids), another one by the cosine
    of its T5 states with the concept's; each row of a plain FluxPipeline call gets its own rate."""
    adapter = _adapter(flux, ["circle"])
    base = _flux_out(flux, ["a red circle", "a square"])
    with adapter.installed(flux):
        out = _flux_out(flux, ["a red circle", "a square"])
        gamma = adapter.last_rates[:, 0].tolist()
        with adapter.fixed(1.0):
            full = _flux_out(flux, ["a red circle", "a square"])
        flux("a red circle", negative_prompt="a square", true_cfg_scale=2.0, num_inference_steps=1,
             max_sequence_length=family_of(flux).max_sequence_length(flux), output_type="latent",
             generator=torch.Generator().manual_seed(0))
        plain = adapter.last_rates[:, 0].tolist()
    concept, square = encode(flux, ["circle", "a square"]).embeds
    cosine = torch.cosine_similarity(concept.flatten(), square.flatten(), dim=0).clamp(0, 1).item()
    assert gamma[0] == 1.0 and gamma[1] == pytest.approx(cosine, abs=1e-5) and gamma[1] < 1
    torch.testing.assert_close(out[0], full[0])
    assert 0 < (out[1] - base[1]).norm() < (full[1] - base[1]).norm()
    # FluxPipeline's true CFG calls the transformer once per prompt, the negative last: its own rate
    assert plain == [pytest.approx(cosine, abs=1e-4)]


def test_flux_anchors_are_random_points_of_the_sequence_and_the_pooled_space():
    g = torch.Generator().manual_seed(0)
    target = Conditioning(torch.randn(1, 6, 4, generator=g), torch.randn(1, 5, generator=g))
    empty = Conditioning(torch.randn(1, 6, 4, generator=g), torch.randn(1, 5, generator=g))
    anchors = anchor_conditioning(target, empty, 4, torch.Generator().manual_seed(1))
    assert anchors.embeds.shape == (4, 6, 4) and anchors.pooled.shape == (4, 5)
    for j in (0, 2):
        assert torch.equal(anchors.embeds[j], empty.embeds[0]) and torch.equal(anchors.pooled[j], empty.pooled[0])
    for j in (1, 3):
        assert 0.8 <= float(anchors.pooled[j].norm() / target.pooled.norm()) <= 1.2
        assert 0.8 <= float(anchors.embeds[j].norm() / target.embeds.norm()) <= 1.2
    again = anchor_conditioning(target, empty, 4, torch.Generator().manual_seed(1))
    assert torch.equal(anchors.embeds, again.embeds) and torch.equal(anchors.pooled, again.pooled)
    assert anchor_conditioning(Conditioning(target.embeds), Conditioning(empty.embeds), 2, g).pooled is None


def test_spm_on_flux_trains_membranes_only_removes_cleanly_and_is_seeded(flux):
    options = {"progress": False, "iterations": 2, "lr": 5e-2, "ddim_steps": 3, "anchor_batch": 2,
               "lr_scheduler": "constant"}
    before = {n: p.detach().clone() for n, p in flux.transformer.named_parameters()}
    base = _flux_out(flux, ["a red circle"])
    erased = erase(flux, "spm", ["circle"], seed=0, **options)
    assert not erased.tensors and erased.adapter.denoiser == "transformer"
    assert all(torch.equal(p, before[n]) for n, p in flux.transformer.named_parameters())
    with erased.applied(flux):
        changed = _flux_out(flux, ["a red circle"])
    assert (changed - base).norm() > 1e-4 * base.norm()
    torch.testing.assert_close(_flux_out(flux, ["a red circle"]), base, rtol=0, atol=0)
    again = erase(flux, "spm", ["circle"], seed=0, **options).adapter.state_dict()
    assert all(torch.equal(again[k], v) for k, v in erased.adapter.state_dict().items())


@pytest.mark.parametrize("family", ["sd", "flux"])
@pytest.mark.parametrize("composition", ["merged", "sum"])
def test_lora_export_loads_in_plain_diffusers_and_matches_multiplier_one(family_pipe, family, composition, tmp_path):
    pipe = build_tiny_pipeline() if family == "sd" else family_pipe(family)
    out = _eps if family == "sd" else _flux_out
    adapter = _adapter(pipe, ["circle", "square"], composition=composition)
    prompts = ["a red circle", "a square"]
    base = out(pipe, prompts)
    with adapter.installed(pipe), adapter.fixed(1.0):
        expected = out(pipe, prompts)
    assert not torch.allclose(expected, base)
    adapter.save_lora(tmp_path)
    assert all(k.startswith(f"{family_of(pipe).denoiser_name}.") for k in adapter.lora_state_dict())
    pipe.load_lora_weights(tmp_path)
    try:
        torch.testing.assert_close(out(pipe, prompts), expected, rtol=1e-4, atol=1e-5)
    finally:
        pipe.unload_lora_weights()
    torch.testing.assert_close(out(pipe, prompts), base, rtol=0, atol=0)


def test_an_sd_membrane_is_refused_on_flux(flux, pipe):
    adapter = SPMAdapter(membrane_layers(pipe.unet), ["circle"])
    with pytest.raises(InputError, match="unet"):
        adapter.install(flux)
