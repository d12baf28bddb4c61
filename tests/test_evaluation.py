"""`efface.evaluation.evaluate` and `efface eval` on the shipped toy-sd (small, fast settings)."""

from __future__ import annotations

import json

import pytest

from efface.cli import main
from efface.errors import InputError
from efface.evaluation import EvalConfig, check_concepts, evaluate
from efface.suites.toy import named as _named
from efface.toy.presets import method_preset

FAST = EvalConfig(n=4, n_other=2, steps=8, kid_subsets=3)


@pytest.fixture(scope="module")
def base_result(toy):
    return evaluate(toy, None, "circle", config=FAST, seed=0)


def test_eval_json_has_the_contract_keys(base_result):
    r = base_result
    assert set(r) == {"effectiveness", "utility", "robustness", "cost", "intervals", "provenance"}
    assert {"target_rate", "synonym_rate", "heldout_rate"} <= set(r["effectiveness"])
    assert {"retained_accuracy", "frechet_distance"} <= set(r["utility"])
    assert {"seconds", "peak_memory_mb", "unet_evaluations"} <= set(r["cost"])
    for key in ("target_rate", "synonym_rate", "heldout_rate"):
        assert 0.0 <= r["effectiveness"][key] <= 1.0
    assert 0.0 <= r["utility"]["retained_accuracy"] <= 1.0
    assert set(r["utility"]["per_concept"]) == {"square", "triangle", "star", "cross", "heart"}
    assert len(r["utility"]["nearest"]) == 2
    p = r["provenance"]
    assert p["evaluator"]["name"] == "toy-classifier" and len(p["evaluator"]["weights_sha256"]) == 64
    assert p["prompts"]["circle/target"] and all("circle" in q for q in p["prompts"]["circle/target"])
    assert all("disc" in q for q in p["prompts"]["circle/synonyms"])
    json.dumps(r)  # plain JSON


def test_base_model_has_no_drift_and_no_cost(base_result):
    u, c = base_result["utility"], base_result["cost"]
    assert u["paired_distance"] == 0.0 and u["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert c["seconds"] == 0.0 and c["unet_evaluations"] == 0 and c["parameters_changed"] == 0


def test_same_seed_same_result(toy, base_result):
    again = evaluate(toy, None, "circle", config=FAST, seed=0)
    for key in ("effectiveness", "utility", "provenance"):
        assert again[key] == base_result[key]


def test_erased_model_drifts_and_reports_its_cost(toy, base_result):
    from efface.methods import erase

    erased = erase(toy, "uce", ["circle"], preserve=["square"], preset=method_preset("uce"), progress=False)
    before = {k: v.clone() for k, v in toy.unet.state_dict().items()}
    r = evaluate(toy, erased, "circle", config=FAST, seed=0)
    assert all((v == toy.unet.state_dict()[k]).all() for k, v in before.items())  # pipe left as it was
    assert r["utility"]["paired_distance"] > 0 and r["cost"]["parameters_changed"] > 0
    assert r["provenance"]["erased"]["method"] == "uce"
    assert r["effectiveness"]["target_rate"] <= base_result["effectiveness"]["target_rate"]


def test_several_concepts_are_averaged(toy):
    r = evaluate(toy, None, ["circle", "red"], config=EvalConfig(n=2, n_other=1, steps=4, kid_subsets=2), seed=1)
    assert set(r["effectiveness"]["per_concept"]) == {"circle", "red"}
    assert "circle" not in r["utility"]["per_concept"] and "blue" in r["utility"]["per_concept"]


def test_named_reads_the_concept_a_prompt_names():
    assert _named("a red circle on a striped background", "colour") == "red"
    assert _named("a drawing of a lime ring over a polka dot pattern", "style") == "dotted"
    assert _named("a love heart", "colour") is None


@pytest.mark.parametrize("bad", [[], ["dog"], ["circle", "circle"]])
def test_bad_concepts_are_refused(bad):
    with pytest.raises(InputError):
        check_concepts(bad)


def test_cli_eval_writes_eval_json(tmp_path):
    out = tmp_path / "eval.json"
    assert main(["-q", "eval", "--model", "toy", "--concept", "circle", "--n", "2", "--n-other", "1",
                 "--steps", "4", "--kid-subsets", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["effectiveness"]["target_rate"] is not None and r["robustness"] == {}
    assert main(["-q", "eval", "--concept", "circle", "--out", str(out)]) == 2  # exists: refused


def test_cli_eval_refuses_unknown_concept_before_loading(tmp_path, caplog):
    assert main(["eval", "--model", str(tmp_path / "missing"), "--concept", "dog", "--out", str(tmp_path / "e.json")]) == 2
    assert "choose from" in caplog.text
