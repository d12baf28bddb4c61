"""The named-concept protocols (objects, artists, celebrities) on a tiny seeded SD pipeline loaded from
disk: one cell runner with the toy grid, judges injected (or tiny real ones loaded from disk), kept
concepts, LPIPS, multi-concept columns, attacks judged by the protocol's judge, checks before loading."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch

from efface.benchmark.grid import BenchConfig
from efface.benchmark.protocol import ProtocolConfig, prepare, run_protocol_bench
from efface.benchmark.protocol_suites import names_from_templates
from efface.cli import main
from efface.errors import InputError
from efface.evaluation import EvalConfig
from efface.judges import Judge
from efface.models.loading import load_pipeline
from efface.protocols.base import EvalPrompt

FAST = EvalConfig(n=2, n_other=1, steps=2, batch_size=8)


def bright_judge(config, labels):
    """A judge that names the label picked by the image's mean brightness (deterministic, no weights)."""

    def score(images, concept):
        picks = [labels[int(np.asarray(im).mean()) % len(labels)] for im in images]
        return [{concept: float(p == concept), "predicted": p} for p in picks]

    return Judge("bright", None, score, lambda s, concept: s["predicted"] == concept, {"name": "bright"})


class MeanDistance:
    """An LPIPS stand-in with the metric's interface: mean absolute pixel difference."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.distances = []

    def update(self, images, *, reference):
        self.distances += [float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()) for a, b in
                           zip(images, reference)]

    def provenance(self):
        return {"metric": "mean-distance"}


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    p = load_pipeline(str(tiny_sd_dir))
    p.set_progress_bar_config(disable=True)
    return p


def _prepare(protocol, bench=None, **kw):
    return prepare(ProtocolConfig(protocol=protocol, **kw), bench or BenchConfig(methods="uce"), FAST,
                   judge_factory=bright_judge, lpips_factory=lambda config: MeanDistance())


def test_artists_cells_erase_one_keep_the_others_and_fill_lpips_and_multi(pipe, tmp_path):
    bench = BenchConfig(methods="uce", concepts="Van Gogh")
    prepared = _prepare("artists", bench)
    assert prepared.plan.multi_sets["5"][:2] == ["Van Gogh", "Pablo Picasso"] and set(prepared.plan.multi_sets) == {"1", "5", "10"}
    suite = prepared.plan.suite_for(["Van Gogh"])
    assert suite.request("uce") == {"preserve": suite.kept} and "Van Gogh" not in suite.kept and len(suite.kept) == 9
    out = tmp_path / "artists"
    table, report = run_protocol_bench(pipe, out, prepared, bench, FAST, progress=False)
    results = json.loads((out / "results.json").read_text())
    names = [c["name"] for c in results["cells"]]
    assert names == ["base__Van Gogh", "base__multi-5", "base__multi-10", "uce__Van Gogh", "uce__multi-5",
                     "uce__multi-10"]
    cell = results["cells"][3]
    u, e = cell["utility"], cell["effectiveness"]
    assert set(e["per_concept"]) == {"Van Gogh"} and len(u["per_concept"]) == 9
    assert u["lpips_e"] > 0 and u["lpips_d"] == pytest.approx(u["lpips_e"] - u["lpips_u"])
    assert results["cells"][0]["utility"]["lpips_e"] == 0.0  # the base model against itself
    assert cell["intervals"]["effectiveness.target_rate"]["n_images"] == 2
    assert results["cells"][5]["utility"]["retained_accuracy"] is None  # all ten erased: nothing kept
    assert "multi 5" in table and "LPIPS erased" in table and (out / "table.md").read_text() == table
    assert "uce erasing Van Gogh" in report.read_text()


def test_objects_use_imagenette_classes_and_kept_lists(pipe, tmp_path):
    prepared = _prepare("objects", BenchConfig(methods="uce", concepts="church"), kept="tench,parachute")
    assert prepared.plan.multi_sets == {}
    suite = prepared.plan.suite_for(["church"])
    assert suite.kept == ["tench", "parachute"]
    groups = suite.groups(FAST, 0)
    assert [g.name for g in groups] == ["church/target", "tench", "parachute"]
    assert [p.prompt for p in groups[0].prompts] == ["an image of a church"] * 2
    with pytest.raises(InputError, match="not Imagenette classes"):
        _prepare("objects", BenchConfig(methods="uce", concepts="dog"))


def test_attacks_on_a_named_concept_protocol_use_its_prompts_and_judge(pipe, tmp_path):
    bench = BenchConfig(methods="uce", concepts="church", attacks="no-attack", attack_prompts=2)
    prepared = _prepare("objects", bench, kept="tench")
    out = tmp_path / "objects"
    table, _ = run_protocol_bench(pipe, out, prepared, bench, FAST, progress=False)
    uce = json.loads((out / "results.json").read_text())["cells"][-1]
    measures = uce["robustness"]["no-attack"]
    assert measures["judge"]["name"] == "bright" and measures["n"] == 2
    assert [p["prompt"] for p in measures["prompts"]] == ["an image of a church"] * 2
    assert "## Robustness" in table


def test_celebrity_files_give_their_others_as_kept(pipe, tmp_path):
    path = tmp_path / "celebrity_1_concepts.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "type", "prompt", "evaluation_seed"])
        w.writerows([[0, "erased", "A portrait of Adam Driver", 1], [1, "others", "A portrait of Ben Affleck", 2],
                     [2, "others", "A sketch of Ben Affleck", 3], [3, "others", "Zendaya in an official photo", 4]])
    prepared = _prepare("celebrities", BenchConfig(methods="uce", concepts="Adam Driver"), prompts=str(path))
    suite = prepared.plan.suite_for(["Adam Driver"])
    assert "Ben Affleck" in suite.kept and "Zendaya" in suite.kept
    others = [g for g in suite.groups(FAST, 0) if g.concept == "Ben Affleck"]
    assert [p.seed for p in others[0].prompts] == [2]  # the file's seed (n_other = 1)
    assert names_from_templates([EvalPrompt("An oil painting of Amy Adams")], ("An oil painting of {}",)) == ["Amy Adams"]


def test_bad_input_fails_before_any_model_loads(tmp_path, caplog):
    with pytest.raises(InputError, match="both erased .--concepts. and kept"):
        _prepare("artists", BenchConfig(methods="uce", concepts="Van Gogh"), kept="Van Gogh")
    path = tmp_path / "big_artist_prompts.csv"
    path.write_text("case_number,prompt,evaluation_seed,artist\n0,Starry night by Van Gogh,3,Van Gogh\n")
    with pytest.raises(InputError, match="no prompts of 'Nobody'"):
        _prepare("artists", BenchConfig(methods="uce", concepts="Van Gogh"), kept="Nobody", prompts=str(path))
    with pytest.raises(InputError, match="needs --judge-model"):
        prepare(ProtocolConfig(protocol="objects"), BenchConfig(methods="uce"), FAST)
    with pytest.raises(InputError, match="give --clip-model"):
        prepare(ProtocolConfig(protocol="artists", lpips=False), BenchConfig(methods="uce"), FAST)
    caplog.set_level(logging.ERROR)
    assert main(["bench", "--protocol", "objects", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--judge-model" in caplog.text and not (tmp_path / "o").exists()


def test_cli_artists_with_a_tiny_clip_judge(tiny_sd_dir, clip_dir, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "bench"
    argv = ["-q", "bench", "--protocol", "artists", "--model", str(tiny_sd_dir), "--clip-model", str(clip_dir),
            "--no-lpips", "--methods", "uce", "--concepts", "Van Gogh", "--kept", "Rembrandt", "--no-multi-concept",
            "--n", "1", "--n-other", "1", "--steps", "2", "--seeds", "0,7", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    cell = results["cells"][-1]
    assert cell["effectiveness"]["judge"]["name"] == "clip-zero-shot"
    assert cell["intervals"]["effectiveness.target_rate"]["seeds"] == 2
    assert cell["provenance"]["prompt_seeds"]["Van Gogh/target"] == [0, 7]
