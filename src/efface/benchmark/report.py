"""``report.html``: the table, base-vs-erased image grids and plots, in one self-contained file.

Images are embedded as base64 PNGs and plots are inline SVG drawn here, so the file opens from disk
in any browser with no server, no script and nothing fetched.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from efface.benchmark.table import (COLUMNS, fmt, model_columns, robustness_columns, robustness_rows,
                                    robustness_union)
from efface.io import atomic_file

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}
figcaption{font-size:13px;color:#555}img.grid{image-rendering:pixelated;width:100%;max-width:1024px}
.plots{display:flex;flex-wrap:wrap;gap:24px}"""


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _axes(w: int, h: int, m: int, xlabel: str, ylabel: str, xticks: list[tuple[float, str]],
          yticks: list[tuple[float, str]]) -> list[str]:
    out = [f'<line x1="{m}" y1="{h - m}" x2="{w - 10}" y2="{h - m}" stroke="#333"/>',
           f'<line x1="{m}" y1="10" x2="{m}" y2="{h - m}" stroke="#333"/>',
           f'<text x="{(w + m) / 2}" y="{h - 8}" text-anchor="middle" font-size="12">{html.escape(xlabel)}</text>',
           f'<text x="14" y="{(h - m) / 2}" text-anchor="middle" font-size="12" '
           f'transform="rotate(-90 14 {(h - m) / 2})">{html.escape(ylabel)}</text>']
    out += [f'<text x="{x}" y="{h - m + 16}" text-anchor="middle" font-size="11">{t}</text>' for x, t in xticks]
    out += [f'<text x="{m - 6}" y="{y + 4}" text-anchor="end" font-size="11">{t}</text>' for y, t in yticks]
    return out


def scatter_svg(points: list[tuple[str, float, float]], xlabel: str, ylabel: str, w: int = 420, h: int = 320) -> str:
    """Labelled points with both axes in [0, 1]."""
    m = 50
    sx = lambda v: m + v * (w - m - 80)  # noqa: E731  (room on the right for labels)
    sy = lambda v: h - m - v * (h - m - 30)  # noqa: E731
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
    parts = _axes(w, h, m, xlabel, ylabel, [(sx(t), f"{t:g}") for t in ticks], [(sy(t), f"{t:g}") for t in ticks])
    for i, (label, x, y) in enumerate(points):
        c = PALETTE[i % len(PALETTE)]
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{c}"><title>{html.escape(label)}: '
                     f'{x:.3f}, {y:.3f}</title></circle>')
        parts.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 6:.1f}" font-size="11" fill="{c}">{html.escape(label)}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">{"".join(parts)}</svg>'


def lines_svg(series: dict[str, list[float | None]], xs: list[str], xlabel: str, ylabel: str,
              w: int = 420, h: int = 320) -> str:
    """One polyline per series over categorical ``xs``, y in [0, 1]."""
    m = 50
    step = (w - m - 40) / max(1, len(xs) - 1)
    sx = lambda i: m + 20 + i * step  # noqa: E731
    sy = lambda v: h - m - v * (h - m - 20)  # noqa: E731
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
    parts = _axes(w, h, m, xlabel, ylabel, [(sx(i), x) for i, x in enumerate(xs)], [(sy(t), f"{t:g}") for t in ticks])
    for i, (label, ys) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        pts = [(sx(j), sy(y)) for j, y in enumerate(ys) if y is not None]
        if len(pts) > 1:
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                         + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"/>' for x, y in pts]
        parts.append(f'<text x="{w - 110}" y="{24 + 14 * i}" font-size="11" fill="{c}">{html.escape(label)}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">{"".join(parts)}</svg>'


def _table_html(table: list[dict[str, Any]], columns=COLUMNS) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(k, r.get(k)))}</td>" for k, _ in columns) + "</tr>"
                   for r in table)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _robustness_html(cells: list[dict[str, Any]]) -> str:
    attacks, table = robustness_rows(cells)
    if not attacks:
        return ""
    return f"<h2>Robustness</h2>{_table_html(table, robustness_columns(attacks))}"


def _grids(out: Path, cells: list[dict[str, Any]], h: str = "h3") -> str:
    """Base vs erased sample grids (same prompts, same seeds) for every single-concept cell."""
    parts = []
    for cell in cells:
        if cell["method"] == "base" or "__multi-" in cell["name"]:
            continue
        concept = cell["concepts"][0]
        d = out / "images" / cell["name"]
        base = out / "images" / f"base__{concept}"
        rows = [(f"base: {concept} prompts", base / f"evaluated__{concept}_target.png"),
                (f"{cell['method']}: {concept} prompts", d / f"evaluated__{concept}_target.png")]
        kept = sorted(p for p in d.glob("evaluated__*.png") if "_target" not in p.name and "_synonyms" not in p.name
                      and "_heldout" not in p.name)[:1]
        for p in kept:
            other = p.name.removeprefix("evaluated__").removesuffix(".png")
            rows += [(f"base: {other} prompts", d / f"base__{other}.png"), (f"{cell['method']}: {other} prompts", p)]
        imgs = "".join(f'<figure><img class="grid" alt="{html.escape(t)}" src="{_png(p)}"><figcaption>{html.escape(t)}'
                       f"</figcaption></figure>" for t, p in rows if p.exists())
        parts.append(f"<{h}>{html.escape(cell['method'])} erasing {html.escape(concept)}</{h}>{imgs}")
    return "".join(parts)


def _plots(table: list[dict[str, Any]], multi_sets: dict[str, list[str]]) -> list[str]:
    plots = []
    for key, label in (("retained_accuracy", "retained accuracy (utility)"), ("paired_distance", "drift (utility, ↓)")):
        points = [(r["method"], r[key], 1 - r["target_rate"]) for r in table
                  if r.get(key) is not None and r["target_rate"] is not None]
        if points:
            plots.append(scatter_svg(points, label, "1 - concept rate (effectiveness)"))
            break
    if multi_sets:
        xs = [f"{k} ({len(v)})" if k == "all" else k for k, v in multi_sets.items()]
        keys = [f"multi_{k}" for k in multi_sets]
        rate = {r["method"]: [r[k][0] if r[k] else None for k in keys] for r in table}
        kept = {r["method"]: [r[k][1] if r[k] else None for k in keys] for r in table}
        plots += [lines_svg(rate, xs, "concepts erased at once", "concept rate"),
                  lines_svg(kept, xs, "concepts erased at once", "retained accuracy")]
    return plots


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _details(out: Path, table, cells, multi_sets, h: str = "h2") -> str:
    """Plots and image grids of one grid."""
    return (f"<{h}>Plots</{h}><div class=\"plots\">{''.join(_plots(table, multi_sets))}</div>"
            f"<{h}>Images: base vs erased, same prompts and seeds</{h}>{_grids(out, cells, f'h{int(h[1]) + 1}')}")


def _write(path: Path, doc: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return path


def write_report(out: str | Path, table: list[dict[str, Any]], cells: list[dict[str, Any]],
                 multi_sets: dict[str, list[str]], *, title: str = "efface benchmark", columns=COLUMNS) -> Path:
    """Write ``out/report.html`` atomically and return its path (``columns``: the table's)."""
    out = Path(out)
    body = f"<h2>Comparison</h2>{_table_html(table, columns)}{_robustness_html(cells)}{_details(out, table, cells, multi_sets)}"
    return _write(out / "report.html", _page(title, body))


def write_models_report(out: str | Path, combined: list[dict[str, Any]], robust, sections, *,
                        title: str = "efface benchmark") -> Path:
    """``out/report.html`` of a several-model bench (:mod:`efface.benchmark.models`): every model's rows in
    one table with a model column, the robustness table likewise, then each model's plots and images.
    ``robust``: per model, (attacks, per-attack rows with ``model``); ``sections``: per model, (label,
    its output folder, table, cells, multi_sets)."""
    out = Path(out)
    attacks, rtable = robustness_union(robust)
    body = f"<h2>Comparison</h2>{_table_html(combined, model_columns(COLUMNS))}"
    if attacks:
        body += f"<h2>Robustness</h2>{_table_html(rtable, model_columns(robustness_columns(attacks)))}"
    for label, sub, table, cells, multi_sets in sections:
        body += f"<h2>{html.escape(label)}</h2>{_details(Path(sub), table, cells, multi_sets, h='h3')}"
    return _write(out / "report.html", _page(title, body))
