"""Named parameter sets of a UNet / text encoder, as erasure papers name them.

Names follow diffusers' module names, so the same set selects the same layers on toy-sd, SD 1.x/2.x
and SDXL. ESD's sets follow the official code (github.com/rohitgandikota/erasing):

* ``xattn``: every parameter of the cross-attention modules (``attn2``): ESD-x;
* ``xattn_kv``: the cross-attention key and value projections (``attn2.to_k`` / ``attn2.to_v``):
  UCE, RECE, Concept Ablation, ESD-x-strict;
* ``noxattn``: everything but cross-attention, time embedding and the output layer (its norm and
  conv): ESD-u;
* ``all``: every parameter: ESD-all;
* ``text_encoder``: every text-encoder parameter.
* ``text_encoder_layers``: the text encoder's transformer layers and final layer norm, not its
  token / position embeddings (AdvUnlearn's ``text_encoder_full``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from efface.errors import InputError


def _unet_only(rule: Callable[[str], bool]) -> Callable[[str, str], bool]:
    return lambda component, name: component == "unet" and rule(name)


PARAMETER_SETS: dict[str, Callable[[str, str], bool]] = {
    "xattn": _unet_only(lambda n: ".attn2." in n),
    "xattn_kv": _unet_only(lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n),
    # CompVis "out." is the output GroupNorm + conv: diffusers' conv_norm_out and conv_out
    "noxattn": _unet_only(lambda n: ".attn2." not in n
                          and not n.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))),
    "all": _unet_only(lambda n: True),
    "text_encoder": lambda component, name: component == "text_encoder",
    "text_encoder_layers": lambda component, name: component == "text_encoder" and ".embeddings." not in f".{name}",
}
COMPONENTS = ("unet", "text_encoder")


def select(pipe, parameter_set: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``parameter_set``, keyed ``"<component>.<parameter name>"``."""
    if parameter_set not in PARAMETER_SETS:
        raise InputError(f"unknown parameter set {parameter_set!r}; valid: {', '.join(PARAMETER_SETS)}")
    rule = PARAMETER_SETS[parameter_set]
    chosen = {f"{c}.{n}": p for c, n, p in named_parameters(pipe) if rule(c, n)}
    if not chosen:
        raise InputError(f"parameter set {parameter_set!r} selects nothing in this model")
    return chosen


def named_parameters(pipe):
    """(component, name, parameter) for the UNet and the text encoder of ``pipe``."""
    for component in COMPONENTS:
        module = getattr(pipe, component, None)
        if module is not None:
            for name, p in module.named_parameters():
                yield component, name, p


def get_parameter(pipe, key: str) -> torch.nn.Parameter:
    """The parameter named ``"<component>.<name>"`` in ``pipe``."""
    component, _, name = key.partition(".")
    if component not in COMPONENTS or getattr(pipe, component, None) is None:
        raise KeyError(f"{key}: no component {component!r} in this pipeline")
    return getattr(pipe, component).get_parameter(name)


def cross_attention_modules(unet) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention modules (``...attn2``), by name."""
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
