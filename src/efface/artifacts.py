"""Erased models as artifacts: only the changed tensors, a JSON manifest, and the base's fingerprint.

Layout of an artifact directory::

    manifest.json         method, config, request, base reference + hash, version, seed, time, counts
    weights.safetensors   the new values of every changed parameter ("unet.<name>", "text_encoder.<name>")
    base.safetensors      the base model's fingerprint (mean |w| per parameter), to refuse other bases
    pipeline/             only with save_pipeline: a complete diffusers pipeline with the edit applied

An artifact applies to the base it was fitted on, in any dtype or device; another base is refused.
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
    """The result of an erasure: new values for some parameters of one base model.

    ``apply(pipe)`` writes them into a pipeline of that base; ``applied(pipe)`` does so for the
    duration of a ``with`` block and restores the base afterwards; ``save`` / ``load`` round-trip.
    """

    tensors: dict[str, torch.Tensor]
    manifest: dict
    fingerprint: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0, dtype=torch.float64))

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
    def apply(self, pipe, *, check: bool = True):
        """Write the erased weights into ``pipe`` (in place) and return it."""
        if check:
            self.check_base(pipe)
        for key, value in self.tensors.items():
            param = get_parameter(pipe, key)
            param.copy_(value.to(device=param.device, dtype=param.dtype))
        return pipe

    @contextlib.contextmanager
    def applied(self, pipe) -> Iterator:
        """Apply for the duration of the block; the base weights are restored afterwards."""
        self.check_base(pipe)
        saved = {k: get_parameter(pipe, k).detach().clone() for k in self.tensors}
        try:
            yield self.apply(pipe, check=False)
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    get_parameter(pipe, k).copy_(v)

    def save(self, out: str | Path, *, pipe=None, save_pipeline: bool = False, overwrite: bool = False) -> Path:
        """Write the artifact atomically; with ``save_pipeline`` also a full diffusers pipeline
        (``pipe`` must be the base; it is restored afterwards)."""
        if save_pipeline and pipe is None:
            raise InputError("save_pipeline needs the base pipeline: save(out, pipe=pipe, save_pipeline=True)")
        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, tmp / "weights.safetensors")
            save_file({"mean_abs": self.fingerprint}, tmp / "base.safetensors")
            (tmp / "manifest.json").write_text(json.dumps(self.manifest, indent=2, default=str))
            if save_pipeline:
                with self.applied(pipe):
                    pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
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
        return cls(load_file(path / "weights.safetensors"), manifest,
                   load_file(path / "base.safetensors")["mean_abs"])
