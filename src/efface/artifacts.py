"""Erased models as artifacts: only the changed tensors, a JSON manifest, and the base's fingerprint.

Layout of an artifact directory::

    manifest.json         method, config, request, base reference + hash, version, seed, time, counts
    weights.safetensors   the new values of every changed parameter ("<component>.<name>": "unet.<name>",
                          "transformer.<name>", "text_encoder_2.<name>", ...)
    adapter.safetensors   only for methods that add modules (Receler, SPM): the adapter's weights;
                          manifest["adapter"] names its kind, module and constructor arguments
    base.safetensors      the base's fingerprint per component it depends on (mean |w| per parameter,
                          one tensor per component), to refuse other bases
    pipeline/             only with save_pipeline: a complete diffusers pipeline with the edit applied
    text_encoder/, unet/  only with components: that component with the edit applied (diffusers format)
    lora/                 only with lora (SPM): the adapter as a LoRA plain diffusers loads

An artifact applies to the base it was fitted on, in any dtype or device; another base is refused.
Only the components it changes are compared, so a text-encoder edit applies to any pipeline that
shares that text encoder.
An adapter (:mod:`efface.models.adapters`) is installed by ``apply`` and removed after ``applied``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from efface.errors import InputError, ModelLoadError
from efface.io import atomic_dir
from efface.models.adapters import Adapter, adapter_from
from efface.models import params
from efface.models.params import get_parameter, named_parameters

log = logging.getLogger(__name__)
FORMAT = "efface-erased/1"


LEGACY_COMPONENTS = ("unet", "text_encoder")  # what "mean_abs" of efface-erased/1 base files covered


@torch.no_grad()
def base_fingerprint(pipe, components: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Per trainable component (or those in ``components``): the mean absolute value of each of its
    parameters (float64), in a fixed order. One read of the weights, no copy; dtype-independent to
    within rounding, so an artifact applies to its base in any dtype."""
    rows: dict[str, list[float]] = {}
    for component, _, p in named_parameters(pipe, components):
        rows.setdefault(component, []).append(p.detach().abs().mean(dtype=torch.float32).item())
    return {c: torch.tensor(v, dtype=torch.float64) for c, v in rows.items()}


@torch.no_grad()
def base_hash(pipe) -> str:
    """SHA-256 of every trainable component's weights: names, shapes and the raw bytes as stored
    (float32 models: their float32 values). Reads each tensor once, without conversion."""
    h = hashlib.sha256()
    for component, name, p in named_parameters(pipe):
        h.update(f"{component}.{name}:{tuple(p.shape)}".encode())
        t = p.detach().cpu().contiguous()
        h.update(t.view(torch.uint8).reshape(-1).numpy().data)
    return h.hexdigest()


def touched_components(tensors: dict[str, torch.Tensor], adapter: Adapter | None, pipe=None) -> tuple[str, ...]:
    """The components an artifact depends on: those of its changed tensors; with an adapter
    (trained against the whole model), every component."""
    if adapter is not None:
        return params.components(pipe) if pipe is not None else ()
    return tuple(sorted({k.partition(".")[0] for k in tensors}))


@dataclass
class ErasedModel:
    """The result of an erasure: new values for some parameters of one base model, and for
    methods that add modules, an :class:`~efface.models.adapters.Adapter`.

    ``apply(pipe)`` writes them into a pipeline of that base (and installs the adapter);
    ``applied(pipe)`` does so for the duration of a ``with`` block and restores the base afterwards;
    ``save`` / ``load`` round-trip.
    """

    tensors: dict[str, torch.Tensor]
    manifest: dict
    fingerprint: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    adapter: Adapter | None = field(default=None, repr=False)

    @property
    def method(self) -> str:
        return self.manifest["method"]

    def check_base(self, pipe) -> None:
        """Refuse ``pipe`` unless it holds the base this artifact was fitted on (any dtype). Only
        the components the artifact depends on are compared: an artifact that changes only the text
        encoder applies to any pipeline built on that same text encoder."""
        if "mean_abs" in self.fingerprint:  # efface-erased/1: UNet and text encoder together
            mine = torch.cat(list(base_fingerprint(pipe, LEGACY_COMPONENTS).values()))
            ok = _close(mine, self.fingerprint["mean_abs"])
        else:
            mine = base_fingerprint(pipe, tuple(self.fingerprint))
            ok = all(c in mine and _close(mine[c], v) for c, v in self.fingerprint.items())
        if not ok:
            raise InputError(
                f"this {self.method} artifact was fitted on base {self.manifest['base']['reference']!r} "
                f"(sha256 {self.manifest['base']['sha256'][:12]}...) and does not match the model given; "
                "load the same base model to apply it")

    @torch.no_grad()
    def _write(self, pipe) -> None:
        for key, value in self.tensors.items():
            param = get_parameter(pipe, key)
            param.copy_(value.to(device=param.device, dtype=param.dtype))

    def apply(self, pipe, *, check: bool = True):
        """Write the erased weights into ``pipe`` (in place), install the adapter if there is one
        (for good: use ``applied`` to remove it again) and return ``pipe``."""
        if check:
            self.check_base(pipe)
        self._write(pipe)
        if self.adapter is not None:
            self.adapter.install(pipe)
        return pipe

    @contextlib.contextmanager
    def applied(self, pipe) -> Iterator:
        """Apply for the duration of the block; the base weights (and processors) are restored afterwards."""
        self.check_base(pipe)
        saved = {k: get_parameter(pipe, k).detach().clone() for k in self.tensors}
        try:
            self._write(pipe)
            with self.adapter.installed(pipe) if self.adapter is not None else contextlib.nullcontext():
                yield pipe
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    get_parameter(pipe, k).copy_(v)

    def save(self, out: str | Path, *, pipe=None, save_pipeline: bool = False, components: tuple[str, ...] = (),
             lora: bool = False, overwrite: bool = False) -> Path:
        """Write the artifact atomically; with ``save_pipeline`` also a full diffusers pipeline
        (``out/pipeline``), with ``components`` (``"unet"``, ``"text_encoder"``) each of those as a
        diffusers model directory (``out/text_encoder``: e.g. AdvUnlearn's plug-in text encoder,
        ``CLIPTextModel.from_pretrained(out / "text_encoder")``), with ``lora`` the adapter as a LoRA
        that plain diffusers loads (``out/lora``; SPM: ``pipe.load_lora_weights(out / "lora")``).
        ``pipe`` must be the base; it is restored afterwards."""
        if lora and not hasattr(self.adapter, "save_lora"):
            raise InputError(f"{self.method} has no LoRA export (only adapter methods that define one, e.g. spm)")
        valid = params.components(pipe) if pipe is not None else ()
        bad = sorted(set(components) - set(valid))
        if bad and pipe is not None:
            raise InputError(f"components must be among {', '.join(valid)} (this pipeline's), not {bad}")
        if (save_pipeline or components) and pipe is None:
            raise InputError("saving a pipeline or component needs the base pipeline: save(out, pipe=pipe, ...)")
        if (save_pipeline or components) and self.adapter is not None:
            raise InputError(f"{self.method} adds modules ({self.adapter.kind}) that a plain diffusers pipeline "
                             "cannot hold: save without save_pipeline / components and apply it with efface "
                             "(ErasedModel.load(dir).apply(pipe))")
        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, tmp / "weights.safetensors")
            if self.adapter is not None:
                state = {k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()}
                save_file(state, tmp / "adapter.safetensors")
            if lora:
                self.adapter.save_lora(tmp / "lora")
            save_file({c: v.contiguous() for c, v in self.fingerprint.items()}, tmp / "base.safetensors")
            (tmp / "manifest.json").write_text(json.dumps(self.manifest, indent=2, default=str))
            if save_pipeline or components:
                with self.applied(pipe):
                    if save_pipeline:
                        pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
                    for component in components:
                        getattr(pipe, component).save_pretrained(tmp / component, safe_serialization=True)
        log.info("saved %s artifact (%d tensors) to %s", self.method, len(self.tensors), out)
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> ErasedModel:
        path = Path(path)
        if not (path / "manifest.json").exists():
            raise ModelLoadError(f"{path} is not an efface artifact (no manifest.json); "
                                 "make one with `efface erase ... --out DIR`")
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != FORMAT:
            raise ModelLoadError(f"{path}: artifact format {manifest.get('format')!r}, expected {FORMAT!r}")
        adapter = None
        if manifest.get("adapter"):
            adapter = adapter_from(manifest["adapter"], load_file(path / "adapter.safetensors"))
        return cls(load_file(path / "weights.safetensors"), manifest, load_file(path / "base.safetensors"), adapter)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=2e-3, atol=1e-6)
