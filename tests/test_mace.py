"""MACE keeps its promises: the CFR maps the co-occurring words' keys onto the anchor's values,
the fusion solves its least-squares objective, the attention loss measures attention inside the
mask (zero for an empty mask) and training lowers it, processors are restored, segmenters plug in."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import build_tiny_pipeline

from efface.errors import InputError
from efface.methods.base import ErasureRequest
from efface.methods.mace import MACE, concept_positions
from efface.methods.mace_closed_forms import (ClosedFormStats, cfr_map, cooccurring_indices, fuse, fused_weight,
                                              fusion_maps, lora_keys)
from efface.methods.uce import uce_solve
from efface.methods.mace_attention import AttentionLoss, attention_processors, importance_weights, lora_hooks, make_loras
from efface.methods.prompts import fill
from efface.models.diffusion import add_noise, predict
from efface.models.params import select
from efface.models.text import encode
from efface.toy.presets import method_inputs, method_preset

TOY = {"preset": method_preset("mace"), **method_inputs("mace")}  # the toy preset and its drawn images
FAST = {**TOY, "num_images": 2, "iterations": 3, "batch_size": 2}


@pytest.fixture(scope="module")
def tiny():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


WORDS = st.sampled_from(["red", "a", "big", "of", "on", "blue"])
CONCEPTS = st.sampled_from(["circle", "square", "cat", "love heart", "disc"])


@settings(max_examples=60, deadline=None)
@given(before=st.lists(WORDS, max_size=3), after=st.lists(WORDS, max_size=3), concept=CONCEPTS,
       anchor=st.sampled_from(["", "shape", "grumpy cat"]))
def test_cfr_keys_are_the_words_around_the_concept(tiny, before, after, concept, anchor):
    """Keys sit on the tokens before and after the concept, never on the concept's own tokens
    (unless they are shared with the anchor's ends), each row-aligned with the same word in the
    anchor prompt, through the padding, within the tokenizer's length."""
    tok = tiny.tokenizer
    template = " ".join([*before, "{}", *after])
    old, new = fill(template, concept), fill(template, anchor)
    if max(len(tok(old).input_ids), len(tok(new).input_ids)) > tok.model_max_length:
        return
    i_old, i_new = cooccurring_indices(tok, old, new)
    ids_old = tok(old, padding="max_length", max_length=tok.model_max_length).input_ids
    ids_new = tok(new, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(i_old) == len(i_new) and max(i_old + i_new) < tok.model_max_length
    assert [ids_old[i] for i in i_old] == [ids_new[i] for i in i_new]  # the same words, aligned
    pos = concept_positions(tiny, template, concept, use_pooler=False)
    span = set(torch.nonzero(pos).flatten().tolist())
    assert len(span) == len(tok(concept, add_special_tokens=False).input_ids)
    if not anchor:  # nothing shared with the anchor: the concept's tokens are never keys
        assert not span & set(i_old)
    assert 0 in i_old and len(tok(old).input_ids) - 1 in i_old  # start and end-of-text tokens


def test_cfr_maps_cooccurring_keys_onto_anchor_values(tiny):
    """After the refinement, W' is the minimiser of the CFR objective (gradient zero), and with a
    small lambda the co-occurring keys land closer to the anchor's original values (8-dim keys on the
    tiny model: the many rows cannot all be met exactly)."""
    mace = MACE(**TOY, templates=("a red {}", "{} on a blue background"), lamb=1e-3, train_preserve_scale=0.0)
    request = ErasureRequest.build(["circle"], None, [], default_anchor="")
    old = [fill(t, "circle") for t in mace.config.templates]
    new = [fill(t, "") for t in mace.config.templates]
    rows = [cooccurring_indices(tiny.tokenizer, o, n) for o, n in zip(old, new)]
    with torch.no_grad():
        e_old, e_new = encode(tiny, old).embeds.double(), encode(tiny, new).embeds.double()
    keys = torch.cat([e_old[i, r] for i, (r, _) in enumerate(rows)])
    sources = torch.cat([e_new[i, r] for i, (_, r) in enumerate(rows)])
    weights = select(tiny, "xattn_kv")
    saved = {k: p.detach().clone() for k, p in weights.items()}
    try:
        mace.refine(tiny, mace.statistics(tiny, request, torch.float64))
        for key, param in weights.items():
            w_old, w_new = saved[key].double(), param.detach().double().requires_grad_(True)
            target = sources @ w_old.T
            objective = 1e-3 * (w_new - w_old).pow(2).sum() + (keys @ w_new.T - target).pow(2).sum()
            objective.backward()
            assert w_new.grad.abs().max() < 1e-5 * max(1.0, objective.item())
            before = (keys @ w_old.T - target).norm()
            after = (keys @ w_new.detach().T - target).norm()
            assert after < before
    finally:
        with torch.no_grad():
            for k, p in weights.items():
                p.copy_(saved[k])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_concepts=st.integers(1, 4), n_pres=st.integers(0, 5),
       lamb=st.sampled_from([1e-3, 0.5, 10.0]), scale=st.sampled_from([0.0, 0.1, 3.0]))
def test_fusion_solves_its_least_squares_objective(seed, n_concepts, n_pres, lamb, scale):
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 10, 7
    w_ref = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    w_orig = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    keys = [torch.randn(6, d_in, generator=g, dtype=torch.float64) for _ in range(n_concepts)]
    f64 = {"generator": g, "dtype": torch.float64}
    deltas = [torch.randn(d_out, 1, **f64) @ torch.randn(1, d_in, **f64) for _ in range(n_concepts)]  # rank 1
    values = [k @ (w_ref + d).T for k, d in zip(keys, deltas)]
    p_keys = torch.randn(n_pres, d_in, generator=g, dtype=torch.float64)
    p_vals = p_keys @ w_orig.T
    w = fuse(w_ref, keys, values, p_keys, p_vals, lamb=lamb, preserve_scale=scale)
    # a direct solve of the stacked least-squares system [sqrt(lamb) I; K_i; sqrt(s) K_p] W^T = [...]
    a = torch.cat([math.sqrt(lamb) * torch.eye(d_in, dtype=torch.float64), *keys, math.sqrt(scale) * p_keys])
    b = torch.cat([math.sqrt(lamb) * w_ref.T, *values, math.sqrt(scale) * p_vals])
    torch.testing.assert_close(w, torch.linalg.lstsq(a, b).solution.T, atol=1e-8, rtol=1e-8)
    w = w.clone().requires_grad_(True)
    objective = (lamb * (w - w_ref).pow(2).sum() + sum((k @ w.T - v).pow(2).sum() for k, v in zip(keys, values))
                 + scale * (p_keys @ w.T - p_vals).pow(2).sum())
    objective.backward()
    assert w.grad.abs().max() < 1e-8 * max(1.0, objective.item())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_concepts=st.integers(1, 4), n_pres=st.integers(0, 5), rank=st.integers(1, 2),
       lamb=st.sampled_from([1e-3, 0.5, 10.0]), scales=st.sampled_from([(0.0, 0.0), (0.1, 3.0), (1.0, 1.0)]))
def test_the_batched_closed_forms_are_the_per_concept_ones(seed, n_concepts, n_pres, rank, lamb, scales):
    """MACE's CFR and fusion from the Gram matrices (one solve for all layers and concepts: cfr_map,
    fusion_maps, lora_keys, fused_weight) equal UCE's per-concept sums (uce_solve) and the
    per-concept fusion (fuse) of each layer."""
    g = torch.Generator().manual_seed(seed)
    f64 = {"generator": g, "dtype": torch.float64}
    d_in, train_scale, fuse_scale = 10, *scales
    k_rows = torch.randint(1, 8, (n_concepts,), generator=g).tolist()
    cfr_keys = [torch.randn(n, d_in, **f64) for n in k_rows]  # co-occurring keys, per concept
    sources = [torch.randn(n, d_in, **f64) for n in k_rows]
    keys = [torch.randn(6, d_in, **f64) for _ in range(n_concepts)]  # every token of its prompts
    p = torch.randn(n_pres, d_in, **f64)
    k, s = torch.cat(cfr_keys), torch.cat(sources)
    stats = ClosedFormStats(k.T @ k, s.T @ k, torch.stack([e.T @ e for e in keys]), p.T @ p)
    cfr, maps = cfr_map(stats, lamb=lamb, preserve_scale=train_scale), fusion_maps(stats, lamb=lamb,
                                                                                      preserve_scale=fuse_scale)
    for d_out in (3, 7):
        w, w_orig = torch.randn(2, d_out, d_in, **f64)
        ref = uce_solve(w, cfr_keys, [x @ w.T for x in sources], [p], erase_scale=1.0, preserve_scale=train_scale,
                        lamb=lamb)
        torch.testing.assert_close(w @ cfr, ref, atol=1e-9, rtol=1e-9)
        ups, downs = torch.randn(n_concepts, d_out, rank, **f64), torch.randn(n_concepts, rank, d_in, **f64)
        values = [e @ (w + b @ a).T for e, b, a in zip(keys, ups, downs)]
        ref = fuse(w, keys, values, p, p @ w_orig.T, lamb=lamb, preserve_scale=fuse_scale)
        a_g = lora_keys(stats, downs)
        torch.testing.assert_close(fused_weight(w, w_orig, ups, a_g, maps), ref, atol=1e-9, rtol=1e-9)


def test_fusion_of_one_lora_with_small_lambda_reproduces_it_on_its_keys():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    delta = torch.randn(5, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 12, generator=g, dtype=torch.float64)
    keys = torch.randn(8, 12, generator=g, dtype=torch.float64)
    fused = fuse(w, [keys], [keys @ (w + delta).T], torch.zeros(0, 12), torch.zeros(0, 5), lamb=1e-8, preserve_scale=0)
    torch.testing.assert_close(keys @ fused.T, keys @ (w + delta).T, atol=1e-5, rtol=1e-5)


def _attention_loss(pipe, x_t, t, emb, positions, masks) -> float:
    loss = AttentionLoss()
    loss.set(positions, masks, tuple(x_t.shape[-2:]))
    with torch.no_grad(), attention_processors(pipe, recorder=loss):
        predict(pipe, x_t, t, emb)
    return float(loss.value())


def test_attention_loss_is_zero_when_the_mask_covers_nothing_and_grows_with_it(tiny):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([300, 300])
    emb = encode(tiny, ["a red circle", "circle"])
    positions = torch.stack([concept_positions(tiny, t_, "circle", True) for t_ in ("a red {}", "{}")])
    empty = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    half = empty.clone()
    half[..., :16] = True
    assert _attention_loss(tiny, x_t, t, emb, positions, empty) == 0.0
    assert 0 < _attention_loss(tiny, x_t, t, emb, positions, half) < _attention_loss(tiny, x_t, t, emb, positions,
                                                                                      ~empty)
    assert _attention_loss(tiny, x_t, t, emb, positions, None) == pytest.approx(
        _attention_loss(tiny, x_t, t, emb, positions, ~empty))


def test_lora_training_lowers_the_attention_loss(tiny):
    """The trained LoRA, written into the weights as W + B A, lowers the loss on fresh noisy
    draws of the training distribution (images, templates, t in 200..400)."""
    mace = MACE(**TOY, num_images=4, iterations=60, lr=5e-2, batch_size=2)
    gen = torch.Generator().manual_seed(0)
    x0, masks = mace.images(tiny, "circle", gen)
    deltas = mace.train_lora(tiny, "circle", x0, masks, gen, progress=False)
    templates = mace.config.templates
    emb = encode(tiny, [fill(tt, "circle") for tt in templates])
    positions = torch.stack([concept_positions(tiny, tt, "circle", True) for tt in templates])
    g = torch.Generator().manual_seed(5)
    draws = []
    for _ in range(12):
        i, k = torch.randint(len(x0), (2,), generator=g), torch.randint(len(templates), (2,), generator=g)
        t = torch.randint(200, 400, (2,), generator=g)
        draws.append((add_noise(tiny, x0[i], t, g)[0], t, emb[k], positions[k], masks[i]))
    before = sum(_attention_loss(tiny, *d) for d in draws)
    weights = select(tiny, "xattn_kv")
    saved = {k: p.detach().clone() for k, p in weights.items()}
    try:
        with torch.no_grad():
            for k, p in weights.items():
                p.add_(deltas[k][0] @ deltas[k][1])  # Delta W = B A
        after = sum(_attention_loss(tiny, *d) for d in draws)
    finally:
        with torch.no_grad():
            for k, p in weights.items():
                p.copy_(saved[k])
    assert after < 0.8 * before


def test_processors_reproduce_diffusers_and_are_restored(tiny):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 16, 16, generator=g)
    emb = encode(tiny, ["a red circle"]).embeds
    before = {k: type(p) for k, p in tiny.unet.attn_processors.items()}
    with torch.no_grad():
        base = tiny.unet(x, 500, encoder_hidden_states=emb).sample
        loras = make_loras(tiny, 1, g)  # B = 0: no change yet
        assert set(loras) == set(select(tiny, "xattn_kv"))
        with lora_hooks(tiny, loras), attention_processors(tiny, lambda *a: None):
            same = tiny.unet(x, 500, encoder_hidden_states=emb).sample
    torch.testing.assert_close(same, base, atol=1e-5, rtol=1e-5)
    assert {k: type(p) for k, p in tiny.unet.attn_processors.items()} == before
    assert not any("lora" in n or "down" == n.rsplit(".", 1)[-1] for n, _ in tiny.unet.named_parameters())
    assert not any(m._forward_hooks for m in tiny.unet.modules())


def test_generated_images_get_attention_masks_or_the_injected_segmenter(tiny):
    calls = []

    def segmenter(images, concept):
        calls.append((len(images), images[0].size, concept))
        m = torch.zeros(len(images), 32, 32, dtype=torch.bool)
        m[:, 8:24, 8:24] = True
        return m

    gen = torch.Generator().manual_seed(0)
    options = {"data": "generate", "num_images": 2, "image_steps": 2, "image_prompt": "a {}", "mask_threshold": 0.99}
    x0, masks = MACE(**options).images(tiny, "circle", gen)
    assert x0.shape == (2, 4, 16, 16) and masks.shape == (2, 1, 16, 16) and masks.dtype == torch.bool
    assert masks.flatten(1).any(1).all() and not masks.all()  # the map's peak is in, not everything
    # (the tiny random model attends almost uniformly: a high threshold keeps only the peak)
    x0, masks = MACE(segmenter=segmenter, **options).images(tiny, "circle", gen)
    assert calls == [(2, (32, 32), "circle")] and masks.shape == (2, 1, 32, 32) and masks.sum() == 2 * 16 * 16
    with pytest.raises(InputError, match="one\\s+H x W mask per image"):
        MACE(segmenter=lambda images, c: torch.ones(32, 32), **options).images(tiny, "circle", gen)


def test_importance_sampling_favours_t_200_to_400():
    p = importance_weights(1000)
    assert p.sum().item() == pytest.approx(1.0)
    assert p[200:400].sum() > 0.8 and p.argmax().item() in range(290, 311)


def test_options_are_checked_before_work(tiny):
    with pytest.raises(InputError, match="data must be one of"):
        MACE(data="web")
    with pytest.raises(InputError, match="rank must be at least 1"):
        MACE(rank=0)
    with pytest.raises(InputError, match="toy shapes only"):
        MACE(**FAST).check(tiny, ErasureRequest.build(["red"], None, []))
    with pytest.raises(InputError, match="needs an image source"):
        MACE(data="source").check(tiny, ErasureRequest.build(["circle"], None, []))
    with pytest.raises(InputError, match="mask_threshold"):
        MACE(mask_threshold=0)


def test_an_injected_image_source_gives_the_images_and_masks(tiny):
    """data='source': the source's images (PIL or uint8 arrays) are encoded, its masks kept as they are;
    a source that returns the wrong shapes is refused with what it must return."""
    from PIL import Image

    calls = []

    def source(concept, n, generator):
        calls.append((concept, n))
        images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
        images[:, 8:24, 8:24] = 255
        masks = np.zeros((n, 32, 32), dtype=bool)
        masks[:, 8:24, 8:24] = True
        return [Image.fromarray(im) for im in images], masks

    x0, masks = MACE(data="source", image_source=source, num_images=3).images(tiny, "cat", torch.Generator())
    assert calls == [("cat", 3)] and x0.shape == (3, 4, 16, 16)
    assert masks.shape == (3, 1, 32, 32) and masks.dtype == torch.bool and masks.sum() == 3 * 16 * 16
    with pytest.raises(InputError, match="one\\s+H x W mask per image"):
        MACE(data="source", image_source=lambda c, n, g: (source(c, n, g)[0], np.ones((32, 32), bool)),
             num_images=2).images(tiny, "cat", torch.Generator())


def test_the_toy_source_draws_the_same_images_as_before(tiny):
    """The toy world's source (one draw from the generator seeds the drawing) gives the draws the
    former data='toy' made: the same scenes, the same masks, the generator left in the same state."""
    import random

    from efface.toy.draw import draw
    from efface.toy.world import COLOURS, STYLES, Scene

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    rng = random.Random(int(torch.randint(2**31, (1,), generator=g1)))
    scenes = [Scene("star", rng.choice(COLOURS), rng.choice(STYLES)) for _ in range(4)]  # the scenes first,
    drawn = [draw(scene, rng) for scene in scenes]  # then the drawings, from the same stream
    images, masks = method_inputs("mace")["image_source"]("star", 4, g2)
    assert np.array_equal(images, np.stack([im for im, _ in drawn]))
    assert np.array_equal(masks, np.stack([m for _, m in drawn]))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_sdxl_is_refused_before_work_with_the_reason(family_pipe):
    from efface.methods import erase

    with pytest.raises(InputError, match="mace supports flux, sd models, not sdxl: .*pooled"):
        erase(family_pipe("sdxl"), "mace", ["circle"], progress=False)
