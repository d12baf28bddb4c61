"""Named parameter sets, as erasure papers name them, for every model family.

A set means the same idea on every family that has it (``xattn``: where the image reads the text;
``xattn_kv``: what the text is projected to; ``noxattn``, ``all``, ``text_input``,
``text_encoder``, ``text_encoder_layers``); each family spells it in its own module names
(:mod:`efface.models.families.unet` and :mod:`efface.models.families.flow` say what each set
selects, and which official script the choice follows). Parameters are keyed
``"<component>.<name>"``: ``unet.down_blocks...``, ``transformer.transformer_blocks...``,
``text_encoder_2.encoder...``.
"""

from __future__ import annotations

import torch

from efface.models.families import family_of


def select(pipe, parameter_set: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``parameter_set`` in ``pipe``, keyed ``"<component>.<parameter name>"``."""
    return family_of(pipe).select(pipe, parameter_set)


def named_parameters(pipe, components: tuple[str, ...] | None = None):
    """(component, name, parameter) for every trainable component of ``pipe`` (the denoiser, then each
    text encoder), or only those in ``components``."""
    return family_of(pipe).named_parameters(pipe, components)


def components(pipe) -> tuple[str, ...]:
    """The trainable components of ``pipe`` (``("unet", "text_encoder")`` on SD)."""
    return family_of(pipe).components(pipe)


def get_parameter(pipe, key: str) -> torch.nn.Parameter:
    """The parameter named ``"<component>.<name>"`` in ``pipe``."""
    component, _, name = key.partition(".")
    if component not in components(pipe):
        raise KeyError(f"{key}: no component {component!r} in this pipeline")
    return getattr(pipe, component).get_parameter(name)


def cross_attention_modules(pipe) -> dict[str, torch.nn.Module]:
    """The denoiser's attention modules where the image reads the text, by name (found by what the
    module is: ``is_cross_attention`` in UNets, joint attention in SD3 / Flux)."""
    return family_of(pipe).cross_attention(pipe)
