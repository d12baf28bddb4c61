"""The toy world sits at the edge: methods, attacks and metrics import nothing from it; its presets
and inputs are handed in (efface.toy.presets), the same way from Python and from the command line."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import efface.attacks  # noqa: F401  (registers the attacks)
import efface.methods  # noqa: F401  (registers the methods)
from efface.cli import main
from efface.config import Preset
from efface.errors import InputError
from efface.methods import erase
from efface.registry import ATTACKS, METHODS
from efface.toy import TOY_FLUX, TOY_SD
from efface.toy.presets import (ATTACK_PRESETS, METHOD_PRESETS, attack_inputs, attack_preset, attack_setup,
                                method_inputs, method_preset, method_setup, toy_model)

SRC = Path(__file__).resolve().parents[1] / "src" / "efface"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("layer", ["methods", "attacks", "metrics"])
def test_methods_attacks_and_metrics_import_nothing_from_the_toy_world(layer):
    offenders = {str(f.relative_to(SRC)): sorted(m for m in _imports(f) if m == "efface.toy" or m.startswith("efface.toy."))
                 for f in (SRC / layer).rglob("*.py")}
    assert not {f: m for f, m in offenders.items() if m}


def test_every_toy_preset_names_a_registered_owner_and_its_options():
    for table, registry, inputs in ((METHOD_PRESETS, METHODS, method_inputs), (ATTACK_PRESETS, ATTACKS, attack_inputs)):
        for name, options in table["toy-sd"].items():
            cls = registry.get(name)  # unknown name: an error listing the valid ones
            instance = cls(preset=Preset("toy", options), **inputs(name))
            assert instance.preset == "toy"
            assert all(getattr(instance.config, k) == v for k, v in options.items())
    assert all(not cls.Config.PRESETS for _, cls in [*METHODS.items(), *ATTACKS.items()])


def test_a_method_without_a_toy_entry_gets_the_papers_defaults():
    assert method_preset("no-such-entry") == Preset("toy", {})
    assert attack_preset("no-attack").options == {}


def test_toy_models_are_named_by_reference_or_by_their_loaded_weights(tiny_sd_dir):
    assert toy_model("toy") == toy_model("toy-sd") == toy_model(str(TOY_SD)) == "toy-sd"
    assert toy_model(str(tiny_sd_dir)) is None and toy_model("org/model") is None

    class Pipe:
        efface_source = str(TOY_SD.resolve())

    assert toy_model(Pipe()) == "toy-sd" and toy_model(object()) is None
    assert toy_model("toy-flux") == "toy-flux"

    class FluxPipe:
        efface_source = str(TOY_FLUX.resolve())

    assert toy_model(FluxPipe()) == "toy-flux" and method_preset("uce", "toy-flux").name == "toy"


def test_loading_toy_flux_without_its_weights_says_how_to_make_them(monkeypatch, tmp_path):
    import efface.toy

    from efface.errors import ModelLoadError
    from efface.models.loading import load_pipeline

    monkeypatch.setitem(efface.toy.TOY_MODELS, "toy-flux", tmp_path / "toy-flux")
    with pytest.raises(ModelLoadError, match="efface toy train --model toy-flux"):
        load_pipeline("toy-flux")


def test_setup_picks_toy_on_toy_models_and_refuses_it_elsewhere(tiny_sd_dir):
    assert method_setup("uce", "toy") == (method_preset("uce"), {})
    assert method_setup("uce", "toy", "paper") == ("paper", {})
    assert method_setup("uce", str(tiny_sd_dir)) == ("paper", {})
    preset, inputs = method_setup("mace", "toy")
    assert preset.options["data"] == "source" and callable(inputs["image_source"])
    assert attack_setup("synonyms", "toy")[1]["synonym_source"]("circle") == ("disc", "ring", "round shape")
    assert attack_setup("synonyms", str(tiny_sd_dir)) == ("paper", {})
    with pytest.raises(InputError, match="toy-sd .*is not a toy model"):
        method_setup("uce", str(tiny_sd_dir), "toy")
    with pytest.raises(InputError, match="is not a toy model"):
        attack_preset("p4d-n", str(tiny_sd_dir))


def test_the_name_toy_is_not_a_preset_of_the_python_api():
    with pytest.raises(InputError, match=r"method_preset\('uce'\)"):
        METHODS.get("uce")(preset="toy")
    with pytest.raises(InputError, match=r"attack_preset\('p4d-n'\)"):
        ATTACKS.get("p4d-n")(preset="toy")
    with pytest.raises(InputError, match="valid presets: paper"):
        METHODS.get("uce")(preset="fast")


def test_a_preset_with_an_unknown_option_is_refused_with_the_valid_ones():
    with pytest.raises(InputError, match="no option bogus .preset 'mine'.; valid options: .*lamb"):
        METHODS.get("uce")(preset=Preset("mine", {"bogus": 1}))
    method = METHODS.get("uce")(preset=Preset("mine", {"lamb": 0.1}), lamb=0.2)  # the caller's options win
    assert method.preset == "mine" and method.config.lamb == 0.2


def test_synonyms_take_their_words_from_the_option_or_the_injected_source():
    from efface.attacks.base import AttackContext

    def context():
        return AttackContext(None, "circle", ["a circle"], [0], None, None, torch.Generator(), None, False)

    attack, ctx = ATTACKS.get("synonyms")(**attack_inputs("synonyms")), context()
    attack._prepare(ctx)
    assert ctx.state["words"] == ("disc", "ring", "round shape")
    attack, ctx = ATTACKS.get("synonyms")(synonyms=("orb",), **attack_inputs("synonyms")), context()
    attack._prepare(ctx)
    assert ctx.state["words"] == ("orb",)
    with pytest.raises(InputError, match="no words for 'circle'"):
        ATTACKS.get("synonyms")()._prepare(context())


@pytest.mark.parametrize("method, options", [
    ("uce", []),
    ("mace", ["iterations=1", "num_images=2", "batch_size=1"]),  # the toy preset's drawn images, handed in
])
def test_python_and_the_command_line_give_the_same_toy_erasure(method, options, toy, tmp_path):
    from efface.artifacts import ErasedModel

    out = tmp_path / method
    argv = ["-q", "erase", "--model", "toy", "--method", method, "--concept", "circle", "--preserve", "square",
            "--out", str(out)]
    assert main([*argv, *[a for o in options for a in ("--set", o)]]) == 0
    overrides = {k: int(v) for k, v in (o.split("=") for o in options)}
    erased = erase(toy, method, ["circle"], preserve=["square"], preset=method_preset(method),
                   progress=False, **method_inputs(method), **overrides)
    saved = ErasedModel.load(out)
    assert saved.manifest["preset"] == erased.manifest["preset"] == "toy"
    assert saved.manifest["config"] == erased.manifest["config"]
    assert saved.tensors.keys() == erased.tensors.keys()
    assert all(torch.equal(saved.tensors[k], erased.tensors[k]) for k in erased.tensors)
    assert json.loads((out / "manifest.json").read_text())["config"]["templates"][1] == "a {}"


def test_list_metrics_needs_no_classifier(capsys):
    assert main(["list", "metrics"]) == 0
    out = capsys.readouterr().out
    assert "concept-rate" in out and "image-drift" in out


@pytest.mark.parametrize("argv", [
    ["bench", "--protocol", "nudity", "--methods", "uce", "--preset", "toy"],
    ["attack", "--attack", "p4d-n", "--concept", "circle", "--prompt", "a circle", "--preset", "toy"],
])
def test_the_command_line_refuses_the_toy_preset_on_other_models_before_loading(argv, tiny_sd_dir, tmp_path, caplog):
    assert main([*argv, "--model", str(tiny_sd_dir), "--out", str(tmp_path / "o")]) == 2
    assert "is not a toy model" in caplog.text and not (tmp_path / "o").exists()
