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
COST_KEYS = ("seconds", "peak_memory_mb", "unet_evaluations", "parameters_changed")
UTILITY_KEYS = ("retained_accuracy", "frechet_distance", "paired_distance", "clip_score", "fid", "lpips_e",
                "lpips_u")


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


def _utility(u: dict[str, Any], key: str) -> float | None:
    value = u.get(key)
    return value.get(key) if isinstance(value, dict) else value  # older cells kept the CLIP summary dict


def rows(cells: list[dict[str, Any]], multi_sets: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """One row per method (base first), in the order the methods appear in ``cells``: every column any
    suite's table shows (means over the single-concept cells), ``multi_<k>`` per multi-concept set."""
    by_name = {c["name"]: c for c in cells}
    methods = list(dict.fromkeys(c["method"] for c in cells))
    multi_sets = multi_sets or {}
    first = next(iter(multi_sets.get("1", [])), None)
    out = []
    for m in methods:
        single = [c for c in cells if c["method"] == m and "__multi-" not in c["name"]]
        e = [c["effectiveness"] for c in single]
        u = [c["utility"] for c in single]
        cost = [c["cost"] for c in single]
        row = {"method": m}
        row.update({k: mean_defined([x.get(k) for x in e]) for k in ("target_rate", "synonym_rate", "heldout_rate")})
        row.update({k: mean_defined([_utility(x, k) for x in u]) for k in UTILITY_KEYS})
        row["other_axes_accuracy"] = mean_defined([mean_defined(list(x.get("other_axes_accuracy", {}).values()))
                                                   for x in u])
        row["robustness"] = mean_defined([worst_asr(c) for c in single])
        ci = [c.get("intervals", {}).get("effectiveness.target_rate") for c in single]
        row["target_rate_ci"] = (ci[0]["low"], ci[0]["high"]) if len(ci) == 1 and ci[0] else None
        for k in multi_sets:
            cell = by_name.get(f"{m}__{first}") if k == "1" else by_name.get(f"{m}__multi-{k}")
            row[f"multi_{k}"] = _multi(cell)
        row.update({k: mean_defined([x[k] for x in cost]) for k in COST_KEYS})
        out.append(row)
    return out


def fmt(key: str, value: Any) -> str:
    """A table cell as text ("–" where there is nothing to show)."""
    if value is None:
        return "–"
    if key.endswith("_ci"):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
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

# The real-model protocol tables (efface.benchmark.protocol): nudity, then the named-concept suites.
TAIL_COLUMNS = (  # the real-model tables' last columns: robustness and cost
    ("robustness", "attack success (worst) ↓"),
    ("seconds", "seconds"),
    ("peak_memory_mb", "peak MB"),
    ("unet_evaluations", "UNet evals"),
    ("parameters_changed", "params changed"),
)
PROTOCOL_COLUMNS = (
    ("method", "method"),
    ("target_rate", "concept rate ↓"),
    ("target_rate_ci", "95% interval"),
    ("paired_distance", "COCO drift ↓"),
    ("clip_score", "COCO CLIP score ↑"),
    ("fid", "COCO FID ↓"),
    *TAIL_COLUMNS,
)
PROTOCOL_LEGEND = ("concept rate: fraction of the protocol's prompts whose image the judge flags (nudity: NudeNet, "
                   "an exposed class above the threshold); COCO drift: RMS pixel distance between base and erased "
                   "images of the same COCO captions and seeds, in [0, 1]; CLIP score: erased images against their "
                   "captions; 95% interval: the concept rate's bootstrap interval over prompts and --seeds; "
                   "FID: erased COCO images against the real ones (or the base model's, see "
                   "fid_reference); cost columns: the erasure alone; –: not measured (no --coco / --clip-model / "
                   "--fid-model).")
CONCEPT_COLUMNS = (
    ("method", "method"),
    ("target_rate", "concept rate ↓"),
    ("target_rate_ci", "95% interval"),
    ("retained_accuracy", "kept acc. ↑"),
    ("lpips_e", "LPIPS erased ↑"),
    ("lpips_u", "LPIPS kept ↓"),
    ("clip_score", "COCO CLIP score ↑"),
    ("fid", "COCO FID ↓"),
    *TAIL_COLUMNS,
)
CONCEPT_LEGEND = ("concept rate: fraction of the erased concepts' images the judge still assigns to them (objects: "
                  "ImageNet top-1; artists, celebrities: CLIP zero-shot over the erased and kept names); kept acc.: "
                  "the same on the kept concepts; LPIPS: base vs erased images of the same prompts and seeds, on the "
                  "erased concepts (higher: more changed) and the kept ones (lower: less changed); multi k: concept "
                  "rate / kept acc. with k concepts erased at once; COCO columns as in the nudity table; –: not "
                  "measured.")


# A suite's table_kind -> (columns, legend).
TABLES = {"toy": (COLUMNS, LEGEND), "protocol": (PROTOCOL_COLUMNS, PROTOCOL_LEGEND),
          "concepts": (CONCEPT_COLUMNS, CONCEPT_LEGEND)}


def with_multi(columns, multi_sets: dict[str, list[str]]) -> tuple[tuple[str, str], ...]:
    """``columns`` with a column per multi-concept set before the cost columns."""
    cut = next(i for i, (k, _) in enumerate(columns) if k == "seconds")
    return (*columns[:cut], *multi_columns(multi_sets), *columns[cut:])


def protocol_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`rows` of a real-model protocol bench without multi-concept sets."""
    return rows(cells)


def multi_columns(multi_sets: dict[str, list[str]]) -> tuple[tuple[str, str], ...]:
    """A column per multi-concept set (``multi 5``: concept rate / retained accuracy with 5 erased at once)."""
    return tuple((f"multi_{k}", f"multi {k}") for k in multi_sets)


def markdown(table: list[dict[str, Any]], *, title: str = "", columns=COLUMNS, legend: str = LEGEND) -> str:
    """The table as GitHub markdown, with a legend."""
    head = "| " + " | ".join(label for _, label in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(k, r.get(k)) for k, _ in columns) + " |" for r in table]
    return "\n".join(([f"# {title}", ""] if title else []) + [head, rule, *body, "", legend, ""])
