"""One entry point that turns a model reference into a ready diffusers pipeline.

Accepted forms of ``model``:

* ``"toy"`` (or ``"toy-sd"``) — the bundled toy-sd weights (:data:`efface.toy.TOY_SD`); ``"toy-flux"``
  the bundled toy-flux (:data:`efface.toy.TOY_FLUX`);
* a local diffusers directory (it has ``model_index.json``): SD 1.x/2.x, SDXL, ...;
* a single-file ``.safetensors`` checkpoint in the original Stable Diffusion (LDM) key format, with
  ``config=`` a local diffusers directory of the same architecture (offline, diffusers cannot fetch one);
* a pickle checkpoint (``.ckpt``/``.bin``/``.pt``/``.pth``), only with ``allow_pickle=True``;
* a hub id (``org/name``) already in the local Hugging Face cache (downloaded only when online).

Device and dtype are checked before anything is read. User files are only ever read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from efface.errors import InputError, ModelLoadError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
_DEVICE_RE = re.compile(r"^(cpu|mps|auto|cuda(:\d+)?)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}
ACCEPTED_FORMS = ("'toy' (the bundled toy-sd), 'toy-flux', a local diffusers directory (with model_index.json), "
                  "a single-file .safetensors checkpoint (with config=DIR / --config DIR), "
                  "or a hub id like org/name that is already in the local Hugging Face cache")


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map ``fp32``/``float32``, ``fp16``/``float16``, ``bf16``/``bfloat16`` to a torch dtype."""
    key = dtype.strip().lower() if isinstance(dtype, str) else None
    if key not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_device(device: str) -> str:
    """Check a device name (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``) against this machine.

    An unknown spelling is an :class:`InputError`; a device this machine lacks is a :class:`ModelLoadError`.
    """
    name = device.strip().lower() if isinstance(device, str) else ""
    if not _DEVICE_RE.match(name):
        raise InputError(f"unknown device {device!r}; valid devices: cpu, cuda, cuda:N, mps, auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {name!r} was asked for but CUDA is not available on this machine "
                                 f"(torch {torch.__version__}); use --device cpu or --device auto")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {name!r} does not exist: this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("device 'mps' was asked for but MPS is not available; use --device cpu or auto")
    return name


def _dtype_kwargs(torch_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{"dtype": ...}`` where diffusers has renamed ``torch_dtype`` (it warns on the old name), else the old."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present since the rename)
    except ImportError:
        return {"torch_dtype": torch_dtype}
    return {"dtype": torch_dtype}


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().upper() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_pipeline(model: str | os.PathLike, *, device: str = "cpu", dtype: str = "fp32",
                  allow_pickle: bool = False, config: str | os.PathLike | None = None) -> DiffusionPipeline:
    """Load a diffusers pipeline from ``model`` (see the module docstring for the accepted forms).

    Args:
        model: ``"toy"``, a diffusers directory, a single-file checkpoint, or a cached hub id.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (cuda when available, else cpu).
        dtype: ``fp32``, ``fp16`` or ``bf16`` (long spellings ``float32``... also accepted).
        allow_pickle: load pickle checkpoints (.ckpt/.bin/.pt/.pth); they can run arbitrary code.
        config: local diffusers directory giving the architecture of a single-file checkpoint.

    Returns:
        The pipeline on ``device``, with ``pipe.efface_source`` set to the resolved path or hub id.

    Raises:
        InputError: unknown dtype or device spelling.
        ModelLoadError: anything that prevents loading; the message says what to do instead.
    """
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    if torch_dtype == torch.float16 and target == "cpu":
        log.warning("fp16 on CPU is slow and some operations are unsupported; fp32 or bf16 is safer on CPU")

    pipe, source = _load(model, torch_dtype, allow_pickle, config)
    pipe.to(target)
    pipe.efface_source = source
    log.info("loaded %s from %s (%s, %s)", type(pipe).__name__, source, target, str(torch_dtype)[6:])
    return pipe


def _load(model: str | os.PathLike, torch_dtype: torch.dtype, allow_pickle: bool,
          config: str | os.PathLike | None) -> tuple[DiffusionPipeline, str]:
    from efface.toy import ALIASES, TOY_MODELS

    name = ALIASES.get(model, model) if isinstance(model, str) else None
    if name in TOY_MODELS:
        weights = TOY_MODELS[name]
        if not (weights / "model_index.json").is_file():
            raise ModelLoadError(f"the bundled {name} weights are missing (expected at {weights}); "
                                 f"run `efface toy train --model {name}` to create them")
        return _from_directory(weights, torch_dtype), str(weights.resolve())

    path = Path(model).expanduser()
    if path.is_dir():
        if config is not None:
            log.warning("config= is only used for single-file checkpoints; ignored for %s", path)
        return _from_directory(path, torch_dtype), str(path.resolve())
    if path.is_file():
        return _from_single_file(path, torch_dtype, allow_pickle, config), str(path.resolve())
    text = os.fspath(model)
    if isinstance(model, str) and _HUB_ID_RE.match(text) and path.suffix.lower() not in (
            SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES):
        return _from_hub(text, torch_dtype), text
    raise ModelLoadError(f"model {text!r} not found: no such file or directory, and not a hub id. "
                         f"Accepted forms: {ACCEPTED_FORMS}")


def _from_directory(path: Path, torch_dtype: torch.dtype) -> DiffusionPipeline:
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is a directory but not a diffusers pipeline (it has no model_index.json). "
                             f"Accepted forms: {ACCEPTED_FORMS}")
    try:
        return DiffusionPipeline.from_pretrained(str(path), **_dtype_kwargs(torch_dtype), local_files_only=True)
    except Exception as e:  # diffusers raises many types; the message keeps the original
        raise ModelLoadError(f"could not load the diffusers directory {path}: {e}") from e


def _from_single_file(path: Path, torch_dtype: torch.dtype, allow_pickle: bool,
                      config: str | os.PathLike | None) -> DiffusionPipeline:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(f"refusing to load the pickle checkpoint {path}: pickle files can run arbitrary code "
                             "when loaded. Convert it to .safetensors, or, if you trust the file, pass "
                             "allow_pickle=True (CLI: --allow-pickle)")
    if suffix not in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES):
        raise ModelLoadError(f"{path} is a file of an unsupported type {suffix or '(no suffix)'!r}. "
                             f"Accepted forms: {ACCEPTED_FORMS}")
    if config is None:
        raise ModelLoadError(f"the single-file checkpoint {path} needs config=DIR (CLI: --config DIR): a local "
                             "diffusers directory of the same architecture (e.g. SD 1.5 or SDXL) giving the model "
                             "layout, scheduler and tokenizer; efface cannot fetch one from the hub while offline")
    config_dir = Path(config).expanduser()
    if not (config_dir / "model_index.json").is_file():
        raise ModelLoadError(f"config {str(config)!r} is not a local diffusers directory (no model_index.json); "
                             "pass the directory of a diffusers pipeline of the same architecture")
    pipeline_class = _pipeline_class(config_dir)
    try:
        return pipeline_class.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                               **_dtype_kwargs(torch_dtype))
    except Exception as e:
        raise ModelLoadError(f"could not load the checkpoint {path} with config {config_dir} "
                             f"(is it the same architecture?): {e}") from e


def _pipeline_class(config_dir: Path) -> type:
    """The pipeline class named in ``config_dir/model_index.json`` (StableDiffusionPipeline if unnamed)."""
    import diffusers

    try:
        name = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {config_dir / 'model_index.json'}: {e}") from e
    cls = getattr(diffusers, name or "StableDiffusionPipeline", None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise ModelLoadError(f"the pipeline class {name!r} named in {config_dir} cannot load single-file "
                             "checkpoints; convert the checkpoint to a diffusers directory instead")
    return cls


def _from_hub(repo_id: str, torch_dtype: torch.dtype) -> DiffusionPipeline:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, **_dtype_kwargs(torch_dtype), local_files_only=True)
    except Exception as e:
        local_error = e
    if hub_offline():
        if _in_cache(repo_id):
            raise ModelLoadError(f"{repo_id!r} is in the local Hugging Face cache but could not be loaded: "
                                 f"{local_error}") from local_error
        raise ModelLoadError(
            f"{repo_id!r} is not in the local Hugging Face cache, and efface cannot download it while offline "
            "(HF_HUB_OFFLINE is set). On a machine with network access run "
            f"`hf download {repo_id} --local-dir DIR`, copy DIR here, and pass the local directory instead "
            "(CLI: --model DIR).") from local_error
    log.info("%s is not cached locally; downloading it from the Hugging Face hub", repo_id)
    try:
        return DiffusionPipeline.from_pretrained(repo_id, **_dtype_kwargs(torch_dtype))
    except Exception as e:
        raise ModelLoadError(f"could not load {repo_id!r} from the Hugging Face hub: {e}") from e


def _in_cache(repo_id: str) -> bool:
    """Whether the cache holds this repo's ``model_index.json`` (tells 'not downloaded' from 'broken')."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except Exception:  # an odd id or cache layout: treat as not cached
        return False
