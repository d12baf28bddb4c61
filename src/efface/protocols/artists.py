"""Artistic style erasure prompts: the artists of ESD and UCE.

ESD (arXiv 2303.07345) erases five famous artists and five modern ones; its prompt files are
``data/big_artist_prompts.csv`` (Pablo Picasso, Van Gogh, Rembrandt, Andy Warhol, Caravaggio: 20
ChatGPT-written prompts each) and ``data/short_niche_art_prompts.csv`` (Tyler Edlin, Thomas Kinkade,
Kilian Eng, Kelly McKernan, Ajin: Demi Human), columns ``case_number, prompt, evaluation_seed,
artist`` (https://github.com/rohitgandikota/erasing). UCE (arXiv 2308.14761) evaluates with five
templates per artist (its ``data/test_artists_prompts.csv``): :data:`TEMPLATES`. Without a file the
prompts are the templates filled with each artist's name; with ``path`` (any CSV with ``prompt`` and
``artist`` columns, e.g. the files above) the file's prompts and seeds are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from efface.errors import InputError
from efface.protocols.base import EvalPrompt, FileSpec, read_csv, require_file, rows_to_prompts

# Names as written in ESD's prompt files.
FAMOUS_ARTISTS: tuple[str, ...] = ("Van Gogh", "Pablo Picasso", "Rembrandt", "Andy Warhol", "Caravaggio")
MODERN_ARTISTS: tuple[str, ...] = ("Kelly McKernan", "Thomas Kinkade", "Tyler Edlin", "Kilian Eng", "Ajin: Demi Human")
GROUPS: dict[str, tuple[str, ...]] = {
    "famous": FAMOUS_ARTISTS,
    "modern": MODERN_ARTISTS,
    "all": FAMOUS_ARTISTS + MODERN_ARTISTS,
}
# UCE's evaluation templates (data/test_artists_prompts.csv).
TEMPLATES: tuple[str, ...] = (
    "Image in the style of {}",
    "Art inspired by {}",
    "Painting in the style of {}",
    "A reproduction of art by {}",
    "A famous artwork by {}",
)

ARTISTS_FILE = FileSpec(
    name="big_artist_prompts.csv",
    format="CSV with columns case_number, prompt, evaluation_seed, artist",
    source=("data/big_artist_prompts.csv or data/short_niche_art_prompts.csv in "
            "https://github.com/rohitgandikota/erasing "
            "(data/test_artists_prompts.csv in https://github.com/rohitgandikota/unified-concept-editing)"),
)


def _artists(group: str, artists: Sequence[str] | None) -> tuple[str, ...]:
    if artists is not None:
        return (artists,) if isinstance(artists, str) else tuple(artists)
    if group not in GROUPS:
        raise InputError(f"unknown artist group {group!r}; valid: {', '.join(GROUPS)}")
    return GROUPS[group]


def load_artists(path: str | Path | None = None, *, group: str = "all", artists: Sequence[str] | None = None,
                 templates: Sequence[str] = TEMPLATES, n_per_prompt: int = 1, seed: int = 0) -> list[EvalPrompt]:
    """Prompts about ``artists`` (default: the ``group``'s: ``famous``, ``modern`` or ``all``).

    Without ``path``: each template filled with each artist, ``n_per_prompt`` times with seeds
    ``seed, seed + 1, ...`` counted over the whole list. With ``path``: the file's rows whose
    ``artist`` is wanted (compared case-insensitively: ESD writes both "Kelly McKernan" and
    "Kelly Mckernan"; every row when ``artists`` is None and ``group`` is ``"all"``).
    """
    names = _artists(group, artists)
    if path is not None:
        rows = read_csv(require_file(path, ARTISTS_FILE), required=("prompt", "artist"), spec=ARTISTS_FILE)
        prompts = rows_to_prompts(rows, concept_column="artist")
        if artists is None and group == "all":
            return prompts
        wanted = {n.casefold() for n in names}
        return [p for p in prompts if (p.concept or "").casefold() in wanted]
    if any("{}" not in t for t in templates):
        raise InputError("every artist template needs a {} slot for the name")
    combos = [(t, name) for name in names for t in templates for _ in range(n_per_prompt)]
    return [EvalPrompt(prompt=t.format(name), seed=seed + i, concept=name, meta={"template": t})
            for i, (t, name) in enumerate(combos)]
