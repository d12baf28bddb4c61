"""Erased models as artifacts: only the changed tensors, a JSON manifest, and the base's fingerprint.

Layout of an artifact directory::

    manifest.json         method, config, request, base reference + hash, version, seed, time, counts
    weights.safetensors   the new values of every changed parameter ("unet.<name>", "text_encoder.<name>")
    adapter.safetensors   only for methods that add modules (Receler, SPM): the adapter's weights;
                          manifest["adapter"] names its kind, module and constructor arguments
    base.safetensors      the base model's fingerprint (mean |w| per parameter), to refuse other bases
    pipeline/             only with save_pipeline: a complete diffusers pipeline with the edit applied
    text_encoder/, unet/  only with components: that component with the edit applied (diffusers format)
    lora/                 only with lora (SPM): the adapter as a LoRA plain diffusers loads

An artifact applies to the base it was fitted on, in any dtype or device; another base is refused.
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
from efface.models.params import get_parameter, named_parameters

log = logging.getLogger(__name__)
FORMAT = "efface-erased/1"


@torch.no_grad()
def base_fingerprint(pipe) -> torch.Tensor:
    """Mean absolute value of every UNet and text-encoder parameter (float64), in a fixed order."""
    return torch.tensor([p.detach().float().abs().mean().item() for _, _, p in named_parameters(pipe)],
                        dtype=torch.float64)


@torch.no_grad()
def base_hash(pipe) -> str:
    """SHA-256 of the UNet and text-encoder weights (names, shapes and float32 values)."""
    h = hashlib.sha256()
    for component, name, p in named_parameters(pipe):
        h.update(f"{component}.{name}:{tuple(p.shape)}".encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
    fingerprint: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    adapter: Adapter | None = field(default=None, repr=False)

    @property
    def method(self) -> str:
        return self.manifest["method"]

    def check_base(self, pipe) -> None:
        """Refuse ``pipe`` unless it is the base this artifact was fitted on (any dtype)."""
        mine = base_fingerprint(pipe)
        ok = mine.shape == self.fingerprint.shape and torch.allclose(mine, self.fingerprint, rtol=2e-3, atol=1e-6)
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
        bad = sorted(set(components) - {"unet", "text_encoder"})
        if bad:
            raise InputError(f"components must be 'unet' or 'text_encoder', not {bad}")
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
            save_file({"mean_abs": self.fingerprint}, tmp / "base.safetensors")
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
        return cls(load_file(path / "weights.safetensors"), manifest,
                   load_file(path / "base.safetensors")["mean_abs"], adapter)
