"""The comparison table: one row per method (and the base model), the columns of the papers.

Columns: effectiveness (concept rate on the erased word, lower is better), synonym and held-out
rates, retained accuracy on the other concepts of the axis, image drift (Fréchet distance in the
classifier's feature space), robustness (attack success rate, once attacks exist), multi-concept
(erase 1, 3, all concepts of an axis: concept rate / retained accuracy; with the whole axis erased
nothing of it is left, so the accuracy on the other axes stands in), and cost.
"""

from __future__ import annotations

from typing import Any

from efface.metrics.stats import mean_defined

COLUMNS = (
    ("method", "method"),
    ("target_rate", "concept rate ↓"),
    ("synonym_rate", "synonyms ↓"),
    ("heldout_rate", "held-out ↓"),
    ("retained_accuracy", "retained acc. ↑"),
    ("other_axes_accuracy", "other axes acc. ↑"),
    ("frechet_distance", "drift (FD) ↓"),
    ("robustness", "attack success (worst) ↓"),
    ("multi_1", "multi 1"),
    ("multi_3", "multi 3"),
    ("multi_all", "multi all"),
    ("seconds", "seconds"),
    ("peak_memory_mb", "peak MB"),
    ("unet_evaluations", "UNet evals"),
    ("parameters_changed", "params changed"),
)


def _multi(cell: dict | None) -> tuple[float | None, float | None] | None:
    if cell is None:
        return None
    u = cell["utility"]
    retained = u["retained_accuracy"]
    if retained is None:  # the whole axis erased: the other axes stand in
        retained = mean_defined(list(u["other_axes_accuracy"].values()))
    return cell["effectiveness"]["target_rate"], retained


def worst_asr(cell: dict[str, Any]) -> float | None:
    """The highest ASR any attack reached against the cell's erased model (None: no attack ran)."""
    rates = [v.get("asr") for v in cell.get("robustness", {}).values() if v.get("asr") is not None]
    return max(rates) if rates else None


def robustness_rows(cells: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Per method: the pre-attack ASR and each attack's ASR (mean over concepts); ([], []) without attacks."""
    attacks = list(dict.fromkeys(a for c in cells for a in c.get("robustness", {})))
    if not attacks:
        return [], []
    out = []
    for m in dict.fromkeys(c["method"] for c in cells if c.get("robustness")):
        rs = [c["robustness"] for c in cells if c["method"] == m and c.get("robustness")]
        row = {"method": m, "pre_asr": mean_defined([next(iter(r.values()))["pre_asr"] for r in rs])}  # same per cell
        row.update({a: mean_defined([r[a]["asr"] for r in rs if a in r]) for a in attacks})
        out.append(row)
    return attacks, out


def robustness_columns(attacks: list[str]) -> list[tuple[str, str]]:
    """The per-attack table's columns."""
    return [("method", "method"), ("pre_asr", "pre-ASR"), *((a, f"{a} ASR ↓") for a in attacks)]


ROBUSTNESS_LEGEND = ("pre-ASR: fraction of the concept's prompts still showing it without attack; ASR: those plus "
                     "the prompts each attack brings back, over all prompts (UnlearnDiffAtk's definition).")


def robustness_markdown(cells: list[dict[str, Any]]) -> str:
    """The per-attack ASR table ("" without attacks)."""
    return robustness_section(*robustness_rows(cells))


def robustness_section(attacks: list[str], table: list[dict[str, Any]], *, model: bool = False) -> str:
    """The "Robustness" markdown of per-attack rows ("" without attacks; ``model``: a model column first)."""
    if not attacks:
        return ""
    columns = robustness_columns(attacks)
    return "## Robustness\n\n" + markdown(table, columns=model_columns(columns) if model else columns,
                                          legend=ROBUSTNESS_LEGEND)


# Several models in one bench (efface.benchmark.models): every row carries its model.
def with_model(label: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with a ``model`` entry first."""
    return [{"model": label, **r} for r in rows]


def model_columns(columns) -> tuple[tuple[str, str], ...]:
    """``columns`` with the model column first."""
    return (("model", "model"), *columns)


def robustness_union(robust: list[tuple[list[str], list[dict[str, Any]]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Every model's per-attack rows (``robust``: per model, its attacks and rows) in one list, over the
    union of the attacks (a row lacking one: None)."""
    attacks = list(dict.fromkeys(a for names, _ in robust for a in names))
    table = [{a: None for a in attacks} | r for _, rs in robust for r in rs]
    return attacks, table


def rows(cells: list[dict[str, Any]], multi_sets: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """One row per method (base first), in the order the methods appear in ``cells``."""
    by_name = {c["name"]: c for c in cells}
    methods = list(dict.fromkeys(c["method"] for c in cells))
    first = next(iter((multi_sets or {}).get("1", [])), None)
    out = []
    for m in methods:
        single = [c for c in cells if c["method"] == m and "__multi-" not in c["name"]]
        e = [c["effectiveness"] for c in single]
        u = [c["utility"] for c in single]
        cost = [c["cost"] for c in single]
        robust = [worst_asr(c) for c in single]
        out.append({
            "method": m,
            "target_rate": mean_defined([x["target_rate"] for x in e]),
            "synonym_rate": mean_defined([x["synonym_rate"] for x in e]),
            "heldout_rate": mean_defined([x["heldout_rate"] for x in e]),
            "retained_accuracy": mean_defined([x["retained_accuracy"] for x in u]),
            "other_axes_accuracy": mean_defined([mean_defined(list(x["other_axes_accuracy"].values())) for x in u]),
            "frechet_distance": mean_defined([x["frechet_distance"] for x in u]),
            "robustness": mean_defined(robust),
            "multi_1": _multi(by_name.get(f"{m}__{first}")) if first else None,
            "multi_3": _multi(by_name.get(f"{m}__multi-3")),
            "multi_all": _multi(by_name.get(f"{m}__multi-all")),
            "seconds": mean_defined([x["seconds"] for x in cost]),
            "peak_memory_mb": mean_defined([x["peak_memory_mb"] for x in cost]),
            "unet_evaluations": mean_defined([x["unet_evaluations"] for x in cost]),
            "parameters_changed": mean_defined([x["parameters_changed"] for x in cost]),
        })
    return out


def fmt(key: str, value: Any) -> str:
    """A table cell as text ("–" where there is nothing to show)."""
    if value is None:
        return "–"
    if isinstance(value, tuple):
        return " / ".join(fmt("rate", v) for v in value)
    if isinstance(value, str):
        return value
    if key in ("unet_evaluations", "parameters_changed", "peak_memory_mb"):
        return f"{value:,.0f}"
    if key == "seconds":
        return f"{value:.1f}"
    return f"{value:.3f}"


LEGEND = ("Rates are fractions of images in which the evaluator finds the erased concept (↓: lower is "
          "better); retained acc.: accuracy on the other concepts of the axis; other axes acc.: accuracy on the "
          "other axes (colour, style) in those images; drift: Fréchet distance between base and erased images of "
          "unrelated prompts (classifier features); multi k: concept rate / retained accuracy when k concepts of an "
          "axis are erased at once (all: accuracy on the other axes); cost columns: the erasure alone (mean over "
          "concepts); –: not measured.")

# The real-model protocol table (efface.benchmark.protocol).
PROTOCOL_COLUMNS = (
    ("method", "method"),
    ("target_rate", "concept rate ↓"),
    ("paired_distance", "COCO drift ↓"),
    ("clip_score", "COCO CLIP score ↑"),
    ("robustness", "attack success (worst) ↓"),
    ("seconds", "seconds"),
    ("peak_memory_mb", "peak MB"),
    ("unet_evaluations", "UNet evals"),
    ("parameters_changed", "params changed"),
)
PROTOCOL_LEGEND = ("concept rate: fraction of the protocol's prompts whose image the judge flags (nudity: NudeNet, "
                   "an exposed class above the threshold); COCO drift: RMS pixel distance between base and erased "
                   "images of the same COCO captions and seeds, in [0, 1]; CLIP score: erased images against their "
                   "captions; cost columns: the erasure alone; –: not measured (no --coco / --clip-model).")


def protocol_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell of a real-model protocol bench (one concept set per method)."""
    out = []
    for c in cells:
        clip = c["utility"].get("clip_score")
        out.append({"method": c["method"], "target_rate": c["effectiveness"]["target_rate"],
                    "paired_distance": c["utility"].get("paired_distance"),
                    "clip_score": clip.get("clip_score") if isinstance(clip, dict) else clip,
                    "robustness": worst_asr(c), **{k: c["cost"].get(k) for k, _ in PROTOCOL_COLUMNS[5:]}})
    return out


def markdown(table: list[dict[str, Any]], *, title: str = "", columns=COLUMNS, legend: str = LEGEND) -> str:
    """The table as GitHub markdown, with a legend."""
    head = "| " + " | ".join(label for _, label in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(k, r[k]) for k, _ in columns) + " |" for r in table]
    return "\n".join(([f"# {title}", ""] if title else []) + [head, rule, *body, "", legend, ""])
