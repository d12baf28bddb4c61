"""The ``efface`` command line: parses, calls the API, reports. Options come from dataclass configs.

One module per group of commands (``models``: generate, list, erase, toy train; ``evaluate``: eval,
bench, demo, attack), the options they share in ``common``; this module builds the parser and runs
``main``. Each command imports the API lazily so ``efface --help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from efface import config as cfg
from efface.errors import EffaceError
from efface.cli.common import _add_model_options
from efface.cli.evaluate import cmd_attack, cmd_bench, cmd_demo, cmd_eval
from efface.cli.score import cmd_score
from efface.cli.models import cmd_erase, cmd_generate, cmd_list, cmd_toy_train

log = logging.getLogger("efface")


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
    p.add_argument("--options", metavar="FILE", help="a TOML file of the method's options (key = value lines); "
                                                     "over the preset, under --set")
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
                   help="also write the change as a LoRA plain diffusers loads (out/lora): "
                        "pipe.load_lora_weights(out/lora); closed forms (uce, rece, mace) exactly, trained methods "
                        "by a truncated SVD (--lora-rank), spm its membranes (multiplier 1, no facilitated "
                        "transport); refused before any work where the change is not on Linear / Conv2d "
                        "layers (esd-u, esd-all, salun, receler, ...)")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="with --save-lora: the LoRA's rank per layer (default: the exact rank for closed forms, "
                        "the rank keeping 99%% of the change's energy for trained methods); the manifest "
                        "reports the relative error")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save the training state every N iterations into <out>.work/ (removed once the artifact "
                        "is written); rerunning the same command resumes from it (default: 0, off)")
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
                                   "cells are cached in --out: rerun the same command to resume. Several models "
                                   "(--model toy,toy-flux) run one after another into --out/<model>/, and "
                                   "--out's table and report compare them with a model column.")
    p.add_argument("--seed", type=int, default=0, help="seed of every erasure and evaluation (default: 0)")
    p.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench)")
    p.add_argument("--spec", metavar="FILE", help="a TOML file describing the run: any option below and "
                                                  "[options.<method>] tables (docs/evaluation.md); flags given "
                                                  "here win over it")
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
    p.add_argument("--options", metavar="FILE", help="a TOML file of the attack's options (key = value lines); "
                                                     "over the preset, under --set")
    p.add_argument("--preset", help="'paper' (the paper's budget) or 'toy' (CPU-sized, efface.toy.presets; "
                                    "the default with --model toy, refused on other models)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of every image (default: 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack; prompt i's image uses seed + i (default: 0)")
    p.add_argument("--threshold", type=float, default=None,
                   help="the judge's threshold where it has one (nudity: NudeNet score, default 0.6 as RECE; "
                        "UnlearnDiffAtk's table: 0.45); the toy judge has none")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_model_options(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("score", help="judge a folder of images: per image its scores and the decision",
                       description="Score every image of --images with a judge (toy classifier, NudeNet): per "
                                   "file its score(s) and whether the concept is judged present, with the judge's "
                                   "name, threshold and weights hash. For images generated anywhere.")
    p.add_argument("--judge", required=True, help="toy or nudity")
    p.add_argument("--images", required=True, help="a directory of images (.png, .jpg, .jpeg, .webp)")
    p.add_argument("--concept", required=True, help="the concept to look for (toy: a shape, colour or style)")
    p.add_argument("--threshold", type=float, default=None, help="the judge's threshold (nudity: default 0.6)")
    p.add_argument("--nudenet-model", default=None, help="nudity: a local NudeNet ONNX file")
    p.add_argument("--out", required=True, help="output JSON file (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("list", help="list registered methods, attacks, metrics and bench protocols")
    p.add_argument("kind", nargs="?", choices=["methods", "attacks", "metrics", "protocols"], help="only this kind")
    p.set_defaults(func=cmd_list)

    toy = sub.add_parser("toy", help="the toy world and toy-sd").add_subparsers(dest="toy_command", required=True,
                                                                              metavar="TOY_COMMAND")
    toy.add_parser = lambda name, **kw: toy.__class__.add_parser(toy, name, parents=[common], **kw)
    p = toy.add_parser("train", help="train toy-sd and the toy classifier, or toy-flux (resumable)",
                       description="Train toy-sd (tokenizer, text encoder, VAE, UNet) and the toy classifier, or "
                                   "with --model toy-flux, toy-flux (T5 tokenizer and encoder, transformer) on top "
                                   "of a toy-sd's VAE and CLIP text encoder. Each stage is resumable: rerun the "
                                   "same command after an interruption.")
    p.add_argument("--model", choices=("toy-sd", "toy-flux"), default="toy-sd", help="which toy model to train")
    p.add_argument("--base", help="toy-flux: the toy-sd pipeline directory whose VAE and CLIP text encoder it "
                                  "shares (default: the bundled toy-sd)")
    p.add_argument("--work", help="work directory for stages and checkpoints (default: runs/toy-train, "
                                  "runs/toy-flux-train for toy-flux)")
    p.add_argument("--out", default="runs/toy-weights", help="output directory (toy-sd/ and classifier/, or toy-flux/)")
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
        if getattr(args, "seed", None) is not None:  # every command's --seed, before any work
            cfg.check_seed(args.seed, "--seed")
        return args.func(args)
    except EffaceError as err:
        log.error("%s", err)
        return 2
    except FileExistsError as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
