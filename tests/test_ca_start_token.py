"""Concept Ablation's stop-gradient through the start token's cross-attention keys / values (both
official versions; issue 13): a property of the gradient, and that a fit leaves no hook behind."""

from __future__ import annotations

import torch

from efface.methods import erase
from efface.methods.ca import start_token_detached
from efface.models.families import family_of
from efface.toy.presets import method_inputs, method_preset


def _grad_and_key(pipe, module, hidden, context, detached: bool):
    """dL/dW_k of one cross-attention module and its key output (with .grad), L = sum(out^2)."""
    module.zero_grad(set_to_none=True)
    keys = []

    def keep(m, args, output):
        output.retain_grad()
        keys.append(output)

    handle = module.to_k.register_forward_hook(keep)
    try:
        if detached:
            with start_token_detached(pipe):
                out = module(hidden, encoder_hidden_states=context)
        else:
            out = module(hidden, encoder_hidden_states=context)
        (out**2).sum().backward()
    finally:
        handle.remove()
    return module.to_k.weight.grad.clone(), keys[0]


def test_the_start_token_key_gives_no_gradient_and_values_are_unchanged(family_pipe):
    pipe = family_pipe("sd")
    name, module = next(iter(family_of(pipe).cross_attention(pipe).items()))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, module.to_q.in_features, generator=g)
    context = torch.randn(2, 7, module.to_k.in_features, generator=g)
    for p in module.parameters():
        p.requires_grad_(True)
    plain, k = _grad_and_key(pipe, module, hidden, context, detached=False)
    detached, k_detached = _grad_and_key(pipe, module, hidden, context, detached=True)
    # dL/dW_k = sum_{b, j} dL/dk_{b j} c_{b j}^T: the hook removes exactly the j = 0 (start token) terms
    expected = plain - torch.einsum("bd,be->de", k.grad[:, 0], context[:, 0])
    assert torch.allclose(detached, expected, atol=1e-5)
    assert not torch.allclose(detached, plain, atol=1e-5)
    assert torch.equal(k_detached.detach(), k.detach())  # the forward values are unchanged


def test_ca_fits_with_and_without_it_and_leaves_no_hook(family_pipe):
    pipe = family_pipe("sd")
    fast = dict(preset=method_preset("ca"), **method_inputs("ca"), iterations=2, lr=1e-2, batch_size=2,
                num_anchor_images=2, anchor_steps=2, seed=0, progress=False)
    on = erase(pipe, "ca", ["circle"], **fast).tensors
    off = erase(pipe, "ca", ["circle"], detach_start_token=False, **fast).tensors
    assert on.keys() == off.keys() and any(not torch.equal(on[k], off[k]) for k in on)
    modules = family_of(pipe).cross_attention(pipe).values()
    assert all(not m.to_k._forward_hooks and not m.to_v._forward_hooks for m in modules)
