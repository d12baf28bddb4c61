"""The toy world's presets: the CPU-sized options and the inputs a toy-sd run hands to methods and attacks.

Methods, attacks and metrics import nothing from :mod:`efface.toy` (docs/architecture.md): what
makes a run fit toy-sd is handed to them from here, by the command line, the benchmark, the
robustness measures and the bench scripts, all through :func:`method_setup` / :func:`attack_setup`:

* a :class:`~efface.config.Preset` per method / attack, from one table per toy model
  (:data:`METHOD_PRESETS`, :data:`ATTACK_PRESETS`: ``"toy-sd"`` and ``"toy-flux"``). Its name is ``"toy"``,
  which manifests, attack results and bench cells record. A method or attack without an entry
  gets an empty preset: the paper's defaults;
* the injected inputs (:func:`method_inputs`, :func:`attack_inputs`): MACE's ``image_source``
  (drawn toy images with their exact masks) and the ``synonyms`` attack's ``synonym_source``.

From Python, the same request gives the same result as ``efface erase --model toy``::

    erase(pipe, "uce", ["circle"], preset=method_preset("uce"))
    erase(pipe, "mace", ["circle"], preset=method_preset("mace"), **method_inputs("mace"))

Each preset's comment says why its values are what they are (measured with bench/erasure_smoke.py
and docs/erasure.md, "<method> on toy-sd"; attacks: bench/attack_smoke.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from efface.config import Preset
from efface.errors import InputError
from efface.toy import ALIASES, TOY_MODELS, toy_name
from efface.toy.sources import ShapeImages, toy_synonyms
from efface.toy.world import TOY_CONTEXTS

PRESET = "toy"  # the name every toy preset is recorded under

# ESD on toy-sd on 2 CPU cores: about 75 s each. A small model trained at lr 1e-3 needs a larger
# step than SD; a batch of 8 x_t per iteration averages the noisy single-sample gradient; negative
# guidance 3 (the strength lever: esd-u / esd-all then also erase the unseen synonyms). The bare
# concept for esd-u / esd-all (in context their other shapes drop to 0.64); esd-x and esd-x-strict
# have their own toy presets below.
_ESD = {"iterations": 150, "lr": 1.5e-4, "batch_size": 8, "ddim_steps": 20, "negative_guidance": 3.0}

METHOD_PRESETS: dict[str, dict[str, dict[str, Any]]] = {"toy-sd": {
    # toy-sd: each concept in the toy world's training contexts ("a red {}", ...), guided to the same
    # context without it, other concepts preserved in those contexts (docs/erasure.md, "UCE on toy-sd").
    "uce": {"expand_prompts": True, "templates": TOY_CONTEXTS, "guide_context": "template"},
    # toy-sd: the initial UCE edit as efface uce's toy preset (the toy world's contexts), and guide
    # values from the original weights: with the official "current" ones, each round brings the
    # circle back on toy-sd (docs/erasure.md, "RECE on toy-sd").
    # uce_preserve_empty off: the toy numbers of docs/erasure.md were measured without the first UCE
    # release's "" preservation (RECE's paper default since issue 13)
    "rece": {"uce_expand_prompts": True, "uce_templates": TOY_CONTEXTS, "uce_guide_context": "template",
             "guide_values": "original", "uce_preserve_empty": False},
    "esd-u": _ESD,
    "esd-all": _ESD,
    # toy-sd: esd-x trains only what the prompt's tokens are projected to, and toy-sd reads a shape
    # from every token after the shape word (docs/toy-world.md), so the concept is trained in the
    # toy world's caption contexts ("a red circle", guided away from "a red"); the window between
    # "circle stays" and "other shapes suffer" is narrow: lr 1e-4 leaves circle at 0.83, 1.25e-4
    # erases it (0.13) with the others at 1.00, 2e-4 costs the others 27 points (docs/erasure.md).
    "esd-x": {**_ESD, "lr": 1.25e-4, "templates": TOY_CONTEXTS},
    # toy-sd: as esd-x, in the caption contexts; only K and V change, so a larger step (1.5e-4
    # leaves circle at 1.00; 2.5e-4: 0.08 with the others at 0.98; 5e-4 costs the others 33 points)
    # x_t sampled by the model being trained, as measured in docs/erasure.md (the esd_sd.py default is
    # the frozen model since issue 13)
    "esd-x-strict": {**_ESD, "lr": 2.5e-4, "templates": TOY_CONTEXTS, "sample_with": "trained"},
    # toy-sd on 2 cores: ESD's toy schedule for 100 iterations, then 40 adversarial iterations with
    # 3 PGD steps (each costs a UNet backward pass): about 2.5 min. After the full 150 ESD
    # iterations the adversarial stage costs the other shapes 14 points (circle 0.04, others 0.86).
    "race": {**_ESD, "esd_iterations": 100, "iterations": 40, "pgd_steps": 3},
    # toy-sd on 2 CPU cores: about 1 min. Fewer, faster anchor samples; a larger step for a small model.
    "ca": {"iterations": 400, "lr": 2e-3, "batch_size": 16, "num_anchor_images": 128, "anchor_steps": 20,
           "templates": TOY_CONTEXTS},
    # toy-sd: about 4.5 CPU-minutes (about 2.5 min on 2 free cores). CA's toy schedule (lr 2e-3, batch
    # 16, 128 anchor images of 20 steps, the toy world's caption contexts), 100 discriminator warm-up
    # steps, then 200 adversarial ones: circle 0.00, other shapes 0.94 (base 1.00; docs/erasure.md);
    # 300 adversarial steps cost the others 5 more points; without the gradient surgery they drop to 0.63.
    # Anchors by stochastic DDIM (eta 1), as measured; the official DPM-Solver++ anchors (the paper
    # default since issue 13) give circle 0.00 but others 0.85 on toy-sd (bench/erasure_smoke.py, n=48):
    # (a likely reason, not verified: 128 deterministic anchors of few prompts vary less than eta-1 samples)
    "doco": {"iterations": 300, "warmup": 100, "lr": 2e-3, "batch_size": 16, "num_anchor_images": 128,
             "anchor_steps": 20, "templates": TOY_CONTEXTS, "anchor_sampler": "default"},
    # toy-sd, 2 CPU cores: about 40 s per concept (bench/erasure_smoke.py: circle 0.17, others 1.00;
    # five shapes at once in 3.5 min). The toy world's drawn images with their exact shape masks
    # (data "source": the image source method_inputs("mace") hands in); toy-sd's keys are 64-d
    # (norm ~10): SD's lamb 1e3 leaves circle at 0.96, lamb 1 erases; a larger LoRA step for the small
    # model; the other shapes preserved in both closed forms (without: circle 0.38, others 0.93).
    # docs/erasure.md, "MACE on toy-sd".
    "mace": {"templates": TOY_CONTEXTS, "data": "source", "num_images": 32, "lr": 1e-3, "iterations": 100,
             "batch_size": 4, "lamb": 1.0, "train_preserve_scale": 1.0, "fuse_preserve_scale": 1.0},
    # toy-sd: 120 iterations of batch 2, 10 DDIM steps: 364 s in bench/erasure_smoke.py with the 2 cores
    # shared by about six jobs (not timed alone). A rank-1 membrane on a small model needs a larger step
    # (lr 3e-3); toy-sd's anchoring MSE on random embeddings (1e-4 to 1e-3) is small against the erasing
    # loss (~0.04), and with the official weight 1000 (lr 1e-2, 80 iterations) the circle stayed at 1.00
    # while the anchoring term grew; 30 erases. The concept in the toy world's caption contexts (its token
    # states depend on the whole caption); negative guidance 6 (3: held-out 0.83); composition "sum", so a
    # single membrane acts with gamma, not gamma^2 (merged, eta 3: train words 0.29 instead of 0.25).
    # Facilitated transport keeps the other shapes (their prompts' gamma: 0.03 on average, at most 0.22;
    # others 0.975-1.00) and opens the membrane fully for prompts naming "circle", but only by the
    # embedding cosine (0.25 to 0.35) for the train synonym "disc" inside a caption ("red disc, spotty"),
    # about the quarter of the prompts that keep the circle: train words 0.19, held out 0.67, others 1.00
    # (smoke bench, n=48; n=24: 0.25 / 0.71 / 0.975). The same membranes with facilitated_transport=False
    # (n=24): circle 0.00, held out 0.00, others 1.00: on toy-sd the anchoring alone keeps the other shapes.
    "spm": {"iterations": 120, "lr": 3e-3, "la_strength": 30.0, "batch_size": 2, "anchor_batch": 4,
            "ddim_steps": 10, "negative_guidance": 6.0, "templates": TOY_CONTEXTS, "composition": "sum",
            "lr_warmup_steps": 20},  # the official schedule's shape: warm-up 1/6 of the steps, 3 cosine cycles
    # toy-sd: about 130 s single-threaded. 60 iterations of batch 8 at lr 2e-3 (toy-sd's erasers
    # are tiny; the ESD toy schedule's 20 DDIM steps and negative guidance 3), rank 32, masks from
    # the 8x8 maps (toy latents are 8x8: SD's 16x16 maps are its 64x64 latents / 4), 2 attack
    # steps on 4 soft tokens, the concept in toy-sd's caption contexts (the bare word erases every
    # shape: others 0.725). bench/erasure_smoke.py: circle 0.00, held-out 0.00, others 0.96; lr
    # 1e-3: 40 iterations leave circle at 0.79, 60 -> 0.04, 80 -> 0.00 (24 prompts per split).
    "receler": {"iterations": 60, "lr": 2e-3, "batch_size": 8, "ddim_steps": 20, "negative_guidance": 3.0,
                "rank": 32, "mask_resolution": 8, "adversarial_steps": 2, "adversarial_tokens": 4,
                "templates": TOY_CONTEXTS},
    # toy-sd: only its 3-layer, hidden-64 text encoder is trained. 300 iterations (40 plain ESD
    # warm-up), batch 4 and 10 DDIM steps, ESD's toy negative guidance 3, k 1 with 5 attack steps
    # at lr 1e-2 (the official 30 would cost 6x more), retain weight 6 on 4 of the other shapes'
    # caption-context prompts per iteration; 328 s on 2 cores. n=48: circle 0.06, held-out 0.02,
    # others 0.98. Until 2026-12-02 it was 100 iterations with 2 attack steps (circle 0.15, 128 s):
    # too short for the adversarial phase to matter (UnlearnDiffAtk ASR 0.77 against 0.28 at seed 0,
    # docs/attacks.md, "Robustness ordering"). A text encoder shared by every prompt needs the
    # strong retain term: weight 1 / 3 at lr 3e-4 leave the others at 0.81 / 0.85.
    "advunlearn": {"iterations": 300, "warmup_iter": 40, "lr": 2e-4, "ddim_steps": 10, "batch_size": 4,
                   "attack_step": 5, "attack_lr": 1e-2, "negative_guidance": 3.0, "retain_loss_w": 6.0,
                   "retain_batch": 4, "templates": TOY_CONTEXTS, "retain_templates": TOY_CONTEXTS},
    # toy-sd: 64 forget + 64 retain latents of 20 DDIM steps, 200 steps at lr 5e-4 (toy-sd was
    # trained at 1e-3), the toy caption contexts, alpha 2 on the retain loss with the original
    # model's predictions as its target: circle 0.08, other shapes 0.96 (bench/erasure_smoke.py;
    # 556 s on 2 cores shared with five other jobs; alone, an estimated third of that). With the
    # official noise target the retain loss trains toy-sd on its own samples and the other shapes
    # drop: 0.83 at lr 5e-4 / alpha 2, 0.88 at lr 1e-4 / alpha 1 (circle 0.75 there), 0.60 at
    # lr 1e-3 (n=24).
    "salun": {"iterations": 200, "lr": 5e-4, "alpha": 2.0, "retain_target": "original", "num_images": 64,
              "sample_steps": 20, "templates": TOY_CONTEXTS},
}}

ATTACK_PRESETS: dict[str, dict[str, dict[str, Any]]] = {"toy-sd": {
    # toy-sd: captions are short (its tokenizer keeps 24 tokens), K 8; the toy world's caption
    # contexts make the pairs; population 64 (32 kept), 150 generations (about 3 s per prompt on
    # 2 cores; 200 x 300 took 20 s).
    "ring-a-bell": {"prompt_length": 8, "population": 64, "survivors": 32, "generations": 150,
                    "templates": TOY_CONTEXTS},
    # toy-sd: 10 timesteps x 10 steps (about 2 s per prompt on 2 cores); its 16-token tokenizer
    # leaves room for k 3 before short toy captions.
    "unlearndiffatk": {"tokens": 3, "iterations": 10, "n_timesteps": 10},
    # toy-sd on 2 cores: 100 steps, judged every 25 (about 3 s per prompt); N 8 fits its 24-token
    # tokenizer with room to spare.
    "p4d-n": {"prompt_length": 8, "iterations": 100, "eval_every": 25},
    "p4d-k": {"prompt_length": 8, "iterations": 100, "eval_every": 25},
    # toy-sd on 2 cores: 300 steps of 8 images (about 10 s per concept), the toy caption contexts,
    # started from the word "shape".
    "concept-inversion": {"steps": 300, "batch_size": 8, "lr": 0.02, "initializer": "shape",
                          "templates": TOY_CONTEXTS},
    # toy-sd on 2 cores: 60 epochs, the surrogate hardened every 20 with a toy-sized step (1e-4;
    # toy-sd was trained at 1e-3); about 20 s per concept.
    "pund": {"epochs": 60, "surrogate_every": 20, "surrogate_lr": 1e-4},
    # toy-sd: 8 tokens, 40 steps, top-k 32, 64 candidates (about 1 s per prompt on 2 cores).
    "mma-diffusion": {"tokens": 8, "steps": 40, "topk": 32, "batch": 64},
    # toy-sd: 12 + 5 x 8 images per prompt (a few seconds on 2 cores), 8 neighbours (its vocabulary
    # has about 40 words).
    "riatig": {"population": 12, "children": 8, "elites": 4, "generations": 5, "neighbours": 8},
}}


# toy-flux: toy-sd's tables (CPU-sized budgets), measured on toy-flux with bench/erasure_smoke.py
# --model toy-flux (docs/erasure.md, "On toy-flux"); an entry that must differ replaces its row.
METHOD_PRESETS["toy-flux"] = dict(METHOD_PRESETS["toy-sd"])
# toy-flux's attention maps are 4 x 4 (16 packed image tokens), not toy-sd's 8 x 8
METHOD_PRESETS["toy-flux"]["receler"] = {**METHOD_PRESETS["toy-sd"]["receler"], "mask_resolution": 4}
ATTACK_PRESETS["toy-flux"] = dict(ATTACK_PRESETS["toy-sd"])

def toy_model(model) -> str | None:
    """The toy model ``model`` is (``"toy-sd"`` or ``"toy-flux"``), or None: ``model`` is a ``--model``
    value (``"toy"``, a toy model's name, a bundled weights directory) or a pipeline (loaded from the
    bundled weights: :func:`efface.toy.toy_name`)."""
    if isinstance(model, (str, os.PathLike)):
        name = ALIASES.get(str(model), str(model))
        if name in TOY_MODELS:
            return name
        path = Path(model).expanduser()
        if not path.is_dir():
            return None
        return next((n for n, weights in TOY_MODELS.items() if path.resolve() == weights.resolve()), None)
    return toy_name(model)


def _table(model) -> str:
    toy = toy_model(model)
    if toy is None:
        raise InputError(f"the 'toy' presets are for toy-sd and toy-flux (--model toy, --model toy-flux); "
                         f"{_describe(model)} is not a toy model: use the paper's preset there ('paper', the default)")
    return toy


def _describe(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return repr(str(model))
    return str(getattr(model, "efface_source", type(model).__name__))


def method_preset(name: str, model="toy-sd") -> Preset:
    """Method ``name``'s toy preset on ``model`` (empty if it has none: the paper's defaults)."""
    return Preset(PRESET, dict(METHOD_PRESETS[_table(model)].get(name, {})))


def attack_preset(name: str, model="toy-sd") -> Preset:
    """Attack ``name``'s toy preset on ``model`` (empty if it has none: the paper's budget)."""
    return Preset(PRESET, dict(ATTACK_PRESETS[_table(model)].get(name, {})))


def method_inputs(name: str, model="toy-sd") -> dict[str, Any]:
    """The inputs a toy run hands to method ``name`` besides its options (none on other models):
    MACE's ``image_source``, the toy world's drawn shapes with their exact masks."""
    if toy_model(model) is None:
        return {}
    return {"image_source": ShapeImages()} if name == "mace" else {}


def attack_inputs(name: str, model="toy-sd") -> dict[str, Any]:
    """The inputs a toy run hands to attack ``name`` besides its options (none on other models):
    the ``synonyms`` attack's ``synonym_source``, the toy world's train synonyms then held-out paraphrases."""
    if toy_model(model) is None:
        return {}
    return {"synonym_source": toy_synonyms} if name == "synonyms" else {}


def default_preset(model) -> str:
    """The preset a run on ``model`` takes unless told: ``"toy"`` on a toy model, else ``"paper"``."""
    return PRESET if toy_model(model) else "paper"


def method_setup(name: str, model, preset: str | None = None) -> tuple[Preset | str, dict[str, Any]]:
    """``(preset, inputs)`` for ``erase(pipe, name, ..., preset=preset, **inputs)`` on ``model`` (a
    pipeline or a ``--model`` value), as the command line, the benchmark and the bench scripts choose
    them: ``preset`` None is :func:`default_preset`; ``"toy"`` is :func:`method_preset` (refused on
    other models); another name is the method's own (``"paper"``). ``inputs``: :func:`method_inputs`."""
    return _setup(name, model, preset, method_preset, method_inputs)


def attack_setup(name: str, model, preset: str | None = None) -> tuple[Preset | str, dict[str, Any]]:
    """``(preset, inputs)`` for ``ATTACKS.get(name)(preset=preset, **inputs)``, chosen as
    :func:`method_setup` chooses a method's."""
    return _setup(name, model, preset, attack_preset, attack_inputs)


def _setup(name, model, preset, table, inputs) -> tuple[Preset | str, dict[str, Any]]:
    preset = preset or default_preset(model)
    return (table(name, model) if preset == PRESET else preset), inputs(name, model)
