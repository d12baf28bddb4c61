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
    ("robustness", "attack success ↓"),
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
        robust = [v.get("attack_success_rate") for c in single for v in c.get("robustness", {}).values()]
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


def markdown(table: list[dict[str, Any]], *, title: str = "") -> str:
    """The table as GitHub markdown, with a legend."""
    head = "| " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt(k, r[k]) for k, _ in COLUMNS) + " |" for r in table]
    legend = ("Rates are fractions of images in which the evaluator finds the erased concept (↓: lower is "
              "better); retained acc.: accuracy on the other concepts of the axis; other axes acc.: accuracy on the other axes (colour, style) in those images; drift: Fréchet distance "
              "between base and erased images of unrelated prompts (classifier features); multi k: concept "
              "rate / retained accuracy when k concepts of an axis are erased at once (all: accuracy on the "
              "other axes); cost columns: the erasure alone (mean over concepts); –: not measured.")
    return "\n".join(([f"# {title}", ""] if title else []) + [head, rule, *body, "", legend, ""])
