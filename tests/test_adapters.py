"""Adapters attach through processors / hooks and leave the model exactly as it was when removed."""

from __future__ import annotations

import pytest
import torch

from efface.errors import ModelLoadError
from efface.models.adapters import Installed, adapter_from, forward_hooks, forward_pre_hook, wrap_attention_processors
from efface.models.text import encode

from conftest import build_tiny_pipeline


def _eps(pipe):
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=encode(pipe, ["a circle"]).embeds).sample


def test_wrapped_processors_change_the_output_and_are_restored():
    pipe = build_tiny_pipeline()
    base, processors = _eps(pipe), dict(pipe.unet.attn_processors)
    handle, seen = Installed(), []

    def after(key, out, hidden, context, kwargs):
        seen.append((key, context is not None))
        return out * 2

    wrapped = wrap_attention_processors(pipe.unet, handle, lambda k: "attn2" in k, after)
    assert wrapped and all("attn2" in k for k in wrapped)
    changed = _eps(pipe)
    assert not torch.allclose(changed, base)
    assert {k for k, _ in seen} == set(wrapped) and all(cross for _, cross in seen)
    handle.remove()
    handle.remove()  # idempotent
    assert all(pipe.unet.attn_processors[k] is p for k, p in processors.items())
    torch.testing.assert_close(_eps(pipe), base, rtol=0, atol=0)


def test_forward_hooks_are_removed():
    pipe = build_tiny_pipeline()
    base = _eps(pipe)
    handle = Installed()
    linears = {n: m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q")}
    forward_hooks(linears, handle, lambda name, m, args, out: out + 1.0)
    calls = []
    forward_pre_hook(pipe.unet, handle, lambda m, args, kwargs: calls.append(kwargs.get("encoder_hidden_states")))
    assert not torch.allclose(_eps(pipe), base) and calls and calls[0] is not None
    handle.remove()
    torch.testing.assert_close(_eps(pipe), base, rtol=0, atol=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pipe.unet.modules())


def test_artifact_adapters_only_from_efface_modules():
    with pytest.raises(ModelLoadError, match="not part of efface"):
        adapter_from({"kind": "x", "module": "os", "spec": {}}, {})

