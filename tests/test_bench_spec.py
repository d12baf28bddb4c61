"""efface bench --spec FILE: the repository's example spec runs, records itself in results.json and
reuses its cells when run again; the command line wins over the file; every wrong key is refused
before any model loads, the valid ones listed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from efface.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "bench-toy.toml"


def test_the_example_spec_runs_records_itself_and_reuses_its_cells(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["-q", "bench", "--spec", str(EXAMPLE), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    spec = results["spec"]
    assert spec["file"] == str(EXAMPLE) and len(spec["sha256"]) == 64
    assert results["config"]["methods"] == "uce,rece" and results["config"]["multi_concept"] is False
    assert results["eval_config"]["n"] == 8 and results["options"] == {"uce": {"lamb": 0.5, "preserve_scale": 1.0},
                                                                       "rece": {"epochs": 1}}
    uce = next(c for c in results["cells"] if c["name"] == "uce__circle")
    assert "robustness" in uce and (out / "table.md").exists()
    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert main(["-q", "bench", "--spec", str(EXAMPLE), "--out", str(out)]) == 0  # every cell reused
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == cells


@pytest.mark.parametrize("text, message", [
    ("methds = ['uce']\n", r"unknown key 'methds'; valid keys: .*methods"),
    ("n = 'many'\n", r"n: expected int"),
    ("[options.uce]\nlamda = 1\n", r"uce has no option 'lamda'; valid options: .*lamb"),
    ("[options.nope]\nx = 1\n", r"valid methods"),
    ("n = \n", r"not valid TOML"),
])
def test_a_wrong_spec_is_refused_before_any_model_loads(tmp_path, caplog, text, message):
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    assert main(["bench", "--spec", str(spec), "--model", str(tmp_path / "no-such-model"), "--out",
                 str(tmp_path / "o")]) == 2
    assert re.search(message, caplog.text), caplog.text
    assert not (tmp_path / "o").exists()


def test_the_command_line_wins_over_the_spec(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text("methods = ['uce']\nconcepts = 'circle'\nmulti_concept = false\nn = 8\nn_other = 2\nsteps = 4\n")
    out = tmp_path / "o"
    assert main(["-q", "bench", "--spec", str(spec), "--n", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["methods"] == "uce" and results["eval_config"]["n"] == 4  # the flag, not the file's 8
    assert results["eval_config"]["steps"] == 4 and results["spec"]["values"]["n"] == 8
