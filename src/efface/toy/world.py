"""The toy world's vocabulary: concepts, their synonyms and the caption templates.

Three axes mirror real erasure targets: *shape* (the object axis), *colour* and *style* (the
background texture, standing in for an artistic style). Every concept has synonyms, split once and
for all into a **train** part and a **held-out** part; the caption templates are split the same way.

Who sees what:

* the text encoder (the toy's stand-in for CLIP's web-scale pre-training) learns every word, train
  and held-out, so that a held-out synonym lands close to its concept, as "ring" does in real CLIP;
* the UNet is trained on train templates and train synonyms only;
* erasure methods are given the concept's canonical name (``circle``); evaluations then ask
  whether the concept also disappears under its other train synonyms ("synonyms") and under
  held-out synonyms in held-out templates ("held-out paraphrases"), words no erasure saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
STYLES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
AXES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}

# concept -> (train synonyms, held-out synonyms); the canonical name is the first train synonym.
SYNONYMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "circle": (("circle", "disc"), ("ring", "round shape")),
    "square": (("square", "box"), ("block", "tile")),
    "triangle": (("triangle", "trigon"), ("pyramid", "wedge")),
    "star": (("star", "pentagram"), ("starburst", "sparkle")),
    "cross": (("cross", "plus"), ("cruciform", "crosslet")),
    "heart": (("heart", "love heart"), ("valentine", "love symbol")),
    "red": (("red", "crimson"), ("scarlet", "ruby")),
    "green": (("green", "emerald"), ("lime", "jade")),
    "blue": (("blue", "azure"), ("navy", "cobalt")),
    "yellow": (("yellow", "golden"), ("lemon", "amber")),
    "purple": (("purple", "violet"), ("lilac", "plum")),
    "plain": (("plain", "blank"), ("empty", "solid")),
    "striped": (("striped", "stripy"), ("lined", "banded")),
    "dotted": (("dotted", "spotty"), ("speckled", "polka dot")),
    "checkered": (("checkered", "chequered"), ("checkerboard", "tiled")),
}

# Templates name the slots they use; {s} shape, {c} colour, {t} style (texture).
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {c} {s}",
    "a {s}",
    "{s}",
    "a {c} {s} on a {t} background",
    "a {s} on a {t} background",
    "a {t} picture of a {c} {s}",
    "{c} {s}, {t}",
    "a {c} {s}, {t} style",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a picture of a {c} {s}, {t} style",
    "an image showing a {s} in {c} with a {t} backdrop",
    "a drawing of a {c} {s} over a {t} pattern",
)

SPLITS = ("train", "heldout")
SLOTS = {"shape": "s", "colour": "c", "style": "t"}

# toy-sd's training captions with the shape slot left open ("a red {}", "a striped picture of a red
# {}"): the ``templates`` of the toy presets (efface.toy.presets), as the official codes use
# phrasings of the captions their models were trained on ("image of {}", ChatGPT captions).
TOY_CONTEXTS: tuple[str, ...] = (
    "{}", "a {}", *(f"a {c} {{}}" for c in COLOURS),
    *(f"a {t} picture of a {c} {{}}" for c in COLOURS for t in STYLES),
)


def axis_of(concept: str) -> str:
    """The axis ("shape", "colour" or "style") a canonical concept belongs to."""
    for axis, names in AXES.items():
        if concept in names:
            return axis
    raise ValueError(f"{concept!r} is not a toy concept; choose one of {', '.join(SYNONYMS)}")


def synonyms(concept: str, split: str = "train") -> tuple[str, ...]:
    """Words for ``concept`` in a split ("train" or "heldout")."""
    if concept not in SYNONYMS:
        raise ValueError(f"{concept!r} is not a toy concept; choose one of {', '.join(SYNONYMS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return SYNONYMS[concept][SPLITS.index(split)]


def vocabulary() -> list[str]:
    """Every word the toy world's captions can contain (train and held-out)."""
    words: set[str] = set()
    for pair in SYNONYMS.values():
        for group in pair:
            for phrase in group:
                words.update(phrase.split())
    for template in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        for token in template.replace(",", " ").split():
            if not token.startswith("{"):
                words.add(token)
    return sorted(words)


@dataclass(frozen=True)
class Scene:
    """What one toy image shows: a canonical shape, colour and style."""

    shape: str
    colour: str
    style: str

    def labels(self) -> tuple[int, int, int]:
        return SHAPES.index(self.shape), COLOURS.index(self.colour), STYLES.index(self.style)


def caption(scene: Scene, rng: random.Random, split: str = "train", *, with_words: bool = False):
    """A random caption of ``scene`` from ``split`` and which axes it names.

    With ``with_words`` also the word chosen for each axis (keyed by axis).
    """
    templates = TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES
    template = rng.choice(templates)
    words = {
        "shape": rng.choice(synonyms(scene.shape, split)),
        "colour": rng.choice(synonyms(scene.colour, split)),
        "style": rng.choice(synonyms(scene.style, split)),
    }
    named = {axis: "{" + slot + "}" in template for axis, slot in SLOTS.items()}
    text = template.format(**{SLOTS[a]: w for a, w in words.items()})
    return (text, named, words) if with_words else (text, named)


def prompts_for(concept: str, split: str = "train", *, rng: random.Random, n: int,
                words: tuple[str, ...] | None = None) -> list[str]:
    """``n`` captions that name ``concept`` (canonical) using ``split``'s words and templates.

    The other axes are drawn at random; templates that omit the concept's axis are skipped.
    ``words``: the words that may name ``concept`` (default: its synonyms in ``split``).
    """
    axis = axis_of(concept)
    slot = {"shape": "{s}", "colour": "{c}", "style": "{t}"}[axis]
    templates = [t for t in (TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES) if slot in t]
    out = []
    for _ in range(n):
        scene = random_scene(rng, **{axis: concept})
        words_of = {a: words if a == axis and words else synonyms(getattr(scene, a), split) for a in AXES}
        fill = {"s": rng.choice(words_of["shape"]), "c": rng.choice(words_of["colour"]),
                "t": rng.choice(words_of["style"])}
        out.append(rng.choice(templates).format(**fill))
    return out


def random_scene(rng: random.Random, **fixed: str) -> Scene:
    """A uniformly random scene; keyword arguments (shape=, colour=, style=) pin axes."""
    values = {axis: fixed.get(axis) or rng.choice(names) for axis, names in AXES.items()}
    return Scene(values["shape"], values["colour"], values["style"])
