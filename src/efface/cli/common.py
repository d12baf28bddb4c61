"""Options and steps every command shares: the model options, the --out check, loading."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path


def _add_model_options(p: argparse.ArgumentParser) -> None:
    from efface.models.loading import load_pipeline

    defaults = {k: v.default for k, v in inspect.signature(load_pipeline).parameters.items()}
    g = p.add_argument_group("model")
    g.add_argument("--model", default="toy",
                   help="'toy' (bundled toy-sd), 'toy-flux', a diffusers directory, a single-file .safetensors "
                        "checkpoint, or a hub id already in the local cache; efface bench takes several, "
                        "comma-separated (default: toy)")
    g.add_argument("--device", default=defaults["device"], help=f"cpu, cuda, cuda:N, mps or auto (default: {defaults['device']})")
    g.add_argument("--dtype", default=defaults["dtype"], help=f"fp32, fp16 or bf16 (default: {defaults['dtype']})")
    g.add_argument("--config", default=defaults["config"],
                   help="local diffusers directory describing a single-file checkpoint's architecture")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow pickle checkpoints (.ckpt/.bin/.pt/.pth); they can run arbitrary code")


def _user_options(config_cls: type, args: argparse.Namespace, owner: str) -> dict:
    """A method's or attack's options from the command line: ``--options FILE`` (TOML), then every
    ``--set key=value`` over it; unknown keys are refused with the valid ones listed."""
    from efface import config as cfg

    options = cfg.load_options(config_cls, args.options, owner=owner) if getattr(args, "options", None) else {}
    return {**options, **cfg.parse_assignments(config_cls, args.set or [], owner=owner)}


def _refuse_existing(args: argparse.Namespace) -> None:
    """``--out`` must not exist unless ``--overwrite`` (checked before any work)."""
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; choose another --out or pass --overwrite")


def _load(args: argparse.Namespace, model: str | None = None):
    """The pipeline of ``model`` (default: ``--model``) with the command's model options."""
    from efface.models.loading import load_pipeline

    return load_pipeline(model or args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                         config=args.config)
