"""`efface generate`, `list`, `erase` and `toy train`: the commands that make or change a model."""

from __future__ import annotations

import argparse
import inspect
import logging
import shutil
from pathlib import Path

from efface import config as cfg
from efface.cli.common import _load, _refuse_existing, _user_options
from efface.errors import InputError

log = logging.getLogger(__name__)


def cmd_generate(args: argparse.Namespace) -> int:
    from efface.sampling import GenerationConfig, describe, generate, save_images

    gen = cfg.from_args(GenerationConfig, args)  # validates before the model is loaded
    pipe = _load(args)
    if args.erased:
        from efface.artifacts import ErasedModel

        ErasedModel.load(args.erased).apply(pipe)
    images = generate(pipe, args.prompt, gen, seed=args.seed)
    out = save_images(images, args.out, metadata=describe(args.prompt, gen, args.seed, args.model),
                      overwrite=args.overwrite, grid_scale=args.grid_scale)
    print(out / "grid.png")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import efface.attacks  # noqa: F401  (registers the attacks)
    import efface.methods  # noqa: F401  (registers the methods)
    import efface.metrics  # noqa: F401  (registers the metrics)
    from efface.models.families import FAMILIES
    from efface.registry import ATTACKS, METHODS, METRICS

    kinds = {"methods": METHODS, "attacks": ATTACKS, "metrics": METRICS}
    for kind in [args.kind] if args.kind else [*kinds, "protocols"]:
        if kind == "protocols":
            _list_protocols()
            continue
        entries = kinds[kind].items()
        print(f"{kind}:" + ("" if entries else " none registered yet"))
        for name, obj in entries:
            doc = (inspect.getdoc(obj) or "").splitlines()
            print(f"  {name:<18} {doc[0] if doc else ''}")
            if getattr(obj, "paper", ""):
                print(f"  {'':<18} paper: {obj.paper}")
            if getattr(obj, "families", None):
                print(f"  {'':<18} families: {', '.join(f for f in FAMILIES if f in obj.families)}")
            if hasattr(obj, "Config"):
                for fname, tp, default, help_text in cfg.describe_fields(obj.Config):
                    print(f"  {'':<18}   --set {fname}={default!s:<10} {tp:<6} {help_text}")
    return 0


def _list_protocols() -> None:
    """The real-model bench protocols (``efface bench --protocol P``): what each erases and judges."""
    from efface.benchmark.protocol import BENCH_PROTOCOLS

    print("protocols:")
    for name, p in BENCH_PROTOCOLS.items():
        print(f"  {name:<18} {p.about}")
        print(f"  {'':<18} concepts: {', '.join(p.concepts)}; judge: {p.judge}; prompt sets (--prompt-set): "
              f"{', '.join(p.prompt_sets)} (default {next(iter(p.prompt_sets))})")


def cmd_erase(args: argparse.Namespace) -> int:
    import efface.methods  # noqa: F401  (registers the methods)
    from efface.methods.base import ErasureRequest
    from efface.registry import METHODS
    from efface.toy.presets import method_setup

    cls = METHODS.get(args.method)  # unknown method / option / concept: fail before loading
    if args.lora_rank is not None and (not args.save_lora or args.lora_rank < 1):
        raise InputError(f"--lora-rank {args.lora_rank}: give a rank of at least 1, with --save-lora")
    preset, inputs = method_setup(args.method, args.model, args.preset)  # "toy" only on a toy model
    method = cls(preset=preset, **inputs, **_user_options(cls.Config, args, args.method))
    if args.save_lora and (why := method.lora_refusal()):  # the class and its parameter set, before loading
        raise InputError(f"--save-lora: {why}")
    request = ErasureRequest.build(args.concept, args.anchor, args.preserve or (), default_anchor=cls.default_anchor)
    _refuse_existing(args)
    out = Path(args.out)
    work = out.with_name(f"{out.name}.work")  # the checkpoint (--checkpoint-every)
    if args.checkpoint_every < 0:
        raise InputError(f"--checkpoint-every {args.checkpoint_every}: give a number of iterations (0: off)")
    if not args.checkpoint_every and work.exists():
        log.warning("%s holds a checkpoint; it is not used without --checkpoint-every", work)
    pipe = _load(args)
    _check_components(pipe, args.save_component or ())
    if args.save_lora:
        method.check(pipe, request)  # the family first (its reason), then this model's layers, before any work
        if why := method.lora_refusal(pipe):
            raise InputError(f"--save-lora: {why}")
    checkpoint = work if args.checkpoint_every else None
    erased = method.fit(pipe, request, seed=args.seed, progress=not args.quiet, checkpoint=checkpoint,
                        checkpoint_every=args.checkpoint_every)
    erased.save(args.out, pipe=pipe, save_pipeline=args.save_pipeline, components=tuple(args.save_component or ()),
                lora=args.save_lora, lora_rank=args.lora_rank, overwrite=args.overwrite)
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    m = erased.manifest
    added = f", adapter {m['adapter']['kind']} ({m['adapter']['parameters']} parameters) added" if m["adapter"] else ""
    print(f"{args.out}: {m['method']} erased {', '.join(request.concepts)}; {m['tensors_changed']} tensors "
          f"({m['parameters_changed']} parameters) changed{added} in {m['seconds']:.1f} s")
    if args.save_lora and m["lora"]["mode"] != "adapter":
        lo = m["lora"]
        print(f"{args.out}/{lo['file']}: LoRA ({lo['mode']}) on {lo['layers']} layers, rank <= {lo['max_rank']}, "
              f"relative error {lo['relative_error']:.2e}")
    return 0


def _check_components(pipe, wanted) -> None:
    """Refuse --save-component values the loaded model does not have, before any work."""
    from efface.models.params import components

    missing = sorted(set(wanted) - set(components(pipe)))
    if missing:
        raise InputError(f"--save-component {', '.join(missing)}: this model has {', '.join(components(pipe))}")


def cmd_toy_train(args: argparse.Namespace) -> int:
    from efface.toy.recipe import ToyRecipe
    from efface.toy.train import train_toy

    recipe = cfg.from_args(ToyRecipe, args)
    if args.model == "toy-flux":
        from efface.toy.train_flux import train_toy_flux

        out = train_toy_flux(recipe, args.work or "runs/toy-flux-train", args.out, base=args.base,
                             overwrite=args.overwrite)
    else:
        if args.base:
            raise InputError("--base is for --model toy-flux (toy-sd trains every component itself)")
        out = train_toy(recipe, args.work or "runs/toy-train", args.out, overwrite=args.overwrite)
    print(out)
    return 0
