"""`efface bench` / `efface demo`: the grid is cached and resumes, the table and the report are written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from efface.benchmark.grid import BenchConfig, request_for, run_bench
from efface.benchmark.report import lines_svg, scatter_svg, write_report
from efface.benchmark.table import markdown, rows
from efface.cli import main
from efface.errors import InputError
from efface.evaluation import EvalConfig

TINY = EvalConfig(n=2, n_other=1, steps=4, kid_subsets=2)


@pytest.fixture(scope="module")
def bench_dir(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(methods="uce,rece", concepts="circle,red", multi_concept=True)
    run_bench(toy, out, config, TINY, seed=0, progress=False)
    return out, config


def test_request_preserves_the_axis_and_names_an_anchor_for_ca():
    assert request_for("uce", ["circle"]) == {"preserve": ["square", "triangle", "star", "cross", "heart"],
                                              "anchor": None}
    assert request_for("ca", ["circle", "square"])["anchor"] == ["triangle", "triangle"]
    assert request_for("ca", ["red", "green", "blue", "yellow", "purple"])["anchor"] == [""] * 5


def test_grid_writes_every_cell_and_results(bench_dir):
    out, _ = bench_dir
    names = {p.stem for p in (out / "cells").glob("*.json")}
    assert {"base__circle", "base__red", "uce__circle", "rece__red", "uce__multi-3", "rece__multi-all",
            "base__multi-all"} <= names
    results = json.loads((out / "results.json").read_text())
    assert results["multi_sets"]["all"] == ["circle", "square", "triangle", "star", "cross", "heart"]
    assert all(0 <= c["effectiveness"]["target_rate"] <= 1 for c in results["cells"])
    assert (out / "images" / "uce__circle" / "evaluated__circle_target.png").exists()


def test_finished_cells_are_not_run_again(toy, bench_dir):
    out, config = bench_dir
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    run_bench(toy, out, config, TINY, seed=0, progress=False)  # everything cached: no cell is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == before


def test_a_changed_setting_invalidates_the_cell(toy, bench_dir, tmp_path):
    out, _ = bench_dir
    config = BenchConfig(methods="uce", concepts="circle", multi_concept=False)
    before = json.loads((out / "cells" / "uce__circle.json").read_text())["key"]
    results = run_bench(toy, out, config, EvalConfig(n=2, n_other=1, steps=5, kid_subsets=2), seed=0, progress=False)
    assert next(c for c in results["cells"] if c["name"] == "uce__circle")["key"] != before


def test_table_has_a_row_per_method_and_the_issue_columns(bench_dir):
    out, _ = bench_dir
    results = json.loads((out / "results.json").read_text())
    table = rows(results["cells"], results["multi_sets"])
    assert [r["method"] for r in table] == ["base", "uce"]  # the last run above: base and uce
    text = markdown(table)
    for column in ("concept rate", "synonyms", "retained acc.", "drift", "attack success", "multi 1", "multi 3",
                   "multi all", "seconds", "peak MB", "UNet evals", "params changed"):
        assert column in text


def test_svg_plots_are_well_formed():
    import xml.etree.ElementTree as ET

    ET.fromstring(scatter_svg([("uce", 0.9, 0.8), ("esd <u>", 0.5, 1.0)], "x", "y"))
    ET.fromstring(lines_svg({"uce": [0.1, None, 0.3]}, ["1", "3", "all (6)"], "k", "rate"))


def test_cli_bench_writes_table_and_self_contained_report(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["-q", "bench", "--model", "toy", "--methods", "uce", "--concepts", "circle", "--no-multi-concept",
                 "--n", "2", "--n-other", "1", "--steps", "4", "--kid-subsets", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| uce |" in printed and str(out / "report.html") in printed
    report = (out / "report.html").read_text()
    assert "<table>" in report and "<svg" in report and "data:image/png;base64," in report
    assert not re.search(r"""(src|href)=["']https?://""", report)  # nothing fetched
    assert (out / "table.md").read_text().startswith("# efface benchmark")


def test_cli_bench_with_attacks_fills_the_robustness_column(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["-q", "bench", "--model", "toy", "--methods", "uce", "--concepts", "circle", "--no-multi-concept",
                 "--n", "2", "--n-other", "1", "--steps", "4", "--kid-subsets", "2", "--attacks",
                 "no-attack,synonyms", "--attack-prompts", "3", "--out", str(out)]) == 0
    cell = json.loads((out / "cells" / "uce__circle.json").read_text())
    assert set(cell["robustness"]) == {"no-attack", "synonyms"}
    robust = cell["robustness"]
    assert robust["no-attack"]["asr"] == robust["no-attack"]["pre_asr"] == robust["synonyms"]["pre_asr"]
    assert robust["synonyms"]["n"] == 3 and robust["synonyms"]["asr"] >= robust["synonyms"]["pre_asr"]
    assert json.loads((out / "cells" / "base__circle.json").read_text())["robustness"] == {}
    table = (out / "table.md").read_text()
    assert "## Robustness" in table and "synonyms ASR" in table
    assert "<h2>Robustness</h2>" in (out / "report.html").read_text()


def test_cli_bench_refuses_unknown_attack_before_loading(tmp_path, caplog):
    assert main(["bench", "--model", str(tmp_path / "missing"), "--attacks", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown attack 'nope'" in caplog.text


def test_cli_bench_refuses_unknown_method_before_loading(tmp_path, caplog):
    assert main(["bench", "--model", str(tmp_path / "missing"), "--methods", "uce,nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in caplog.text


def test_bench_config_refuses_empty_lists():
    with pytest.raises(InputError):
        BenchConfig(methods=" , ").method_list()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM and not os.environ.get("EFFACE_REQUIRE_CHROMIUM"),
    reason="Debian's chromium package is not installed (README, Set-up; CI installs it and requires it)")


def _chromium(page, screenshot):
    """Render ``page`` headless; return Chromium's log (console messages included)."""
    assert CHROMIUM, "EFFACE_REQUIRE_CHROMIUM is set but no chromium is installed: apt-get install -y chromium"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={screenshot.parent / 'profile'}", "--enable-logging=stderr", "--v=0",
                           "--window-size=1280,2400", f"--screenshot={screenshot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def _console_errors(log: str) -> list[str]:
    """Chromium logs every console message (errors, uncaught exceptions, failed loads) as ":CONSOLE";
    the report has no script, so any such line is an error."""
    return [line for line in log.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_report_renders_in_headless_chromium_without_console_errors(toy, bench_dir, tmp_path):
    from PIL import Image

    out, _ = bench_dir
    results = json.loads((out / "results.json").read_text())
    report = write_report(out, rows(results["cells"], results["multi_sets"]), results["cells"], results["multi_sets"])
    shot = tmp_path / "report.png"
    log = _chromium(report, shot)
    assert _console_errors(log) == [], log
    image = Image.open(shot).convert("L")
    assert image.size[0] == 1280 and image.getextrema()[0] < 128  # something dark was drawn: not a blank page
    # the check itself works: a page with a console error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); undefined_function();</script></body></html>")
    assert _console_errors(_chromium(bad, tmp_path / "bad.png"))


def test_toy_sd_gets_the_toy_presets(toy, bench_dir):
    from efface.toy import is_toy

    out, _ = bench_dir
    assert is_toy(toy)
    assert json.loads((out / "results.json").read_text())["preset"] == "toy"


def test_cli_demo_runs_uce_and_esd_and_prints_the_report_path(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--n", "2", "--n-other", "1", "--steps", "4",
                 "--esd-iterations", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| uce |" in printed and "| esd-u |" in printed and f"report: {out / 'report.html'}" in printed
    cell = json.loads((out / "cells" / "esd-u__circle.json").read_text())
    assert cell["provenance"]["erased"]["config"]["iterations"] == 2 and cell["cost"]["unet_evaluations"] > 0


def test_model_list_and_labels():
    from efface.benchmark.models import model_label, model_list

    assert model_list("toy") == ["toy"] and model_list("toy, toy-flux") == ["toy", "toy-flux"]
    assert [model_label(m) for m in ("toy", "toy-sd", "toy-flux", "/x/my-sd/")] == ["toy-sd", "toy-sd", "toy-flux",
                                                                                     "my-sd"]
    for bad in ("toy,", "toy,toy"):
        with pytest.raises(InputError):
            model_list(bad)


def test_cli_bench_over_two_models_writes_one_table_with_a_model_column(tmp_path, capsys):
    out = tmp_path / "b"
    args = ["-q", "bench", "--model", "toy,toy-flux", "--methods", "uce", "--concepts", "circle",
            "--no-multi-concept", "--n", "2", "--n-other", "1", "--steps", "4", "--kid-subsets", "2",
            "--attacks", "no-attack", "--attack-prompts", "2", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| model | method |" in printed
    assert "| toy-sd | uce |" in printed and "| toy-flux | uce |" in printed and "| toy-flux | base |" in printed
    for model in ("toy-sd", "toy-flux"):  # each model's grid is a whole bench of its own
        results = json.loads((out / model / "results.json").read_text())
        assert results["preset"] == "toy" and {c["name"] for c in results["cells"]} == {"base__circle", "uce__circle"}
        assert (out / model / "report.html").exists()
    table = (out / "table.md").read_text()
    assert "## Robustness" in table and "| toy-flux | uce |" in table.split("## Robustness")[1]
    report = (out / "report.html").read_text()
    assert report.count("<h2>toy-flux</h2>") == 1 and "data:image/png;base64," in report
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/cells/*.json")}
    assert main(args) == 0  # a rerun resumes every model's grid from its cached cells
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/cells/*.json")} == before


def test_cli_bench_checks_every_model_before_loading_any(tmp_path, caplog):
    missing = tmp_path / "missing"
    assert main(["bench", "--model", f"toy,{missing}", "--preset", "toy", "--out", str(tmp_path / "o")]) == 2
    assert "not a toy model" in caplog.text and not (tmp_path / "o").exists()
