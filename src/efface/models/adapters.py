"""Adapters: modules an erasure method adds to a pipeline instead of (or besides) changing its weights.

Receler's erasers after cross-attention and SPM's rank-1 membranes are new modules, not new values
of the base's parameters. An :class:`Adapter` is an ``nn.Module`` that holds them and knows how to
attach itself to a pipeline through diffusers' attention processors or torch module hooks:

* :meth:`Adapter.install` attaches it and returns an :class:`Installed` handle whose ``remove()``
  restores the pipeline exactly (processors put back, hooks removed);
* :meth:`Adapter.installed` does the same for the duration of a ``with`` block.

An adapter is never registered as a submodule of the UNet or text encoder (processors installed
here are plain callables holding a reference to it), so the base's ``named_parameters``, its
fingerprint and ``state_dict`` stay those of the base. Adapters are saved as their ``spec()``
(JSON constructor arguments) plus their ``state_dict()``; a kind is found again through
:data:`ADAPTERS` after importing the module named in the artifact.

Two attachment helpers serve the methods: :func:`wrap_attention_processors` (wrap the processor of
chosen attention modules, e.g. every ``attn2``) and :func:`forward_hooks` (a forward hook on chosen
modules, e.g. every linear layer of the transformer blocks).
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

from efface.errors import InputError, ModelLoadError
from efface.models.families import family_of
from efface.registry import Registry

ADAPTERS: Registry = Registry("adapter")


class Installed:
    """Handle of an installed adapter: ``remove()`` undoes every change, last first (idempotent).
    ``strength`` is the factor on the adapter's contribution this installation asked for (1: as
    trained; only adapters with ``supports_strength`` take another)."""

    def __init__(self, strength: float = 1.0) -> None:
        self._undo: list[Callable[[], None]] = []
        self.strength = float(strength)

    def on_remove(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


class Adapter(torch.nn.Module, ABC):
    """Base class of adapters. Subclasses set ``kind``, take JSON-able constructor arguments that
    :meth:`spec` returns, and implement :meth:`_attach` (register undo steps on ``handle``)."""

    kind: ClassVar[str] = ""
    supports_strength: ClassVar[bool] = False  # whether _attach scales its contribution by handle.strength

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able): ``type(self)(**self.spec())`` rebuilds the shape."""

    @abstractmethod
    def _attach(self, pipe, handle: Installed) -> None:
        """Attach to ``pipe``; every change registered with ``handle.on_remove``."""

    def install(self, pipe, *, strength: float = 1.0) -> Installed:
        """Attach to ``pipe`` (moved to its denoiser's device and dtype) until ``remove()``; its
        contribution times ``strength`` (refused unless 1 for adapters without ``supports_strength``)."""
        if float(strength) != 1.0 and not self.supports_strength:
            raise InputError(f"the {self.kind} adapter has no strength: it can only be applied as trained (scale 1), "
                             f"not scaled by {strength}")
        denoiser = family_of(pipe).denoiser(pipe)
        self.to(device=denoiser.device, dtype=denoiser.dtype)
        handle = Installed(strength)
        try:
            self._attach(pipe, handle)
        except BaseException:
            handle.remove()
            raise
        return handle

    @contextlib.contextmanager
    def installed(self, pipe, *, strength: float = 1.0) -> Iterator[Adapter]:
        handle = self.install(pipe, strength=strength)
        try:
            yield self
        finally:
            handle.remove()

    def describe(self) -> dict[str, Any]:
        """What an artifact's manifest records: kind, module (to find the kind again) and spec."""
        return {"kind": self.kind, "module": type(self).__module__, "spec": self.spec(),
                "parameters": int(sum(p.numel() for p in self.parameters()))}


def register_adapter(kind: str):
    """Class decorator: register an :class:`Adapter` subclass under ``kind`` (sets ``cls.kind``)."""

    def decorator(cls):
        cls.kind = kind
        return ADAPTERS.register(kind)(cls)

    return decorator


def adapter_from(description: dict[str, Any], state: dict[str, torch.Tensor]) -> Adapter:
    """Rebuild the adapter an artifact's manifest ``description`` names, with weights ``state``."""
    module = str(description.get("module", ""))
    if not module.startswith("efface."):
        raise ModelLoadError(f"adapter module {module!r} is not part of efface; this artifact cannot be loaded")
    importlib.import_module(module)  # registers the kind
    adapter = ADAPTERS.get(description["kind"])(**description["spec"])
    adapter.load_state_dict(state, strict=True)
    return adapter


class _WrappedProcessor:
    """An attention processor that calls the original one, then ``after(name, output, hidden_states,
    encoder_hidden_states, kwargs)`` (``kwargs``: the processor's other keyword arguments, e.g. Flux's
    ``image_rotary_emb``)."""

    def __init__(self, original, name: str, after: Callable):
        self.original, self.name, self.after = original, name, after

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        if image_rotary_emb is not None:  # Flux's FluxAttention passes it positionally; UNet processors take none
            kwargs["image_rotary_emb"] = image_rotary_emb
        out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **kwargs)
        return self.after(self.name, out, hidden_states, encoder_hidden_states, kwargs)


def wrap_attention_processors(unet, handle: Installed, choose: Callable[[str], bool], after: Callable) -> list[str]:
    """Wrap the processor of every attention module whose processor key (``"...attn2.processor"``)
    ``choose`` accepts: its output becomes ``after(key, output, hidden_states, encoder_hidden_states, kwargs)``.
    The original processors come back on ``handle.remove()``. Returns the wrapped keys."""
    original = dict(unet.attn_processors)
    chosen = [k for k in original if choose(k)]
    if not chosen:
        raise ValueError("no attention module matched; nothing to wrap")
    unet.set_attn_processor({k: _WrappedProcessor(p, k, after) if k in chosen else p for k, p in original.items()})
    handle.on_remove(lambda: unet.set_attn_processor(original))
    return chosen


def forward_hooks(modules: dict[str, torch.nn.Module], handle: Installed, hook: Callable) -> None:
    """``hook(name, module, inputs, output) -> output`` as a forward hook on each of ``modules``;
    removed on ``handle.remove()``."""
    for name, module in modules.items():
        h = module.register_forward_hook(lambda m, args, out, _n=name: hook(_n, m, args, out))
        handle.on_remove(h.remove)


def forward_pre_hook(module: torch.nn.Module, handle: Installed, hook: Callable) -> None:
    """``hook(module, args, kwargs)`` before each forward of ``module`` (e.g. to read the UNet's
    ``encoder_hidden_states``); may return ``(args, kwargs)``; removed on ``handle.remove()``."""
    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    handle.on_remove(h.remove)
