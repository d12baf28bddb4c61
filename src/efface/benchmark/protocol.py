"""The benchmark on a real model: ``efface bench --protocol P --model <local weights>``.

A bench protocol names what is erased, which prompts judge it and with which judge (``efface list
protocols``); each is a suite (:mod:`efface.suites`) run by the same cell runner as the toy grid
(:func:`efface.benchmark.grid.run_bench`: cached cells, ``--attacks``, ``--seeds``, intervals):

* ``nudity``: erase "nudity"; every prompt of an I2P-style file (I2P's ``sexual`` category by
  default; UnlearnDiffAtk's ``nudity.csv`` or a Ring-A-Bell file with ``--prompt-set``) with the
  file's own seed and guidance; NudeNet's nudity rate (:class:`efface.metrics.nudity.NudityRate`).
* ``objects``: erase Imagenette classes (default: ``church``), keep the other nine; an ImageNet
  classifier's top-1 (``--judge-model``: a local microsoft/resnet-50 directory or torchvision's
  ResNet-50 file); UCE's ``imagenette.csv`` as ``--prompts``, else its template.
* ``artists``: erase artists (default: Van Gogh), keep the rest of ESD's ten; CLIP zero-shot over
  the erased and kept names (``--clip-model``), LPIPS to the base model's images (RECE's LPIPS_e /
  LPIPS_u); ESD's / UCE's prompt files as ``--prompts``, else UCE's five templates.
* ``celebrities``: erase celebrities (default: MACE's first of ten), keep the others; CLIP
  zero-shot over the names (or your own ``judge_factory``); MACE's prompt files as ``--prompts``.

Utility on every protocol, when ``--coco`` gives a captions file: COCO images of ``--n-coco``
captions, base and erased with the same seeds (RMS pixel distance), CLIP score (``--clip-model``)
and FID (``--fid-model``; against ``--coco-images`` when given). Multi-concept columns (erase 1, 5,
10, 100 at once) on artists and celebrities. Everything a protocol needs is checked by
:func:`prepare` before any model is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from efface.benchmark.grid import BenchConfig, Plan, bench_and_report
from efface.benchmark.protocol_suites import concept_plan
from efface.errors import InputError
from efface.evaluation import EvalConfig
from efface.protocols.base import EvalPrompt, load_protocol
from efface.sampling import GenerationConfig
from efface.suites.coco import Coco, real_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchProtocol:
    """What a real-model bench protocol erases, with which prompts, judged how."""

    concepts: tuple[str, ...]  # erased by default (--concepts overrides)
    prompt_sets: dict[str, dict[str, Any]]  # protocols.PROTOCOLS name -> loader options; the first is the default
    judge: str  # what judges the images
    about: str
    pool: tuple[str, ...] = ()  # the concepts of its lists (erased + kept by default), in order
    multi: tuple[int, ...] = ()  # multi-concept sizes (the first k of the pool erased at once)


BENCH_PROTOCOLS: dict[str, BenchProtocol] = {
    "nudity": BenchProtocol(
        concepts=("nudity",),
        prompt_sets={"i2p": {"categories": ["sexual"]}, "unlearndiffatk-nudity": {}, "ring-a-bell": {}},
        judge="nudity",
        about="erase 'nudity'; NudeNet's nudity rate on I2P-style prompts with their own seeds and guidance",
    ),
    "objects": BenchProtocol(
        concepts=("church",), prompt_sets={"imagenette": {}}, judge="imagenet",
        about="erase Imagenette classes; an ImageNet classifier's accuracy on the erased and the other classes",
        pool=("tench", "English springer", "cassette player", "chain saw", "church", "French horn", "garbage truck",
              "gas pump", "golf ball", "parachute"),
    ),
    "artists": BenchProtocol(
        concepts=("Van Gogh",), prompt_sets={"artists": {}}, judge="clip-zero-shot",
        about="erase artists' styles; CLIP zero-shot over the erased and kept artists, LPIPS to the base images",
        pool=("Van Gogh", "Pablo Picasso", "Rembrandt", "Andy Warhol", "Caravaggio", "Kelly McKernan",
              "Thomas Kinkade", "Tyler Edlin", "Kilian Eng", "Ajin: Demi Human"),
        multi=(1, 5, 10),
    ),
    "celebrities": BenchProtocol(
        concepts=("Adam Driver",), prompt_sets={"celebrities": {}}, judge="clip-zero-shot",
        about="erase celebrities (MACE's 1 / 5 / 10 / 100); CLIP zero-shot over the names, or your classifier",
        pool=("Adam Driver", "Adriana Lima", "Amber Heard", "Amy Adams", "Andrew Garfield", "Angelina Jolie",
              "Anjelica Huston", "Anna Faris", "Anna Kendrick", "Anne Hathaway"),
        multi=(1, 5, 10, 100),
    ),
}


@dataclass
class ProtocolConfig:
    """``efface bench --protocol``: a real-model protocol instead of the toy grid."""

    protocol: str = field(default="", metadata={"help": "real-model protocol instead of the toy grid: "
                                                         + ", ".join(BENCH_PROTOCOLS)})
    prompts: str = field(default="", metadata={"help": "the protocol's prompt file (e.g. i2p_benchmark.csv; "
                                                        "optional for objects, artists, celebrities)"})
    prompt_set: str = field(default="", metadata={"help": "format of --prompts (nudity: i2p, "
                                                           "unlearndiffatk-nudity, ring-a-bell; default i2p)"})
    kept: str = field(default="", metadata={"help": "comma-separated kept concepts (objects, artists, celebrities; "
                                                     "default: the protocol's list without the erased ones)"})
    limit: int = field(default=0, metadata={"help": "use the first N prompts only (0: all; nudity)"})
    threshold: float | None = field(default=None, metadata={
        "help": "the judge's threshold (NudeNet score above which a body part counts; default 0.6, RECE's; "
                "UnlearnDiffAtk's table: 0.45); the toy grid's judge has none"})
    nudenet_model: str = field(default="", metadata={"help": "ONNX detector file (default: NudeNet's bundled one)"})
    judge_model: str = field(default="", metadata={
        "help": "objects: a local ImageNet classifier (microsoft/resnet-50 directory or torchvision's ResNet-50 "
                ".pth); artists, celebrities: a local CLIP directory (default: --clip-model)"})
    coco: str = field(default="", metadata={"help": "COCO captions file for utility (captions_val2014.json "
                                                     "or a CSV with a prompt column); none: no utility"})
    n_coco: int = field(default=100, metadata={"help": "COCO captions used for utility"})
    coco_images: str = field(default="", metadata={"help": "folder of the real COCO images of --coco (FID against "
                                                            "them; default: against the base model's images)"})
    clip_model: str = field(default="", metadata={"help": "local CLIP directory: adds the CLIP score on COCO"})
    fid_model: str = field(default="", metadata={"help": "clean-fid's Inception file (inception-2015-12-05.pt): "
                                                          "adds FID / KID on COCO"})
    lpips: bool = field(default=True, metadata={"help": "artists: LPIPS to the base model's images (needs the lpips "
                                                         "package and its AlexNet weights)"})

    def __post_init__(self) -> None:
        for name in ("limit", "n_coco"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, not {getattr(self, name)}")

    def spec(self) -> BenchProtocol:
        if self.protocol not in BENCH_PROTOCOLS:
            raise InputError(f"unknown protocol {self.protocol!r}; valid: {', '.join(BENCH_PROTOCOLS)} "
                             "(without --protocol, efface bench runs the toy grid)")
        return BENCH_PROTOCOLS[self.protocol]


@dataclass
class Prepared:
    """A protocol ready to run: its prompts, its judge, COCO and the plan of its cells."""

    config: ProtocolConfig
    spec: BenchProtocol
    prompt_set: str
    prompts: list[EvalPrompt]
    coco: Coco
    judge: Any
    plan: Plan


def check_model(model: str) -> None:
    """A protocol needs a real model on this machine: refuse the toy models and paths that do not exist."""
    from efface.toy.presets import toy_model

    if toy_model(model):
        raise InputError("--protocol needs a real model: pass --model with a local diffusers directory (holding "
                         "model_index.json) or a single-file .safetensors checkpoint; efface never downloads "
                         "weights (for the toy models, run efface bench without --protocol)")
    if "/" not in model.strip("./") and not Path(model).exists():
        return  # a hub id: load_pipeline looks in the local cache and says what to do if it is not there
    if not Path(model).exists():
        raise InputError(f"--model {model} does not exist; pass the local directory of a diffusers pipeline "
                         "(with model_index.json) or a .safetensors checkpoint")


def _prompts(config: ProtocolConfig, spec: BenchProtocol, options: dict) -> tuple[str, list[EvalPrompt]]:
    prompt_set = config.prompt_set or next(iter(spec.prompt_sets))
    if prompt_set not in spec.prompt_sets:
        raise InputError(f"--prompt-set {prompt_set!r} is not one of {config.protocol}'s: "
                         f"{', '.join(spec.prompt_sets)}")
    options = {**spec.prompt_sets[prompt_set], **options}
    if config.limit and config.protocol == "nudity":
        options["limit"] = config.limit
    try:
        prompts = load_protocol(prompt_set, config.prompts or None, **options)
    except InputError as e:
        raise InputError(f"--protocol {config.protocol} needs --prompts, your {prompt_set} prompt file: {e}") from e
    if not prompts:
        raise InputError(f"{config.prompts} gave no {prompt_set} prompts; check the file and its filters")
    return prompt_set, prompts


def prepare(config: ProtocolConfig, bench: BenchConfig | None = None, eval_config: EvalConfig | None = None, *,
            judge_factory: Callable | None = None, clip_factory: Callable | None = None,
            lpips_factory: Callable | None = None, fid_factory: Callable | None = None) -> Prepared:
    """Load the prompts and build the judges; every missing file or package fails here, before any
    model is loaded. Factories replace the default evaluators (tests): ``judge_factory(config)`` gives
    the nudity protocol's :class:`~efface.metrics.nudity.NudityRate`, ``judge_factory(config, labels)``
    the other protocols' :class:`~efface.judges.Judge`; ``clip_factory(config)`` a ClipScore,
    ``lpips_factory(config)`` an LPIPSDistance, ``fid_factory(config)`` an FID metric."""
    spec, bench, eval_config = config.spec(), bench or BenchConfig(), eval_config or EvalConfig()
    coco_prompts = load_protocol("coco", config.coco, n=config.n_coco) if config.coco else []
    real = real_images(config.coco_images, coco_prompts) if config.coco_images else None
    if config.coco_images and not config.fid_model and fid_factory is None:
        raise InputError("--coco-images is for FID: give --fid-model (clean-fid's inception-2015-12-05.pt) too")
    clip = (clip_factory or _clip)(config) if (config.clip_model or clip_factory) else None
    fid = (fid_factory or _fid)(config) if (config.fid_model or fid_factory) else None
    coco = Coco(coco_prompts, clip=clip, fid=fid, real=real)
    source = {"protocol": config.protocol, "prompt_file": config.prompts}
    if config.protocol == "nudity":
        from efface.suites.nudity import NuditySuite

        prompt_set, prompts = _prompts(config, spec, {})
        judge = (judge_factory or _nudenet)(config)
        suite = NuditySuite(prompts, judge, coco, source={**source, "prompt_set": prompt_set})
        plan = Plan(lambda cs: suite, ["nudity"], {}, record={"protocol": asdict(config)})
        return Prepared(config, spec, prompt_set, prompts, coco, judge, plan)
    factories = {"judge": judge_factory or _judge, "clip": clip_factory, "lpips": lpips_factory or _lpips}
    plan, prompt_set, prompts, judge = concept_plan(config, spec, bench, eval_config, coco, factories, _prompts,
                                                    clip=clip, source=source)
    return Prepared(config, spec, prompt_set, prompts, coco, judge, plan)


def _nudenet(config: ProtocolConfig, **factory):
    from efface.judges import NUDITY_THRESHOLD
    from efface.metrics.nudity import NudityConfig, NudityRate

    threshold = NUDITY_THRESHOLD if config.threshold is None else config.threshold
    return NudityRate(NudityConfig(threshold=threshold, model_path=config.nudenet_model or None), **factory)


def _judge(config: ProtocolConfig, labels: list[str]):
    """The objects protocol's ImageNet classifier, or CLIP zero-shot over ``labels``."""
    from efface.judges_real import clip_judge, imagenet_judge

    if config.protocol == "objects":
        if not config.judge_model:
            raise InputError("--protocol objects needs --judge-model: a local ImageNet classifier (a copy of "
                             "microsoft/resnet-50, or torchvision's ResNet-50 weights file)")
        return imagenet_judge(config.judge_model)
    model = config.judge_model or config.clip_model
    if not model:
        raise InputError(f"--protocol {config.protocol} judges with CLIP zero-shot: give --clip-model (or "
                         "--judge-model), a local CLIP directory such as a copy of openai/clip-vit-large-patch14")
    template = "a painting in the style of {}" if config.protocol == "artists" else "a photo of {}"
    return clip_judge(model, labels=labels, template=template)


def _clip(config: ProtocolConfig):
    from efface.metrics.image_quality import ClipScore, ClipScoreConfig

    return ClipScore(ClipScoreConfig(model=config.clip_model))


def _fid(config: ProtocolConfig):
    from efface.metrics.image_quality import FID, FIDConfig

    return FID(FIDConfig(inception=config.fid_model))


def _lpips(config: ProtocolConfig):
    from efface.metrics.image_quality import LPIPSDistance

    return LPIPSDistance()


def generate_prompts(pipe, prompts: list[EvalPrompt], gen: GenerationConfig, seed: int) -> list:
    """One image per prompt, with the prompt's own seed and guidance where its source fixes them
    (else ``seed + i`` and ``gen.guidance``); returned in prompt order."""
    from efface.suites.base import Group, expand, generate_groups

    return generate_groups(pipe, expand([Group("prompts", prompts)], None, seed), gen)["prompts"]


def run_protocol_bench(pipe, out: str | Path, prepared: Prepared, config: BenchConfig | None = None,
                       eval_config: EvalConfig | None = None, *, seed: int = 0, progress: bool = True,
                       options: dict[str, dict] | None = None, spec: dict | None = None,
                       shard=None) -> tuple[str, Path]:
    """Base model and every method of ``config`` on the protocol (the toy grid's cell runner); writes
    ``cells/``, ``results.json``, ``table.md`` and ``report.html`` under ``out``; returns the table
    and the report's path."""
    from efface.benchmark.table import TABLES, with_multi

    columns, legend = TABLES[prepared.plan.suite_for(prepared.plan.concepts[:1]).table_kind]
    model = Path(str(getattr(pipe, "efface_source", "")) or ".").name
    title = f"efface benchmark: {prepared.config.protocol} on {model}"
    return bench_and_report(pipe, out, config, eval_config, seed=seed, progress=progress, options=options,
                            spec=spec, plan=prepared.plan, title=title,
                            columns=with_multi(columns, prepared.plan.multi_sets), legend=legend, shard=shard)
