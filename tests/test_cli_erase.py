"""`efface erase`, `efface generate --erased` and `efface list methods` on a tiny real pipeline."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from efface.cli import main


def test_erase_writes_artifact_and_generate_applies_it(tiny_sd_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in tiny_sd_dir.rglob("*.safetensors")}
    out = tmp_path / "uce-circle"
    assert main(["-q", "erase", "--model", str(tiny_sd_dir), "--method", "uce", "--concept", "circle",
                 "--concept", "star", "--preserve", "square", "--set", "lamb=0.3", "--seed", "0",
                 "--out", str(out), "--save-pipeline", "--save-component", "unet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "uce" and manifest["config"]["lamb"] == 0.3
    assert manifest["request"]["concepts"] == ["circle", "star"]
    assert manifest["request"]["preserve"] == ["square"]
    assert len(manifest["base"]["sha256"]) == 64 and manifest["seed"] == 0
    assert {"efface_version", "seconds", "parameters_changed", "tensors_changed"} <= set(manifest)
    tensors = load_file(out / "weights.safetensors")
    assert all(".attn2.to_" in k for k in tensors)
    # the base model on disk is untouched
    assert before == {p.name: p.read_bytes() for p in tiny_sd_dir.rglob("*.safetensors")}
    # --save-pipeline writes a pipeline plain diffusers loads, with the edit in it
    from diffusers import StableDiffusionPipeline

    full = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    key = next(iter(tensors))
    assert torch.equal(full.unet.get_parameter(key.partition(".")[2]), tensors[key])
    # --save-component writes that model alone (e.g. AdvUnlearn's plug-in text encoder)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    assert torch.equal(unet.get_parameter(key.partition(".")[2]), tensors[key])

    assert main(["-q", "generate", "--model", str(tiny_sd_dir), "--erased", str(out), "--prompt", "a circle",
                 "--num-images", "1", "--steps", "2", "--out", str(tmp_path / "g")]) == 0
    assert main(["-q", "generate", "--model", str(tiny_sd_dir), "--prompt", "a circle",
                 "--num-images", "1", "--steps", "2", "--out", str(tmp_path / "g0")]) == 0
    assert (tmp_path / "g" / "000.png").read_bytes() != (tmp_path / "g0" / "000.png").read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope", "--concept", "circle"], "valid methods"),
    (["--method", "uce", "--concept", "circle", "--set", "bogus=1"], "valid options"),
    (["--method", "uce", "--concept", "circle", "--set", "lamb=abc"], "lamb=abc"),
    (["--method", "uce", "--concept", ""], "empty concept"),
    (["--method", "uce", "--concept", "circle", "--preset", "fast"], "valid presets"),
    (["--method", "uce", "--concept", "circle", "--preset", "toy"], "is not a toy model"),
])
def test_erase_refuses_bad_input_before_loading(argv, message, tmp_path, caplog):
    # the model path does not exist: these must fail on the input, before any loading
    code = main(["erase", "--model", str(tmp_path / "no-model"), *argv, "--out", str(tmp_path / "o")])
    assert code == 2
    assert message in caplog.text
    assert not (tmp_path / "o").exists()


def test_list_methods_shows_paper_and_options(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "uce" in out and "arXiv 2308.14761" in out and "--set lamb=0.5" in out


def test_erase_without_quiet_shows_progress(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "esd"
    assert main(["erase", "--model", str(tiny_sd_dir), "--method", "esd-x", "--concept", "circle",
                 "--set", "iterations=2", "--set", "ddim_steps=2", "--seed", "0", "--out", str(out)]) == 0
    assert (out / "manifest.json").exists() and "esd-x" in capsys.readouterr().err


def test_erase_save_lora_writes_a_lora_plain_diffusers_loads(tiny_sd_dir, tmp_path, caplog):
    out = tmp_path / "spm"
    assert main(["erase", "--model", str(tmp_path / "no-model"), "--method", "esd-u", "--concept", "circle",
                 "--save-lora", "--out", str(out)]) == 2  # refused before loading: esd-u changes norms
    assert "--save-lora: esd-u changes the parameter set 'noxattn'" in caplog.text and not out.exists()
    assert main(["erase", "--model", str(tmp_path / "no-model"), "--method", "receler", "--concept", "circle",
                 "--save-lora", "--out", str(out)]) == 2  # and receler's erasers are no weight change
    assert "receler has no LoRA export" in caplog.text and not out.exists()
    assert main(["-q", "erase", "--model", str(tiny_sd_dir), "--method", "spm", "--concept", "circle",
                 "--set", "iterations=2", "--set", "ddim_steps=2", "--set", "batch_size=1", "--set", "lr=0.05",
                 # spm's toy preset, spelled out (--preset toy is for toy-sd only)
                 "--set", "la_strength=30", "--set", "anchor_batch=4", "--set", "negative_guidance=6",
                 "--set", "composition=sum", "--save-lora", "--out", str(out)]) == 0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    pipe.load_lora_weights(out / "lora")
    assert json.loads((out / "manifest.json").read_text())["adapter"]["kind"] == "spm"


def test_erase_reads_the_method_s_options_from_a_toml_file_under_set(tiny_sd_dir, tmp_path, caplog):
    """--options FILE: typed by the method's config (arrays become tuples, integers floats where a
    float is wanted), --set wins over it; an unknown key, a wrong type, bad TOML or a missing file
    are refused before any work, the valid options listed as --set lists them."""
    options = tmp_path / "uce.toml"
    options.write_text('lamb = 1\nerase_scale = 0.5\nexpand_prompts = true\ntemplates = ["a {}", "{} on dots"]\n')
    out = tmp_path / "uce"
    common = ["-q", "erase", "--model", str(tiny_sd_dir), "--method", "uce", "--concept", "circle"]
    assert main([*common, "--options", str(options), "--set", "erase_scale=0.75", "--out", str(out)]) == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["lamb"] == 1.0 and config["erase_scale"] == 0.75 and config["expand_prompts"] is True
    assert config["templates"] == ["a {}", "{} on dots"]
    bad = {"lamda = 1\n": "uce has no option 'lamda'.*valid options: .*lamb", 'lamb = "big"\n': "lamb: expected float",
           "lamb = \n": "not valid TOML", 'templates = "a {}"\n': "templates: expected an array"}
    for text, message in bad.items():
        options.write_text(text)
        caplog.clear()
        assert main([*common, "--options", str(options), "--out", str(tmp_path / "o")]) == 2
        assert re.search(message, caplog.text), (text, caplog.text)
    assert main([*common, "--options", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in caplog.text and not (tmp_path / "o").exists()
