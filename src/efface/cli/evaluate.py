"""`efface eval`, `bench`, `demo` and `attack`: the commands that measure."""

from __future__ import annotations

import argparse
from pathlib import Path

from efface import config as cfg
from efface.cli.common import _load, _refuse_existing, _user_options
from efface.errors import InputError


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
    result = evaluate(pipe, erased, args.concept, config=config, seed=args.seed)
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    e, u = result["effectiveness"], result["utility"]
    print(f"{args.out}: target rate {e['target_rate']:.3f}, synonyms {_fmt(e['synonym_rate'])}, held-out "
          f"{e['heldout_rate']:.3f}; retained accuracy {_fmt(u['retained_accuracy'])}, "
          f"Frechet distance {_fmt(u['frechet_distance'])}")
    return 0


def _bench(args: argparse.Namespace, bench, evaluation, **kwargs) -> tuple[str, Path]:
    """Check the grid (unknown method or concept: fail before loading), run it, write the outputs.
    Several models (``--model toy,toy-flux``): every model's grid checked first, then run one after another."""
    from efface.benchmark.grid import bench_and_report
    from efface.benchmark.models import bench_models, model_list

    models = model_list(args.model)
    for model in models:
        _check_presets(args, bench, model)
    bench.concept_list(), bench.attack_list()
    if len(models) > 1:
        if kwargs.get("shard") is not None:
            raise InputError("a run of several processes benchmarks one --model; launch it once per model")
        kwargs.pop("shard", None)
        return bench_models(models, lambda m: _load(args, m), args.out, bench, evaluation, seed=args.seed,
                            progress=not args.quiet, **kwargs)
    pipe = _load(args)
    pipe.set_progress_bar_config(disable=True)
    return bench_and_report(pipe, args.out, bench, evaluation, seed=args.seed, progress=not args.quiet, **kwargs)


def cmd_bench(args: argparse.Namespace) -> int:
    from efface.benchmark.grid import BenchConfig
    from efface.benchmark.protocol import ProtocolConfig
    from efface.evaluation import EvalConfig

    kwargs = {}
    if args.spec:  # the run described by a file: every key checked before any model loads
        from efface.benchmark.spec import apply_spec, load_spec, spec_fields

        fields = spec_fields(BenchConfig, EvalConfig, ProtocolConfig)
        values, options, record = load_spec(args.spec, fields)
        apply_spec(args, values, fields)
        kwargs = {"options": options, "spec": record}
    bench, evaluation, protocol = (cfg.from_args(c, args) for c in (BenchConfig, EvalConfig, ProtocolConfig))
    from efface.benchmark.distributed import Shard

    kwargs["shard"] = Shard.current()  # several processes (accelerate launch / torchrun): the work split
    if protocol.protocol:
        table, report = _protocol_bench(args, bench, evaluation, protocol, **kwargs)
    else:
        from efface.judges import check_toy_threshold

        check_toy_threshold(protocol.threshold)  # the toy grid (and its --attacks) judge with the toy classifier
        table, report = _bench(args, bench, evaluation, **kwargs)
    if kwargs["shard"] is None or kwargs["shard"].is_main:
        print(table)
        print(report)
    return 0


def _protocol_bench(args: argparse.Namespace, bench, evaluation, protocol, **kwargs) -> tuple[str, Path]:
    """A real-model protocol: model path, prompt file, judges and methods checked before loading."""
    from efface.benchmark.models import model_list
    from efface.benchmark.protocol import check_model, prepare, run_protocol_bench

    protocol.spec()
    bench.attack_list()  # unknown attacks fail before loading
    if len(model_list(args.model)) > 1:
        raise InputError("--protocol benchmarks one --model at a time; run it once per model with its own --out")
    check_model(args.model)
    _check_presets(args, bench)
    prepared = prepare(protocol, bench, evaluation)
    pipe = _load(args)
    pipe.set_progress_bar_config(disable=True)
    return run_protocol_bench(pipe, args.out, prepared, bench, evaluation, seed=args.seed, progress=not args.quiet,
                              **kwargs)


def _check_presets(args: argparse.Namespace, bench, model: str | None = None) -> None:
    """Unknown methods, and a preset the model cannot take (``toy`` on a real model), fail before loading."""
    from efface.toy.presets import method_setup

    for method in bench.method_list():
        method_setup(method, model or args.model, bench.preset or None)


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
    from efface.judges import judge_for
    from efface.robustness import attack_success, toy_prompts
    from efface.sampling import GenerationConfig
    from efface.toy.presets import attack_setup, toy_model

    cls = ATTACKS.get(args.attack)  # unknown attack: the valid ones are listed
    options = _user_options(cls.Config, args, args.attack)
    preset, inputs = attack_setup(args.attack, args.model, args.preset)  # "toy" only on a toy model
    attack = cls(preset=preset, **inputs, **options)
    gen = GenerationConfig(steps=args.steps, guidance=args.guidance)
    if toy_model(args.model):
        from efface.judges import check_toy_concept, check_toy_threshold

        check_toy_concept(args.concept), check_toy_threshold(args.threshold)  # before loading anything
    _refuse_existing(args)
    pipe = _load(args)
    pipe.set_progress_bar_config(disable=True)
    judge = judge_for(pipe, args.concept, threshold=args.threshold)
    prompts = args.prompt or (toy_prompts(args.concept, args.n, args.seed) if toy_model(args.model) else None)
    if not prompts:
        raise InputError("give the prompts to attack with --prompt (repeat for several)")
    original = None
    erased_pipe = pipe
    if args.erased:
        from efface.artifacts import ErasedModel

        erased = ErasedModel.load(args.erased)
        erased.check_base(pipe)
        original, erased_pipe = pipe, erased.applied_copy(pipe)  # shares the weights the erasure leaves
    features = None
    if attack.uses_features():
        from efface.toy import is_toy
        from efface.robustness import toy_features

        if not is_toy(pipe):
            hint = " or --set selection=judge" if args.attack.startswith("p4d") else ""
            raise InputError(f"{args.attack} needs an image feature extractor; on a real model call "
                             f"efface.robustness.attack_success(..., features=your_function) from Python{hint}")
        features = toy_features()
    measures, result = attack_success(attack, erased_pipe, args.concept, prompts, judge=judge, original=original,
                                      seed=args.seed, generation=gen, progress=not args.quiet, features=features)
    measures["erased"] = args.erased
    measures["model"] = args.model
    result.save(args.out, overwrite=args.overwrite, measures=measures)
    rate = measures["asr"] if measures["asr"] is not None else measures[f"asr_{attack.variant}"]
    name = "ASR" if measures["asr"] is not None else f"ASR ({attack.variant} replay)"
    print(f"{measures['attack']} on {args.concept}: pre-ASR {measures['pre_asr']:.3f}, {name} {rate:.3f} "
          f"({measures['n']} prompts)")
    print(Path(args.out) / "attack.json")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
