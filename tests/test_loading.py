"""load_pipeline on real files: diffusers directories, single-file LDM checkpoints, pickles, hub ids, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import build_tiny_pipeline
from efface.errors import InputError, ModelLoadError
from efface.models.loading import load_pipeline
from ldm_format import pipeline_to_ldm

COMPONENTS = ("unet", "vae", "text_encoder")


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _run(pipe) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def ldm_reference(tmp_path_factory) -> tuple[Path, object]:
    """A single-file original-format checkpoint of the tiny pipeline, with weights shifted so they differ
    from ``tiny_sd_dir``'s (a load that silently used the config directory's weights would show)."""
    pipe = build_tiny_pipeline()
    with torch.no_grad():
        for name in COMPONENTS:
            for p in getattr(pipe, name).parameters():
                p.add_(0.25)
    path = tmp_path_factory.mktemp("ldm") / "tiny-sd-v1.safetensors"
    save_file(pipeline_to_ldm(pipe), str(path))
    return path, pipe


def _assert_same_weights(loaded, reference) -> None:
    for name in COMPONENTS:
        got, want = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert set(got) == set(want), name
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{name}.{key}"


# 1. diffusers directory

def test_diffusers_directory_loads_and_runs(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    assert pipe.efface_source == str(tiny_sd_dir.resolve())
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    _assert_same_weights(pipe, build_tiny_pipeline())
    images = _run(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_string_path_and_auto_device(tiny_sd_dir):
    pipe = load_pipeline(str(tiny_sd_dir), device="auto")
    assert pipe.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_toy_uses_bundled_directory(tiny_sd_dir, monkeypatch):
    import efface.toy

    monkeypatch.setitem(efface.toy.TOY_MODELS, "toy-sd", tiny_sd_dir)
    assert load_pipeline("toy").efface_source == str(tiny_sd_dir.resolve())


def test_toy_missing_weights_says_how_to_train(tmp_path, monkeypatch):
    import efface.toy

    monkeypatch.setitem(efface.toy.TOY_MODELS, "toy-sd", tmp_path / "weights" / "toy-sd")
    with pytest.raises(ModelLoadError, match="efface toy train --model toy-sd"):
        load_pipeline("toy")


# 2. dtype and device

@pytest.mark.parametrize("dtype, expected", [("fp16", torch.float16), ("float16", torch.float16),
                                             ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             ("float32", torch.float32)])
def test_dtype_sets_parameter_dtype(tiny_sd_dir, dtype, expected):
    pipe = load_pipeline(tiny_sd_dir, dtype=dtype)
    for name in COMPONENTS:
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {expected}, name


def test_bad_dtype_fails_before_loading(tmp_path):
    # the model does not exist: the dtype error must come first
    with pytest.raises(InputError, match="valid dtypes: fp32, float32, fp16"):
        load_pipeline(tmp_path / "absent", dtype="fp8")


def test_bad_device_fails_before_loading(tmp_path):
    with pytest.raises(InputError, match="cuda:N"):
        load_pipeline(tmp_path / "absent", device="tpu")
    with pytest.raises(ModelLoadError, match="cuda:99"):
        load_pipeline(tmp_path / "absent", device="cuda:99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_pipeline(tmp_path / "absent", device="cuda")


# 3. pickle checkpoints

@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_refused_without_opt_in(tmp_path, tiny_sd_dir, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    before = _fingerprint(path)
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(path, config=tiny_sd_dir)
    message = str(err.value)
    assert "allow_pickle=True" in message and "--allow-pickle" in message
    assert "arbitrary code" in message and "safetensors" in message
    assert _fingerprint(path) == before


def test_pickle_loads_with_opt_in(tmp_path, tiny_sd_dir, ldm_reference):
    src, reference = ldm_reference
    path = tmp_path / "tiny-sd-v1.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(reference)}, path)
    pipe = load_pipeline(path, config=tiny_sd_dir, allow_pickle=True)
    _assert_same_weights(pipe, reference)
    assert pipe.efface_source == str(path.resolve())


# 4. hub ids

def test_uncached_hub_id_offline_says_how_to_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    # huggingface_hub reads these at import time; point the live value at the empty cache too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache / "hub"))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("efface-tests/not-a-real-model")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message and "offline" in message
    assert "hf download efface-tests/not-a-real-model --local-dir" in message
    assert "local directory" in message


# 5. single-file original-format checkpoints

def test_single_file_safetensors_with_config(tiny_sd_dir, ldm_reference):
    path, reference = ldm_reference
    before = _fingerprint(path)
    pipe = load_pipeline(path, config=tiny_sd_dir)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    _assert_same_weights(pipe, reference)
    assert pipe.efface_source == str(path.resolve())
    assert np.isfinite(_run(pipe)).all()
    assert _fingerprint(path) == before


def test_single_file_needs_config(ldm_reference):
    path, _ = ldm_reference
    with pytest.raises(ModelLoadError, match=r"config=DIR \(CLI: --config DIR\)"):
        load_pipeline(path)


def test_single_file_config_must_be_diffusers_directory(ldm_reference, tmp_path):
    path, _ = ldm_reference
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(path, config=tmp_path)


# 6. paths that are not models

def test_missing_path_names_it_and_lists_forms(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(missing)
    message = str(err.value)
    assert str(missing) in message
    assert "'toy'" in message and "diffusers directory" in message and ".safetensors" in message
    assert "hub id" in message


def test_missing_checkpoint_file_is_not_taken_for_hub_id():
    with pytest.raises(ModelLoadError, match="not found"):
        load_pipeline("models/absent.safetensors")


def test_directory_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_unsupported_file_type_is_refused(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("not a model")
    with pytest.raises(ModelLoadError, match="unsupported type"):
        load_pipeline(path)
