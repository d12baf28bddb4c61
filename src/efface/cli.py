"""The ``efface`` command line: parses, calls the API, reports. Options come from dataclass configs."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from pathlib import Path

from efface import config as cfg
from efface.errors import EffaceError, InputError

log = logging.getLogger("efface")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    from efface.models.loading import load_pipeline

    defaults = {k: v.default for k, v in inspect.signature(load_pipeline).parameters.items()}
    g = p.add_argument_group("model")
    g.add_argument("--model", default="toy",
                   help="'toy' (bundled toy-sd), a diffusers directory, a single-file .safetensors "
                        "checkpoint, or a hub id already in the local cache (default: toy)")
    g.add_argument("--device", default=defaults["device"], help=f"cpu, cuda, cuda:N, mps or auto (default: {defaults['device']})")
    g.add_argument("--dtype", default=defaults["dtype"], help=f"fp32, fp16 or bf16 (default: {defaults['dtype']})")
    g.add_argument("--config", default=defaults["config"],
                   help="local diffusers directory describing a single-file checkpoint's architecture")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow pickle checkpoints (.ckpt/.bin/.pt/.pth); they can run arbitrary code")


def _refuse_existing(args: argparse.Namespace) -> None:
    """``--out`` must not exist unless ``--overwrite`` (checked before any work)."""
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; choose another --out or pass --overwrite")


def _load(args: argparse.Namespace):
    from efface.models.loading import load_pipeline

    return load_pipeline(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                         config=args.config)


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
    for kind in [args.kind] if args.kind else list(kinds):
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


def cmd_erase(args: argparse.Namespace) -> int:
    import efface.methods  # noqa: F401  (registers the methods)
    from efface.methods.base import ErasureRequest
    from efface.registry import METHODS
    from efface.toy.presets import method_setup

    cls = METHODS.get(args.method)  # unknown method / option / concept: fail before loading
    if args.save_lora and not cls.exports_lora:
        raise InputError(f"--save-lora: {args.method} has no LoRA export; methods with one: "
                         f"{', '.join(n for n, c in METHODS.items() if c.exports_lora)}")
    preset, inputs = method_setup(args.method, args.model, args.preset)  # "toy" only on a toy model
    method = cls(preset=preset, **inputs, **cfg.parse_assignments(cls.Config, args.set or [], owner=args.method))
    request = ErasureRequest.build(args.concept, args.anchor, args.preserve or (), default_anchor=cls.default_anchor)
    _refuse_existing(args)
    pipe = _load(args)
    _check_components(pipe, args.save_component or ())
    erased = method.fit(pipe, request, seed=args.seed, progress=not args.quiet)
    erased.save(args.out, pipe=pipe, save_pipeline=args.save_pipeline, components=tuple(args.save_component or ()),
                lora=args.save_lora, overwrite=args.overwrite)
    m = erased.manifest
    added = f", adapter {m['adapter']['kind']} ({m['adapter']['parameters']} parameters) added" if m["adapter"] else ""
    print(f"{args.out}: {m['method']} erased {', '.join(request.concepts)}; {m['tensors_changed']} tensors "
          f"({m['parameters_changed']} parameters) changed{added} in {m['seconds']:.1f} s")
    return 0


def _check_components(pipe, wanted) -> None:
    """Refuse --save-component values the loaded model does not have, before any work."""
    from efface.models.params import components

    missing = sorted(set(wanted) - set(components(pipe)))
    if missing:
        raise InputError(f"--save-component {', '.join(missing)}: this model has {', '.join(components(pipe))}")


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from efface.evaluation import EvalConfig, check_concepts, evaluate
    from efface.io import atomic_file

    config = cfg.from_args(EvalConfig, args)
    check_concepts(args.concept)  # before loading anything
    _refuse_existing(args)
    erased = None
    if args.erased:
        from efface.artifacts import ErasedModel

        erased = ErasedModel.load(args.erased)
    pipe = _load(args)
    pipe.set_progress_bar_config(disable=True)
    result = evaluate(pipe, args.concept, erased=erased, config=config, seed=args.seed)
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    e, u = result["effectiveness"], result["utility"]
    print(f"{args.out}: target rate {e['target_rate']:.3f}, synonyms {_fmt(e['synonym_rate'])}, held-out "
          f"{e['heldout_rate']:.3f}; retained accuracy {_fmt(u['retained_accuracy'])}, "
          f"Frechet distance {_fmt(u['frechet_distance'])}")
    return 0


def _bench(args: argparse.Namespace, bench, evaluation, **kwargs) -> tuple[str, Path]:
    """Check the grid (unknown method or concept: fail before loading), run it, write the outputs."""
    from efface.benchmark.grid import bench_and_report

    _check_presets(args, bench)
    bench.concept_list(), bench.attack_list()
    pipe = _load(args)
    pipe.set_progress_bar_config(disable=True)
    return bench_and_report(pipe, args.out, bench, evaluation, seed=args.seed, progress=not args.quiet, **kwargs)


def cmd_bench(args: argparse.Namespace) -> int:
    from efface.benchmark.grid import BenchConfig
    from efface.benchmark.protocol import ProtocolConfig
    from efface.evaluation import EvalConfig

    bench, evaluation, protocol = (cfg.from_args(c, args) for c in (BenchConfig, EvalConfig, ProtocolConfig))
    if protocol.protocol:
        table, report = _protocol_bench(args, bench, evaluation, protocol)
    else:
        table, report = _bench(args, bench, evaluation)
    print(table)
    print(report)
    return 0


def _protocol_bench(args: argparse.Namespace, bench, evaluation, protocol) -> tuple[str, Path]:
    """A real-model protocol: model path, prompt file, judges and methods checked before loading."""
    from efface.benchmark.protocol import check_model, prepare, run_protocol_bench

    protocol.spec()
    check_model(args.model)
    _check_presets(args, bench)
    prepared = prepare(protocol)
    pipe = _load(args)
    pipe.set_progress_bar_config(disable=True)
    return run_protocol_bench(pipe, args.out, prepared, bench, evaluation, seed=args.seed, progress=not args.quiet)


def _check_presets(args: argparse.Namespace, bench) -> None:
    """Unknown methods, and a preset the model cannot take (``toy`` on a real model), fail before loading."""
    from efface.toy.presets import method_setup

    for method in bench.method_list():
        method_setup(method, args.model, bench.preset or None)


def cmd_demo(args: argparse.Namespace) -> int:
    from efface.benchmark.demo import DemoConfig

    demo = cfg.from_args(DemoConfig, args)
    table, report = _bench(args, demo.bench(), demo.evaluation(), options=demo.options(),
                           title=f"efface demo: erasing '{demo.concept}' from toy-sd")
    print(table)
    print(f"report: {report}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import efface.attacks  # noqa: F401  (registers the attacks)
    from efface.registry import ATTACKS
    from efface.robustness import attack_success, judge_for, toy_prompts
    from efface.sampling import GenerationConfig
    from efface.toy.presets import attack_setup, toy_model

    cls = ATTACKS.get(args.attack)  # unknown attack: the valid ones are listed
    options = cfg.parse_assignments(cls.Config, args.set or [], owner=args.attack)
    preset, inputs = attack_setup(args.attack, args.model, args.preset)  # "toy" only on a toy model
    attack = cls(preset=preset, **inputs, **options)
    gen = GenerationConfig(steps=args.steps, guidance=args.guidance)
    _refuse_existing(args)
    pipe = _load(args)
    pipe.set_progress_bar_config(disable=True)
    judge = judge_for(pipe, args.concept)
    prompts = args.prompt or (toy_prompts(args.concept, args.n, args.seed) if toy_model(args.model) else None)
    if not prompts:
        raise InputError("give the prompts to attack with --prompt (repeat for several)")
    original = None
    erased_pipe = pipe
    if args.erased:
        import copy

        from efface.artifacts import ErasedModel

        erased = ErasedModel.load(args.erased)
        erased.check_base(pipe)
        original, erased_pipe = pipe, copy.deepcopy(pipe)
        erased.apply(erased_pipe)
    features = None
    if "image_features" in attack.needs:
        from efface.models.loading import is_toy
        from efface.robustness import toy_features

        if not is_toy(pipe):
            raise InputError(f"{args.attack} needs an image feature extractor; on a real model call "
                             "efface.robustness.attack_success(..., features=your_function) from Python")
        features = toy_features()
    measures, result = attack_success(attack, erased_pipe, args.concept, prompts, judge=judge, original=original,
                                      seed=args.seed, generation=gen, progress=not args.quiet, features=features)
    measures["erased"] = args.erased
    measures["model"] = args.model
    if result is None:
        from efface.io import atomic_dir

        with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            (tmp / "attack.json").write_text(json.dumps(measures, indent=2))
    else:
        result.save(args.out, overwrite=args.overwrite, measures=measures)
    print(f"{args.attack} on {args.concept}: pre-ASR {measures['pre_asr']:.3f}, ASR {measures['asr']:.3f} "
          f"({measures['n']} prompts)")
    print(Path(args.out) / "attack.json")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_toy_train(args: argparse.Namespace) -> int:
    from efface.toy.recipe import ToyRecipe
    from efface.toy.train import train_toy

    recipe = cfg.from_args(ToyRecipe, args)
    out = train_toy(recipe, args.work, args.out, overwrite=args.overwrite)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from efface import __version__
    from efface.benchmark.demo import DemoConfig
    from efface.benchmark.grid import BenchConfig
    from efface.benchmark.protocol import ProtocolConfig
    from efface.evaluation import EvalConfig
    from efface.sampling import GenerationConfig
    from efface.toy.recipe import ToyRecipe

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only")
    parser = argparse.ArgumentParser(prog="efface", description="Concept erasure for text-to-image diffusion models.",
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"efface {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_parser = sub.add_parser

    def add_parser(name, **kwargs):
        return _add_parser(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # every command takes -v / -q too

    p = sub.add_parser("generate", help="generate images (PNGs + grid.png) from a prompt",
                       description="Generate seeded images; the same seed gives byte-identical PNGs on CPU.")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--grid-scale", type=int, default=1, help="upscale the grid image by this factor (default: 1)")
    p.add_argument("--erased", help="an erasure artifact directory (from `efface erase`) to apply first")
    cfg.add_options(p, GenerationConfig, group="sampling")
    _add_model_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("erase", help="erase concepts from a model; writes an artifact directory",
                       description="Erase concepts with a registered method (see `efface list methods`). "
                                   "Writes the changed tensors and a manifest; the base model is not modified.")
    p.add_argument("--method", required=True, help="method name (efface list methods)")
    p.add_argument("--concept", action="append", required=True, help="concept to erase (repeat for several)")
    p.add_argument("--preserve", action="append", help="concept to preserve (repeat for several)")
    p.add_argument("--anchor", help="concept the erased ones are mapped to (default: the method's, "
                                    "e.g. '' for UCE and ESD objects)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method option (repeat for several)")
    p.add_argument("--preset", help="'paper' (the paper's schedule) or 'toy' (CPU-sized, efface.toy.presets; "
                                    "the default with --model toy, refused on other models)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", required=True, help="artifact directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--save-pipeline", action="store_true",
                   help="also write a complete diffusers pipeline (out/pipeline) with the edit applied")
    p.add_argument("--save-component", action="append",
                   choices=("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"),
                   help="also write this component with the edit applied (out/<component>, diffusers format; "
                        "e.g. text_encoder: AdvUnlearn's plug-in text encoder); repeat for several; it must "
                        "be one of the model's own")
    p.add_argument("--save-lora", action="store_true",
                   help="also write the adapter as a LoRA plain diffusers loads (out/lora; spm: multiplier 1, "
                        "no facilitated transport): pipe.load_lora_weights(out/lora)")
    _add_model_options(p)
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("eval", help="evaluate a base or erased toy-sd model; writes eval.json",
                       description="Effectiveness (is the concept gone, also under synonyms and held-out "
                                   "paraphrases), utility (other concepts, image drift), cost and provenance.")
    p.add_argument("--erased", help="an erasure artifact directory (default: evaluate the base model)")
    p.add_argument("--concept", action="append", required=True, help="erased concept (repeat for several)")
    p.add_argument("--seed", type=int, default=0, help="image i of each prompt group uses seed + i (default: 0)")
    p.add_argument("--out", required=True, help="output JSON file (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    cfg.add_options(p, EvalConfig, group="evaluation")
    _add_model_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="run the method x concept grid; writes results.json, table.md, report.html",
                       description="Erase every concept with every method (and several concepts at once), "
                                   "evaluate each cell, fill the comparison table and write the report. Finished "
                                   "cells are cached in --out: rerun the same command to resume.")
    p.add_argument("--seed", type=int, default=0, help="seed of every erasure and evaluation (default: 0)")
    p.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench)")
    cfg.add_options(p, BenchConfig, group="grid")
    cfg.add_options(p, EvalConfig, group="evaluation")
    cfg.add_options(p, ProtocolConfig, group="real-model protocol (instead of the toy grid)")
    _add_model_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="erase a toy concept with UCE and ESD, evaluate, write the report (~2 min)",
                       description="The two-minute tour: erase a toy concept with UCE and ESD on toy-sd, evaluate "
                                   "both against the base model, print the table and write report.html.")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    cfg.add_options(p, DemoConfig, group="demo")
    _add_model_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("attack", help="attack an erased model: pre-ASR, ASR and the adversarial prompts",
                       description="Run an attack against an erased model (--erased; without it, the base model) "
                                   "on prompts that name the concept; writes attack.json (pre_asr, asr, every "
                                   "adversarial prompt), embeddings, images and grid.png.")
    p.add_argument("--attack", required=True, help="attack name (efface list attacks)")
    p.add_argument("--concept", required=True, help="the erased concept to bring back")
    p.add_argument("--erased", help="an erasure artifact directory (from efface erase); --model is its base")
    p.add_argument("--prompt", action="append", help="a prompt to attack (repeat; default on toy-sd: --n "
                                                     "evaluation prompts of the concept)")
    p.add_argument("--n", type=int, default=16, help="toy-sd prompts to attack when no --prompt is given (default: 16)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an attack option (repeat for several)")
    p.add_argument("--preset", help="'paper' (the paper's budget) or 'toy' (CPU-sized, efface.toy.presets; "
                                    "the default with --model toy, refused on other models)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of every image (default: 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack; prompt i's image uses seed + i (default: 0)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_model_options(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("list", help="list registered methods, attacks and metrics")
    p.add_argument("kind", nargs="?", choices=["methods", "attacks", "metrics"], help="only this kind")
    p.set_defaults(func=cmd_list)

    toy = sub.add_parser("toy", help="the toy world and toy-sd").add_subparsers(dest="toy_command", required=True,
                                                                              metavar="TOY_COMMAND")
    toy.add_parser = lambda name, **kw: toy.__class__.add_parser(toy, name, parents=[common], **kw)
    p = toy.add_parser("train", help="train toy-sd and the toy classifier (resumable)",
                       description="Train toy-sd (tokenizer, text encoder, VAE, UNet) and the toy classifier. "
                                   "Each stage is resumable: rerun the same command after an interruption.")
    p.add_argument("--work", default="runs/toy-train", help="work directory for stages and checkpoints")
    p.add_argument("--out", default="runs/toy-weights", help="output directory (toy-sd/ and classifier/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    cfg.add_options(p, ToyRecipe, group="recipe")
    p.set_defaults(func=cmd_toy_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = args.verbose = getattr(args, "verbose", False)  # -v / -q may come before or after the command
    quiet = args.quiet = getattr(args, "quiet", False)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # transformers' import-time notices (e.g. torchvision fallbacks) are noise here
        import transformers

        transformers.utils.logging.set_verbosity_error()
    try:
        return args.func(args)
    except EffaceError as err:
        log.error("%s", err)
        return 2
    except FileExistsError as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
