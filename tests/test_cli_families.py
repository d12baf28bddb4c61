"""`efface erase` and `efface generate --erased` from the command line on every family's saved tiny
pipeline (tests/families.py), loaded through the real loaders; a family a method does not support
is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from efface.cli import main

# fast options per method for the tiny pipelines
FAST = {
    "uce": [],
    "esd-x": ["--set", "iterations=2", "--set", "ddim_steps=3", "--set", "lr=1e-2"],
}


@pytest.mark.parametrize("family", ["sd2-v", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("method", list(FAST))
def test_erase_then_generate_erased_on_every_family(family, method, family_dirs, tmp_path):
    model = family_dirs(family)
    before = {p: p.read_bytes() for p in model.rglob("*.safetensors")}
    out = tmp_path / "erased"
    assert main(["-q", "erase", "--model", str(model), "--method", method, "--concept", "circle",
                 "--preserve", "square", "--seed", "0", *FAST[method], "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["family"] == {"sd2-v": "sd"}.get(family, family)
    tensors = load_file(out / "weights.safetensors")
    assert tensors and all(torch.isfinite(v).all() for v in tensors.values())
    assert before == {p: p.read_bytes() for p in model.rglob("*.safetensors")}  # the base on disk is untouched

    common = ["--prompt", "a red circle", "--num-images", "1", "--steps", "2", "--seed", "1"]
    assert main(["-q", "generate", "--model", str(model), "--erased", str(out), *common, "--out", str(tmp_path / "g")]) == 0
    assert main(["-q", "generate", "--model", str(model), *common, "--out", str(tmp_path / "g0")]) == 0
    assert (tmp_path / "g" / "000.png").read_bytes() != (tmp_path / "g0" / "000.png").read_bytes()


def test_a_family_the_method_does_not_support_is_refused_before_work(family_dirs, tmp_path, caplog):
    code = main(["erase", "--model", str(family_dirs("sd3")), "--method", "mace", "--concept", "circle",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "supports flux, sd" in caplog.text and "not sd3" in caplog.text
    assert not (tmp_path / "o").exists()


def test_save_component_the_model_lacks_is_refused_before_work(family_dirs, tmp_path, caplog):
    code = main(["erase", "--model", str(family_dirs("flux")), "--method", "uce", "--concept", "circle",
                 "--save-component", "unet", "--out", str(tmp_path / "o")])
    assert code == 2 and "this model has transformer, text_encoder, text_encoder_2" in caplog.text
    assert not (tmp_path / "o").exists()
