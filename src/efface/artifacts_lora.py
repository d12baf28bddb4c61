"""An artifact's weight change as a LoRA that plain diffusers loads: ``pipe.load_lora_weights(dir)``.

Every changed ``Linear`` (or ``Conv2d``) weight ``W -> W'`` is factored through the SVD of its
change, ``dW = W' - W = U S V^T ~ B A`` with ``B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T`` (a
convolution's ``A`` keeps the kernel, ``B`` is 1 x 1, as peft's conv LoRA). The rank ``r`` per layer:

* ``"exact"`` (closed forms: UCE, RECE, MACE): the numerical rank of ``dW``, the singular values above
  ``s_max * max(m, n) * eps`` of the artifact's dtype (numpy's ``matrix_rank`` rule). A closed-form
  change has rank at most the number of its keys (UCE: ``dW = (V* - W K) K^T M^-1``); the rest of the
  spectrum is the rounding of the stored weights, so ``W + B A`` is ``W'`` to rounding.
* ``"svd"`` (trained methods): the smallest rank that keeps ``energy`` (99 %) of ``sum s^2``, or
  ``rank`` when given (never above the numerical rank). The manifest reports the relative error
  ``||dW - B A||_F / ||dW||_F`` over all exported layers and the largest per layer.

A changed bias travels as peft's ``lora_B.bias`` (``lora_bias``, which diffusers detects from the
keys); then every layer of that component carries one (zeros where the bias did not change), and
peft cannot *fuse* the layers whose base has no bias (``load_lora_weights`` / ``set_adapters`` work).
No alphas are written: diffusers then takes alpha = rank per layer, so the adapter adds exactly
``B A`` and ``pipe.set_adapters(name, adapter_weights=s)`` scales like ``ErasedModel.apply(pipe, scale=s)``.

The file is written by the pipeline class's own ``save_lora_weights`` (``unet_lora_layers``,
``transformer_lora_layers``, ``text_encoder_lora_layers``, ``text_encoder_2_lora_layers``), keys
``"<denoiser>.<module>.lora_A.weight"`` (peft's names) and
``"text_encoder.<module>.lora_linear_layer.down.weight"`` (diffusers' own, :func:`write_lora`).
What a LoRA cannot carry is refused before any work
(:func:`lora_refusal`): norms, embeddings, grouped convolutions, components diffusers loads no LoRA
into (T5) and text-encoder layers its loader does not size (anything but CLIP's attention and MLP).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path

import torch

from efface.models.families import family_of

LORA_DIR = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(dir) looks for
ENERGY = 0.99  # the share of the change's energy (sum of squared singular values) an "svd" export keeps
# the text-encoder layers diffusers' loader reads a rank from (diffusers.loaders.lora_base._load_lora_into_text_encoder)
TEXT_ENCODER_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
# named parameter sets (efface.models.params) that hold parameters no LoRA on Linear / Conv2d layers can carry
NOT_LORA_SETS = {
    "noxattn": "it changes the norms (GroupNorm / LayerNorm scales and shifts) as well as the linear and conv layers",
    "all": "it changes the norms (GroupNorm / LayerNorm scales and shifts) as well as the linear and conv layers",
    "text_encoder": "it changes the token / position embeddings and the layer norms of the text encoder",
    "text_encoder_layers": "it changes the layer norms of the text encoder",
}


def lora_refusal(pipe, keys) -> str | None:
    """Why the changed parameters ``keys`` (``"<component>.<name>"``) of ``pipe`` cannot be a
    diffusers LoRA of that pipeline's class, or None when they can."""
    cls = type(pipe)
    loadable = tuple(getattr(cls, "_lora_loadable_modules", ()) or ())
    if not loadable or not hasattr(cls, "save_lora_weights"):
        return f"diffusers' {cls.__name__} has no LoRA loader"
    writer = inspect.signature(cls.save_lora_weights).parameters
    denoiser = family_of(pipe).denoiser_name
    bad: list[str] = []
    for key in keys:
        component, _, name = key.partition(".")
        if component not in loadable or f"{component}_lora_layers" not in writer:
            return (f"it changes {component}, and diffusers' {cls.__name__} loads LoRAs only into "
                    f"{', '.join(c for c in loadable if f'{c}_lora_layers' in writer)}")
        module_name, _, leaf = name.rpartition(".")
        module = getattr(pipe, component).get_submodule(module_name)
        linear = isinstance(module, torch.nn.Linear)
        conv = isinstance(module, torch.nn.Conv2d) and module.groups == 1 and component == denoiser
        if leaf not in ("weight", "bias") or not (linear or conv):
            bad.append(f"{key} ({type(module).__name__})")
        elif component != denoiser and not module_name.endswith(TEXT_ENCODER_TARGETS):
            bad.append(f"{key} (a text-encoder layer diffusers' loader gives no rank)")
    if bad:
        return (f"{len(bad)} changed parameters are not weights of layers a diffusers LoRA carries (Linear, "
                f"Conv2d), e.g. {', '.join(bad[:3])}")
    return None


@torch.no_grad()
def lora_layers(tensors: dict[str, torch.Tensor], base: Callable[[str], torch.Tensor], *, mode: str = "svd",
                rank: int | None = None, energy: float = ENERGY) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The change ``tensors - base(key)`` as LoRA layers per component (``{"unet": {"<module>.lora_A.weight":
    ...}}``, float32, CPU) and the report the manifest records (mode, ranks, relative errors)."""
    if mode not in ("exact", "svd"):
        raise ValueError(f"mode must be 'exact' or 'svd', not {mode!r}")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = value
    layers: dict[str, dict[str, torch.Tensor]] = {}
    biased: set[str] = set()
    ranks: dict[str, int] = {}
    total = lost = worst = 0.0
    for module, new in modules.items():
        component, _, name = module.partition(".")
        a = b = bias = None
        if "weight" in new:
            w0 = base(f"{module}.weight")
            work = torch.float64 if w0.device.type == "cpu" else torch.float32
            delta = new["weight"].to(w0.device, work) - w0.to(work)
            shape = delta.shape
            if delta.any():
                u, s, vh = torch.linalg.svd(delta.reshape(shape[0], -1), full_matrices=False)
                tol = s[0] * max(u.shape[0], vh.shape[1]) * torch.finfo(new["weight"].dtype).eps
                numerical = max(int((s > tol).sum()), 1)
                if rank is not None:
                    r = min(int(rank), numerical)
                elif mode == "exact":
                    r = numerical
                else:
                    share = torch.cumsum(s**2, 0) / (s**2).sum()
                    r = min(int((share < energy).sum()) + 1, numerical)
                root = s[:r].sqrt()
                a = (root[:, None] * vh[:r]).reshape(r, *shape[1:])
                b = (u[:, :r] * root).reshape(shape[0], r, *([1] * (len(shape) - 2)))
                norm2, rest2 = float((s**2).sum()), float((s[r:] ** 2).sum())
                total, lost = total + norm2, lost + rest2
                worst = max(worst, math.sqrt(rest2 / norm2))
                ranks[module] = r
        if "bias" in new:
            b0 = base(f"{module}.bias")
            bias = new["bias"].to(b0.device, torch.float64) - b0.double()
            if not bias.any():
                bias = None
        if a is None and bias is None:
            continue  # stored, but equal to the base
        if a is None:  # only the bias changed: a rank-1 branch of zeros carries it
            w = base(f"{module}.weight")
            a, b = w.new_zeros(1, *w.shape[1:]), w.new_zeros(w.shape[0], 1, *([1] * (w.dim() - 2)))
            ranks[module] = 1
        out = layers.setdefault(component, {})
        out[f"{name}.lora_A.weight"] = a.float().cpu().contiguous()
        out[f"{name}.lora_B.weight"] = b.float().cpu().contiguous()
        if bias is not None:
            out[f"{name}.lora_B.bias"] = bias.float().cpu().contiguous()
            biased.add(component)
    for component in biased:  # lora_bias is per component in peft's config: every layer has one
        out = layers[component]
        for k in [k for k in out if k.endswith(".lora_B.weight")]:
            out.setdefault(k.removesuffix(".weight") + ".bias", torch.zeros(out[k].shape[0]))
    report = {
        "mode": mode if rank is None else "svd",
        "rank_option": rank,
        "energy": energy if rank is None and mode == "svd" else None,
        "layers": len(ranks),
        "components": sorted(layers),
        "max_rank": max(ranks.values(), default=0),
        "relative_error": math.sqrt(lost / total) if total else 0.0,
        "max_layer_relative_error": worst,
        "bias": sorted(biased),
        "ranks": ranks,
        "file": f"{LORA_DIR}/{LORA_FILE}",
    }
    return layers, report


def write_lora(pipe_class: type, layers: dict[str, dict[str, torch.Tensor]], directory: str | Path) -> Path:
    """Write ``layers`` (per component) with ``pipe_class.save_lora_weights`` (diffusers' own writer:
    ``unet_lora_layers=...``, ``text_encoder_lora_layers=...``); returns the file written.

    The denoiser's layers go in peft's names (``lora_A`` / ``lora_B``); a text encoder's in diffusers'
    (``lora_linear_layer.down`` / ``.up``, what ``convert_state_dict_to_diffusers`` makes of peft's
    attention keys): diffusers' text-encoder loader converts peft names only for the attention
    projections and fails on a file whose text-encoder layers are all MLP layers (``fc1`` / ``fc2``),
    while it reads its own names for every layer."""
    directory = Path(directory)
    named = {c: {_diffusers_name(k): v for k, v in layer.items()} if c.startswith("text_encoder") else layer
             for c, layer in layers.items()}
    pipe_class.save_lora_weights(directory, **{f"{c}_lora_layers": v for c, v in named.items()},
                                 safe_serialization=True)
    return directory / LORA_FILE


def _diffusers_name(key: str) -> str:
    return key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up.")
