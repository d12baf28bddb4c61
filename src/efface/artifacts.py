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
    lora/                 only with lora: the change as a LoRA plain diffusers loads (weights: their
                          change's SVD, :mod:`efface.artifacts_lora`; SPM: its membranes)

An artifact applies to the base it was fitted on, in any dtype or device; another base is refused.
Only the components it changes are compared, so a text-encoder edit applies to any pipeline that
shares that text encoder.

``apply(pipe, scale=s)`` writes ``W + s (W' - W)`` and installs the adapter (its strength s, where
the adapter has one), and returns an :class:`Applied` handle: ``remove()`` writes back exactly what
it overwrote and uninstalls the adapter. Artifacts of one base stack: while others are applied, the
base check and the change ``W' - W`` are against the base as it was before any of them (efface
keeps what it overwrote per pipeline), the changes add up, and removing in reverse order restores
the base bit for bit (in another order: the weights the remaining ones give).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from efface.artifacts_lora import LORA_DIR, LORA_FILE, lora_layers, lora_refusal, write_lora
from efface.errors import InputError, ModelLoadError
from efface.io import atomic_dir
from efface.models.adapters import Adapter, adapter_from
from efface.models import params
from efface.models.params import get_parameter, named_parameters

log = logging.getLogger(__name__)
FORMAT = "efface-erased/1"


LEGACY_COMPONENTS = ("unet", "text_encoder")  # what "mean_abs" of efface-erased/1 base files covered


@torch.no_grad()
def base_fingerprint(pipe, components: tuple[str, ...] | None = None,
                     originals: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per trainable component (or those in ``components``): the mean absolute value of each of its
    parameters (float64), in a fixed order. One read of the weights, no copy; dtype-independent to
    within rounding, so an artifact applies to its base in any dtype. ``originals`` (key ->
    tensor) stand in for the parameters they name (the base under applied artifacts)."""
    rows: dict[str, list[float]] = {}
    originals = originals or {}
    for component, name, p in named_parameters(pipe, components):
        p = originals.get(f"{component}.{name}", p)
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


class _Stack:
    """The artifacts applied to one pipeline, in order, and the base values of every parameter one
    of them changed (CPU copies, taken by the first that changed it)."""

    def __init__(self) -> None:
        self.handles: list[Applied] = []
        self.originals: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def write(self, pipe, key: str) -> None:
        """Set parameter ``key`` to the base plus every applied change of it, in order: the first
        at scale 1 is its stored value exactly, the others add ``s (W' - W)`` (float32)."""
        param, original = get_parameter(pipe, key), self.originals[key]
        parts = [(h.erased.tensors[key], h.scale) for h in self.handles if key in h.erased.tensors]
        if not parts:
            param.copy_(original)
            del self.originals[key]
            return
        w0 = original.to(param.device)
        value = None
        for new, scale in parts:
            new = new.to(param.device, param.dtype)
            if value is None and scale == 1.0:
                value = new
            else:
                start = w0 if value is None else value
                value = (start.float() + scale * (new.float() - w0.float())).to(param.dtype)
        param.copy_(value)


_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline -> _Stack, while artifacts are applied


def _base_values(pipe) -> dict[str, torch.Tensor]:
    """The base values of the parameters that artifacts applied to ``pipe`` changed (key -> CPU tensor)."""
    stack = _STACKS.get(pipe)
    return stack.originals if stack is not None else {}


class Applied:
    """An artifact applied to a pipeline (what :meth:`ErasedModel.apply` returns), as peft's
    adapters: ``remove()`` writes back exactly the weights it overwrote and uninstalls its adapter
    (idempotent); ``with erased.apply(pipe): ...`` removes it at the end of the block."""

    def __init__(self, erased: ErasedModel, pipe, scale: float) -> None:
        self.erased, self.scale = erased, scale
        self._pipe = weakref.ref(pipe)
        self._adapter = None  # the adapter's Installed handle
        self.active = False

    @property
    def pipe(self):
        return self._pipe()

    def remove(self) -> None:
        """Undo this application: its adapter uninstalled, every weight it changed set to the base
        plus the changes of the artifacts still applied (removing in reverse order: the weights
        exactly as they were before it)."""
        pipe = self.pipe
        if not self.active or pipe is None:
            return
        stack = _STACKS[pipe]
        later = stack.handles[stack.handles.index(self) + 1:]
        if self._adapter is not None and any(h._adapter is not None for h in later):
            raise InputError(f"the {self.erased.method} artifact's adapter was applied before another adapter "
                             "artifact that is still applied: remove that one first (reverse order)")
        if self._adapter is not None:
            self._adapter.remove()
            self._adapter = None
        stack.handles.remove(self)
        self.active = False
        for key in self.erased.tensors:
            stack.write(pipe, key)
        if not stack.handles:
            del _STACKS[pipe]

    def __enter__(self):
        return self.pipe

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Applied({self.erased.method}, scale={self.scale}, active={self.active})"


@dataclass
class ErasedModel:
    """The result of an erasure: new values for some parameters of one base model, and for
    methods that add modules, an :class:`~efface.models.adapters.Adapter`.

    ``apply(pipe, scale=1.0)`` writes them into a pipeline of that base (and installs the adapter)
    and returns an :class:`Applied` handle (``remove()``); ``applied(pipe)`` does so for the
    duration of a ``with`` block; artifacts of one base stack. ``save`` / ``load`` round-trip
    (``save_pretrained`` / ``from_pretrained``, the names peft and diffusers use, are the same);
    ``save(out, pipe=base, lora=True)`` also writes a LoRA plain diffusers loads.
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
            mine = torch.cat(list(base_fingerprint(pipe, LEGACY_COMPONENTS, _base_values(pipe)).values()))
            ok = _close(mine, self.fingerprint["mean_abs"])
        else:  # with artifacts applied: the base they were applied to
            mine = base_fingerprint(pipe, tuple(self.fingerprint), _base_values(pipe))
            ok = all(c in mine and _close(mine[c], v) for c, v in self.fingerprint.items())
        if not ok:
            raise InputError(
                f"this {self.method} artifact was fitted on base {self.manifest['base']['reference']!r} "
                f"(sha256 {self.manifest['base']['sha256'][:12]}...) and does not match the model given; "
                "load the same base model to apply it")

    def apply(self, pipe, *, scale: float = 1.0, check: bool = True) -> Applied:
        """Write the erased weights into ``pipe`` (in place) and install the adapter if there is one;
        returns the :class:`Applied` handle whose ``remove()`` undoes exactly this.

        ``scale`` s: every changed weight becomes ``W + s (W' - W)`` (0: the base, 1: the erasure,
        in between or beyond: less or more of it); an adapter takes it as its strength where it has
        one (Receler, SPM), and ``scale != 1`` is refused for one that has none. Applied on top of
        other artifacts of the same base (stacking), ``W`` is the base before any of them and the
        changes add up; the base check is against that base too."""
        scale = float(scale)
        if not math.isfinite(scale):
            raise InputError(f"scale must be a finite number, not {scale}")
        if self.adapter is not None and scale != 1.0 and not self.adapter.supports_strength:
            raise InputError(f"{self.method} adds a {self.adapter.kind} adapter, which has no strength: apply it "
                             f"with scale=1 (not {scale})")
        stack = _STACKS.get(pipe)
        if stack is not None and any(h.erased is self for h in stack.handles):
            raise InputError(f"this {self.method} artifact is already applied to this pipeline: remove its handle "
                             "first (for more of its change, apply it once with a larger scale)")
        if check:
            self.check_base(pipe)
        for key in self.tensors:
            get_parameter(pipe, key)  # every key exists before anything is written
        if stack is None:
            stack = _STACKS[pipe] = _Stack()
        handle = Applied(self, pipe, scale)
        with torch.no_grad():
            for key in self.tensors:
                if key not in stack.originals:
                    stack.originals[key] = get_parameter(pipe, key).detach().to("cpu", copy=True)
        stack.handles.append(handle)
        handle.active = True
        try:
            for key in self.tensors:
                stack.write(pipe, key)
            if self.adapter is not None:
                handle._adapter = self.adapter.install(pipe, strength=scale)
        except BaseException:
            handle.remove()
            raise
        return handle

    @contextlib.contextmanager
    def applied(self, pipe, *, scale: float = 1.0) -> Iterator:
        """Apply (``scale`` as :meth:`apply`) for the duration of the block; removed afterwards."""
        handle = self.apply(pipe, scale=scale)
        try:
            yield pipe
        finally:
            handle.remove()

    def applied_copy(self, pipe, *, scale: float = 1.0):
        """A second pipeline with this artifact applied, beside ``pipe`` (left as it is): the same
        module structure, sharing every parameter the artifact does not change; only the changed
        tensors, the modules around them, buffers and the scheduler are copied; tokenizers are
        shared (a copied transformers tokenizer loses its decode wrapper). For holding the original
        and the erased model at once (attacks, robustness) without a second model in memory."""
        import copy

        changed = set(self.tensors)
        memo = {id(p): p for c, n, p in named_parameters(pipe) if f"{c}.{n}" not in changed}
        for name, component in pipe.components.items():
            if component is not None and not isinstance(component, torch.nn.Module) and name != "scheduler":
                memo[id(component)] = component
        twin = copy.deepcopy(pipe, memo)
        self.apply(twin, scale=scale)
        return twin

    def lora_refusal(self, pipe=None) -> str | None:
        """Why this artifact cannot be saved as a diffusers LoRA (``save(lora=True)``), or None."""
        if self.adapter is not None and not hasattr(self.adapter, "lora_state_dict"):
            return f"{self.method} adds a {self.adapter.kind} adapter, which has no LoRA form"
        if not self.tensors:
            return None if self.adapter is not None else f"this {self.method} artifact changes nothing"
        if pipe is None:
            return "a LoRA of changed weights is their difference from the base: save(out, pipe=base, lora=True)"
        return lora_refusal(pipe, self.tensors)

    def save(self, out: str | Path, *, pipe=None, save_pipeline: bool = False, components: tuple[str, ...] = (),
             lora: bool = False, lora_rank: int | None = None, overwrite: bool = False) -> Path:
        """Write the artifact atomically; with ``save_pipeline`` also a full diffusers pipeline
        (``out/pipeline``), with ``components`` (``"unet"``, ``"text_encoder"``) each of those as a
        diffusers model directory (``out/text_encoder``: e.g. AdvUnlearn's plug-in text encoder,
        ``CLIPTextModel.from_pretrained(out / "text_encoder")``), with ``lora`` the change as a LoRA
        that plain diffusers loads (``out/lora``: ``pipe.load_lora_weights(out / "lora")``): changed
        weights through their change's SVD (:mod:`efface.artifacts_lora`: the exact rank for the
        closed forms, the rank keeping 99 % of the energy or ``lora_rank`` for trained methods; the
        manifest's ``"lora"`` reports ranks and relative error), an adapter through its own export
        (SPM). ``pipe`` must be the base; it is restored afterwards."""
        lora_state, lora_report = self._lora(pipe, lora_rank) if lora else ({}, None)
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
            if lora and lora_state:
                write_lora(type(pipe), lora_state, tmp / LORA_DIR)
            elif lora:
                self.adapter.save_lora(tmp / LORA_DIR)
            manifest = {**self.manifest, "lora": lora_report} if lora else self.manifest
            save_file({c: v.contiguous() for c, v in self.fingerprint.items()}, tmp / "base.safetensors")
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            if save_pipeline or components:
                with self.applied(pipe):
                    if save_pipeline:
                        pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
                    for component in components:
                        getattr(pipe, component).save_pretrained(tmp / component, safe_serialization=True)
        if lora:
            self.manifest["lora"] = lora_report
        log.info("saved %s artifact (%d tensors) to %s", self.method, len(self.tensors), out)
        return Path(out)

    save_pretrained = save  # peft's / diffusers' name

    def _lora(self, pipe, rank: int | None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """The LoRA layers per component (empty: the adapter writes its own) and the manifest's report."""
        why = self.lora_refusal(pipe)
        if why:
            raise InputError(f"no LoRA export: {why}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise InputError(f"lora_rank must be a whole number of at least 1, not {rank!r}")
        if not self.tensors:  # an adapter with its own export (SPM)
            if rank is not None:
                raise InputError(f"lora_rank sets the rank of changed weights; {self.method}'s LoRA has its "
                                 "adapter's own rank")
            return {}, {"mode": "adapter", "kind": self.adapter.kind, "file": f"{LORA_DIR}/{LORA_FILE}"}
        self.check_base(pipe)
        originals = _base_values(pipe)  # the base under artifacts applied to pipe
        mode = self.manifest.get("lora_export") or "svd"
        layers, report = lora_layers(self.tensors, lambda k: originals.get(k, get_parameter(pipe, k).detach()),
                                     mode=mode if mode in ("exact", "svd") else "svd", rank=rank)
        if not layers:
            raise InputError(f"no LoRA export: this {self.method} artifact's weights equal the base's")
        if self.adapter is not None:  # weights and an adapter: one file
            for key, value in self.adapter.lora_state_dict().items():
                component, _, name = key.partition(".")
                if name in layers.get(component, {}):
                    raise InputError(f"no LoRA export: {key} is both a changed weight's and the adapter's layer")
                layers.setdefault(component, {})[name] = value
            report["adapter"] = self.adapter.kind
        return layers, report

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

    from_pretrained = load  # peft's / diffusers' name


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=2e-3, atol=1e-6)
