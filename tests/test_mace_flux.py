"""MACE's joint-attention form on Flux: the image-to-text probabilities it reads are those the
double- and single-stream processors attend with, the closed forms and LoRAs sit on the text
inputs (context_embedder and the pooled embedder) and nothing else changes, the LoRA lowers the
attention loss, the processors and hooks are restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efface.methods import erase
from efface.methods.base import ErasureRequest
from efface.methods.mace import MACE, concept_positions
from efface.methods.mace_attention import AttentionLoss, attention_processors, lora_hooks, make_loras
from efface.methods.prompts import fill
from efface.methods.receler_maps import joint_probabilities
from efface.models.diffusion import add_noise, predict
from efface.models.families import family_of
from efface.models.params import select
from efface.models.text import encode


@pytest.fixture(scope="module")
def flux(family_dirs):
    from efface import load_pipeline

    pipe = load_pipeline(family_dirs("flux"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _source(pipe):
    h, w = family_of(pipe).image_size(pipe)

    def source(concept, n, generator):
        images = np.zeros((n, h, w, 3), dtype=np.uint8)
        images[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
        masks = np.zeros((n, h, w), dtype=bool)
        masks[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
        return images, masks

    return source


def _rotary(den, text: int, side: int):
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                      indexing="ij"), -1).reshape(-1, 3)
    return den.pos_embed(torch.cat([torch.zeros(text, 3), grid]))


def test_single_stream_probabilities_are_the_processors(flux):
    """In a single-stream block (text and image as one sequence, shared projections) the image
    rows of the probabilities times the values are the processor's image output."""
    den = flux.transformer
    attn = den.single_transformer_blocks[0].attn
    g = torch.Generator().manual_seed(0)
    dim = attn.to_q.in_features
    hidden = torch.randn(1, 5 + 16, dim, generator=g)
    rotary = _rotary(den, 5, 4)
    with torch.no_grad():
        out = attn(hidden, image_rotary_emb=rotary)
        probs = joint_probabilities(attn, hidden, None, rotary, text_len=5)
        v = attn.to_v(hidden).unflatten(-1, (-1, attn.head_dim))
        mixed = torch.einsum("bhnm,bmhd->bnhd", probs, v.float()).flatten(2)
    torch.testing.assert_close(mixed, out[:, 5:], rtol=1e-4, atol=1e-5)


def test_processors_record_every_joint_attention_and_leave_the_output(flux):
    x = torch.randn(2, *family_of(flux).latent_shape(flux), generator=torch.Generator().manual_seed(1))
    cond = encode(flux, ["a red circle", "circle"])
    seen = {}
    before = {k: type(p) for k, p in flux.transformer.attn_processors.items()}
    with torch.no_grad():
        base = predict(flux, x, 500, cond)
        loras = make_loras(flux, 1, torch.Generator().manual_seed(0))  # B = 0: no change yet
        with lora_hooks(flux, loras), attention_processors(flux, lambda n, p, h: seen.setdefault(n, (p, h))):
            same = predict(flux, x, 500, cond)
    torch.testing.assert_close(same, base, atol=1e-5, rtol=1e-5)
    assert set(loras) == {"transformer.context_embedder.weight"}
    assert set(seen) == set(family_of(flux).cross_attention(flux))  # double and single blocks
    n_img = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    for probs, heads in seen.values():
        assert probs.shape == (2 * heads, n_img, cond.embeds.shape[1])
        assert (probs.sum(-1) < 1 + 1e-5).all()  # the text part of a softmax over text and image keys
    assert {k: type(p) for k, p in flux.transformer.attn_processors.items()} == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in flux.transformer.modules())


def test_positions_are_the_t5_tokens_of_the_concept(flux):
    tok = flux.tokenizer_2
    pos = concept_positions(flux, "a red {} on a table", "circle", use_pooler=False)
    ids = tok("a red circle on a table").input_ids
    assert pos.shape == (family_of(flux).sequence_length(flux),)
    assert [ids[i] for i in torch.nonzero(pos).flatten().tolist()] == tok("circle", add_special_tokens=False).input_ids
    with_end = concept_positions(flux, "a red {} on a table", "circle", use_pooler=True)
    assert with_end.sum() == pos.sum() + 1 and ids[int(torch.nonzero(with_end & ~pos)[0])] == tok.eos_token_id


def test_the_cfr_maps_the_pooled_embedding_onto_the_anchors(flux):
    mace = MACE(templates=("a red {}", "{} on a table"), lamb=1e-4)
    request = ErasureRequest.build(["circle"], ["square"], [])
    stats = mace.statistics(flux, request, torch.float64)
    assert set(stats) == {"sequence", "pooled"}
    site = dict(mace.site_weights(flux))["transformer.time_text_embed.text_embedder.linear_1.weight"][1]
    w0 = site.detach().clone()
    old, new = (encode(flux, [fill(t, c) for t in mace.config.templates]).pooled for c in ("circle", "square"))
    saved = {k: p.detach().clone() for k, p in select(flux, "text_input").items()}
    try:
        mace.refine(flux, stats)
        before, after = (old @ w0.T - new @ w0.T).norm(), (old @ site.detach().T - new @ w0.T).norm()
        assert after < 0.5 * before
    finally:
        with torch.no_grad():
            for k, p in select(flux, "text_input").items():
                p.copy_(saved[k])


def test_mace_on_flux_changes_only_its_sites_and_the_lora_lowers_the_loss(flux):
    """The erasure changes the two text-input weights and nothing else; the trained LoRA, written into
    context_embedder, lowers the attention loss on fresh draws of its training distribution."""
    source = _source(flux)
    options = {"data": "source", "num_images": 4, "templates": ("a red {}", "{}"), "batch_size": 2}
    mace = MACE(image_source=source, iterations=40, lr=5e-2, **options)
    gen = torch.Generator().manual_seed(0)
    x0, masks = mace.images(flux, "circle", gen)
    factors = mace.train_lora(flux, "circle", x0, masks, gen, progress=False)
    assert set(factors) == {"transformer.context_embedder.weight"}
    emb = encode(flux, [fill(t, "circle") for t in mace.config.templates])
    positions = torch.stack([concept_positions(flux, t, "circle", True) for t in mace.config.templates])

    def loss_value():
        g, total = torch.Generator().manual_seed(5), 0.0
        for _ in range(6):
            i, k = torch.randint(len(x0), (2,), generator=g), torch.randint(2, (2,), generator=g)
            t = torch.randint(200, 400, (2,), generator=g)
            fn = AttentionLoss()
            fn.set(positions[k], masks[i], tuple(x0.shape[-2:]))
            with torch.no_grad(), attention_processors(flux, fn):
                predict(flux, add_noise(flux, x0[i], t, g)[0], t, emb[k])
            total += float(fn.value())
        return total

    weight = flux.transformer.context_embedder.weight
    saved, before = weight.detach().clone(), loss_value()
    try:
        with torch.no_grad():
            b, a = factors["transformer.context_embedder.weight"]
            weight.add_(b @ a)
        after = loss_value()
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert after < 0.8 * before
    erased = erase(flux, "mace", ["circle"], seed=0, progress=False, image_source=source, iterations=2, **options)
    assert set(erased.tensors) == {"transformer.context_embedder.weight",
                                   "transformer.time_text_embed.text_embedder.linear_1.weight"}


def test_generated_images_on_flux_get_masks_from_the_joint_attention(flux):
    x0, masks = MACE(data="generate", num_images=2, image_steps=2, image_prompt="a {}",
                     mask_threshold=0.99).images(flux, "circle", torch.Generator().manual_seed(0))
    assert x0.shape == (2, *family_of(flux).latent_shape(flux)) and masks.shape == (2, 1, *x0.shape[-2:])
    assert masks.flatten(1).any(1).all() and not masks.all()
