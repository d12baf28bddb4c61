"""Artifacts in the diffusers ecosystem: the apply handle (remove, scale, stacking) and the LoRA export
that plain diffusers loads (exact for the closed forms, a truncated SVD for trained methods, refused
where the change is not on Linear / Conv2d layers)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from efface.artifacts import ErasedModel, base_fingerprint
from efface.artifacts_lora import LORA_FILE, lora_layers
from efface.errors import InputError
from efface.methods import erase
from efface.models.adapters import Adapter
from efface.models.families import family_of
from efface.models.params import get_parameter
from efface.models.text import encode
from efface.registry import METHODS
from efface.toy.presets import method_inputs, method_preset

from conftest import build_tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def fitted(toy):
    """UCE erasures of circle and of square on toy-sd (closed forms: 0.2 s each)."""
    return {c: erase(toy, "uce", [c], seed=0, progress=False, preset=method_preset("uce"))
            for c in ("circle", "square")}


def _weights(pipe, keys) -> dict[str, torch.Tensor]:
    return {k: get_parameter(pipe, k).detach().clone() for k in keys}


def _equal(pipe, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(get_parameter(pipe, k), v) for k, v in expected.items())


def _images(pipe, steps: int = 4) -> np.ndarray:
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=steps, generator=gens, output_type="np").images


def _eps(pipe, prompts=PROMPTS) -> torch.Tensor:
    x = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=encode(pipe, prompts).embeds).sample


def test_apply_returns_a_handle_whose_remove_restores_exactly_what_it_overwrote(toy, fitted):
    erased = fitted["circle"]
    base = _weights(toy, erased.tensors)
    handle = erased.apply(toy)
    assert handle.active and handle.pipe is toy and _equal(toy, erased.tensors)  # scale 1: the stored values
    handle.remove()
    assert not handle.active and _equal(toy, base)
    handle.remove()  # idempotent
    with erased.apply(toy) as pipe:  # the handle is a context manager too
        assert pipe is toy and _equal(toy, erased.tensors)
    assert _equal(toy, base)


def test_scale_interpolates_between_the_base_and_the_erasure(toy, fitted):
    erased = fitted["circle"]
    base = _weights(toy, erased.tensors)
    with erased.applied(toy, scale=0.0):
        assert _equal(toy, base)
    with erased.applied(toy, scale=0.5):
        for k, w in base.items():
            torch.testing.assert_close(get_parameter(toy, k), w + 0.5 * (erased.tensors[k] - w))
    with erased.applied(toy, scale=-1.0):  # beyond: the opposite change
        k = next(iter(base))
        torch.testing.assert_close(get_parameter(toy, k), 2 * base[k] - erased.tensors[k])
    with pytest.raises(InputError, match="finite"):
        erased.apply(toy, scale=float("nan"))
    assert _equal(toy, base)


def test_two_erasures_of_one_base_stack_and_unstack_exactly(toy, fitted):
    a, b = fitted["circle"], fitted["square"]
    base = _weights(toy, a.tensors)
    ha = a.apply(toy)
    # the second's base check is against the original base: a pipeline holding a's weights without
    # efface's record of them is refused, the one a was applied to is not
    baked = copy.deepcopy(toy)
    with pytest.raises(InputError, match="does not match"):
        b.check_base(baked)
    hb = b.apply(toy)
    with pytest.raises(InputError, match="already applied"):  # the same artifact twice is a mistake, refused
        b.apply(toy)
    for k, w in base.items():  # the changes add up
        torch.testing.assert_close(get_parameter(toy, k), w + (a.tensors[k] - w) + (b.tensors[k] - w))
    hb.remove()
    assert _equal(toy, a.tensors)  # reverse order: bit for bit
    ha.remove()
    assert _equal(toy, base)
    # the other order leaves what the remaining one gives alone; nested context managers
    ha, hb = a.apply(toy), b.apply(toy, scale=0.5)
    ha.remove()
    left = _weights(toy, b.tensors)
    hb.remove()
    assert _equal(toy, base)
    with b.applied(toy, scale=0.5):
        assert _equal(toy, left)
    with a.applied(toy), b.applied(toy):
        assert not _equal(toy, a.tensors)
    assert _equal(toy, base)


class _Fixed(Adapter):
    """An adapter without a strength: adds a constant to the UNet's output."""

    kind = "test-fixed"

    def spec(self):
        return {}

    def _attach(self, pipe, handle):
        h = pipe.unet.register_forward_hook(lambda m, args, out: out)
        handle.on_remove(h.remove)


def test_scale_is_refused_for_an_adapter_without_a_strength(toy):
    erased = ErasedModel({}, {"method": "test", "base": {"reference": "toy", "sha256": "0" * 64}}, {}, _Fixed())
    with pytest.raises(InputError, match="no strength"):
        erased.apply(toy, scale=0.5)
    erased.apply(toy).remove()
    with pytest.raises(InputError, match="no LoRA form"):
        erased.save("unused", lora=True)


def test_adapter_strength_scales_spm_as_diffusers_adapter_weight_and_receler_to_the_base(tmp_path):
    from efface.methods.receler import ReceLerErasers
    from efface.methods.spm_membranes import SPMAdapter, membrane_layers

    pipe = build_tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    spm = SPMAdapter(membrane_layers(pipe.unet), ["circle"], composition="sum").reset(g)
    receler = ReceLerErasers.for_pipe(pipe, rank=2)
    with torch.no_grad():
        for p in [*spm.membranes[0].up.values(), *receler.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    manifest = {"method": "spm", "base": {"reference": "tiny", "sha256": "0" * 64}}
    erased = ErasedModel({}, manifest, base_fingerprint(pipe), spm)
    base = _eps(pipe)
    with erased.applied(pipe, scale=0.5), spm.fixed(1.0):
        half = _eps(pipe)
    erased.save(tmp_path / "spm", lora=True)
    pipe.load_lora_weights(tmp_path / "spm" / "lora", adapter_name="spm")
    pipe.set_adapters(["spm"], adapter_weights=[0.5])
    torch.testing.assert_close(_eps(pipe), half, rtol=1e-4, atol=1e-5)
    pipe.unload_lora_weights()
    erased = ErasedModel({}, {**manifest, "method": "receler"}, base_fingerprint(pipe), receler)
    with erased.applied(pipe, scale=0.0):
        torch.testing.assert_close(_eps(pipe), base, rtol=0, atol=0)
    with erased.applied(pipe):
        assert not torch.allclose(_eps(pipe), base)


def test_uce_lora_reproduces_efface_images_in_plain_diffusers(toy, fitted, tmp_path):
    from diffusers import StableDiffusionPipeline

    erased = fitted["circle"]
    erased.save(tmp_path / "uce", pipe=toy, lora=True)
    report = json.loads((tmp_path / "uce" / "manifest.json").read_text())["lora"]
    assert report["mode"] == "exact" and report["relative_error"] < 1e-6 and report["components"] == ["unet"]
    assert 0 < report["max_rank"] < 64  # the change's exact rank, below the layers' 64: a low-rank change
    pipe = StableDiffusionPipeline.from_pretrained(toy.efface_source, local_files_only=True)  # plain diffusers
    pipe.set_progress_bar_config(disable=True)
    with erased.applied(pipe):
        expected = _images(pipe)
    with erased.applied(pipe, scale=0.5):
        eps_half = _eps(pipe)
    base = _images(pipe)
    pipe.load_lora_weights(tmp_path / "uce" / "lora", adapter_name="uce")
    got = _images(pipe)
    assert np.abs(got - expected).max() <= 2 / 255 < np.abs(base - expected).max()
    pipe.set_adapters(["uce"], adapter_weights=[0.5])  # diffusers' strength = efface's scale
    torch.testing.assert_close(_eps(pipe), eps_half, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["rece", "mace"])
def test_closed_form_loras_are_exact(toy, method, tmp_path):
    options = {"iterations": 2, "num_images": 2} if method == "mace" else {}
    erased = erase(toy, method, ["circle"], seed=0, progress=False, preset=method_preset(method),
                   **method_inputs(method), **options)
    erased.save(tmp_path / method, pipe=toy, lora=True)
    assert erased.manifest["lora"]["mode"] == "exact" and erased.manifest["lora"]["relative_error"] < 1e-4
    with erased.applied(toy):
        expected = _eps(toy)
    pipe = copy.deepcopy(toy)
    pipe.load_lora_weights(tmp_path / method / "lora")
    torch.testing.assert_close(_eps(pipe), expected, rtol=1e-4, atol=1e-4)


def test_svd_export_keeps_99_percent_of_the_energy_or_the_rank_asked():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    s = torch.tensor([10.0, 5.0, 2.0, 0.5] + [0.01] * 8, dtype=torch.float64)  # 99 % of sum s^2 needs 3 (96.7 % with 2)
    w = torch.randn(16, 12, generator=g, dtype=torch.float64)
    tensors = {"unet.layer.weight": (w + u[:, :12] * s @ v.T).float(), "unet.layer.bias": torch.ones(16)}
    base = {"unet.layer.weight": w.float(), "unet.layer.bias": torch.zeros(16)}
    layers, report = lora_layers(tensors, base.__getitem__, mode="svd")
    assert report["ranks"] == {"unet.layer": 3} and report["bias"] == ["unet"]
    torch.testing.assert_close(report["relative_error"], float((s[3:] ** 2).sum().sqrt() / s.norm()), rtol=1e-3, atol=0)
    lo = layers["unet"]
    assert lo["layer.lora_A.weight"].shape == (3, 12) and torch.equal(lo["layer.lora_B.bias"], torch.ones(16))
    _, report = lora_layers(tensors, base.__getitem__, mode="svd", rank=1)
    assert report["ranks"] == {"unet.layer": 1} and report["mode"] == "svd"
    layers, report = lora_layers(tensors, base.__getitem__, mode="exact")  # full rank: all 12
    assert report["ranks"] == {"unet.layer": 12} and report["relative_error"] < 1e-6
    # a convolution: A keeps the kernel, B is 1 x 1 (peft's conv LoRA); B A is the change
    w = torch.randn(4, 3, 3, 3, generator=g)
    delta = (torch.randn(4, 2, generator=g) @ torch.randn(2, 27, generator=g)).reshape(4, 3, 3, 3)
    layers, report = lora_layers({"unet.conv.weight": w + delta}, {"unet.conv.weight": w}.__getitem__, mode="exact")
    a, b = layers["unet"]["conv.lora_A.weight"], layers["unet"]["conv.lora_B.weight"]
    assert report["ranks"] == {"unet.conv": 2} and a.shape == (2, 3, 3, 3) and b.shape == (4, 2, 1, 1)
    torch.testing.assert_close((b.flatten(1) @ a.flatten(1)).reshape(4, 3, 3, 3), delta, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*lora_bias=True.*")  # peft: to_q / to_k / to_v have no base bias to fuse into
def test_trained_method_exports_a_truncated_svd_from_the_cli(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from efface.cli import main

    out = tmp_path / "esd"
    assert main(["-q", "erase", "--model", str(tiny_sd_dir), "--method", "esd-x", "--concept", "circle",
                 "--set", "iterations=2", "--set", "ddim_steps=2", "--save-lora", "--lora-rank", "1",
                 "--out", str(out)]) == 0
    report = json.loads((out / "manifest.json").read_text())["lora"]
    assert report["mode"] == "svd" and set(report["ranks"].values()) == {1} and report["relative_error"] > 0
    assert report["bias"] == ["unet"]  # esd-x trains to_out.0's bias too: peft's lora_bias carries it
    erased = ErasedModel.from_pretrained(out)  # the peft / diffusers name of load
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    with erased.applied(pipe):
        expected = _eps(pipe)
    base = _eps(pipe)
    pipe.load_lora_weights(out / "lora")
    got = _eps(pipe)
    assert (got - expected).norm() < (base - expected).norm()  # an approximation, nearer the erasure than the base


def test_lora_export_is_refused_before_any_work_where_the_change_is_not_linear(tiny_sd_dir, family_dirs, tmp_path,
                                                                                  caplog):
    from efface.cli import main

    # known only once the model is loaded (Flux's attention holds RMSNorms), still before the fit
    assert main(["erase", "--model", str(family_dirs("flux")), "--method", "esd-x", "--concept", "circle",
                 "--save-lora", "--out", str(tmp_path / "flux")]) == 2
    assert "--save-lora: " in caplog.text and "(RMSNorm)" in caplog.text and not (tmp_path / "flux").exists()

    for name in ("esd-u", "esd-all", "salun", "receler", "advunlearn", "race"):
        assert METHODS.get(name)().lora_refusal(), name
    for name in ("uce", "rece", "mace", "esd-x", "esd-x-strict", "ca", "doco", "spm"):
        assert METHODS.get(name)().lora_refusal(build_tiny_pipeline()) is None, name
    assert METHODS.get("advunlearn")(train_method="xattn").lora_refusal() is None  # per config
    assert main(["erase", "--model", str(tiny_sd_dir), "--method", "uce", "--concept", "circle",
                 "--lora-rank", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--lora-rank 2: give a rank of at least 1, with --save-lora" in caplog.text


def test_sdxl_lora_uses_each_encoders_prefix_and_loads_in_plain_diffusers(tmp_path):
    from families import build

    pipe = build("sdxl")
    g = torch.Generator().manual_seed(0)
    keys = {
        "unet": next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight")),
        "text_encoder": next(n for n, _ in pipe.text_encoder.named_parameters() if n.endswith("q_proj.weight")),
        "text_encoder_2": next(n for n, _ in pipe.text_encoder_2.named_parameters() if n.endswith("fc1.weight")),
    }
    tensors = {}
    for component, name in keys.items():  # a rank-2 change of each
        w = get_parameter(pipe, f"{component}.{name}").detach()
        low = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
        tensors[f"{component}.{name}"] = w + low
    bias = f"text_encoder_2.{keys['text_encoder_2'].removesuffix('weight')}bias"
    tensors[bias] = get_parameter(pipe, bias).detach() + 0.5
    manifest = {"method": "test", "lora_export": "exact", "base": {"reference": "sdxl", "sha256": "0" * 64}}
    erased = ErasedModel(tensors, manifest, base_fingerprint(pipe, ("unet", "text_encoder", "text_encoder_2")))
    erased.save(tmp_path / "a", pipe=pipe, lora=True)
    state = load_file(tmp_path / "a" / "lora" / LORA_FILE)
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}
    fc1 = keys["text_encoder_2"].removesuffix(".weight")
    assert f"text_encoder_2.{fc1}.lora_linear_layer.up.bias" in state  # a text encoder's layers in diffusers' names
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in state)  # the UNet's in peft's
    assert erased.manifest["lora"]["max_rank"] == 2

    family = family_of(pipe)
    x = torch.randn(len(PROMPTS), *family.latent_shape(pipe), generator=g)

    def outputs(p):  # both encoders (embeds, pooled) and the UNet on them
        with torch.no_grad():
            cond = family.encode(p, PROMPTS)
            return cond.embeds, cond.pooled, family.predict(p, x, 500, cond)

    base = outputs(pipe)
    with erased.applied(pipe):
        expected = outputs(pipe)
    pipe.load_lora_weights(tmp_path / "a" / "lora")
    for got, want, was in zip(outputs(pipe), expected, base):
        assert not torch.allclose(want, was)  # each output moved
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_families_export_under_transformer(family, tmp_path):
    """UCE on SD3 / Flux edits context_embedder and the pooled text embedder: a LoRA under
    "transformer." that the pipeline's own loader reads."""
    from families import build

    pipe = build(family)
    erased = erase(pipe, "uce", ["circle"], seed=0, progress=False)
    erased.save(tmp_path / family, pipe=pipe, lora=True)
    state = load_file(tmp_path / family / "lora" / LORA_FILE)
    assert {k.split(".")[0] for k in state} == {"transformer"} and erased.manifest["lora"]["mode"] == "exact"
    fam = family_of(pipe)
    x = torch.randn(1, *fam.latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = fam.encode(pipe, ["a red circle"])
        with erased.applied(pipe):
            expected = fam.predict(pipe, x, 500, cond)
        pipe.load_lora_weights(tmp_path / family / "lora")
        torch.testing.assert_close(fam.predict(pipe, x, 500, cond), expected, rtol=1e-4, atol=1e-5)
    if family == "flux":  # ESD-x's set there holds the attention's RMSNorm scales: refused, with the layer named
        assert "RMSNorm" in METHODS.get("esd-x")().lora_refusal(pipe)


def test_save_pretrained_and_from_pretrained_are_save_and_load(fitted, tmp_path):
    erased = fitted["circle"]
    erased.save_pretrained(tmp_path / "a")
    loaded = ErasedModel.from_pretrained(tmp_path / "a")
    assert loaded.manifest == erased.manifest
    assert all(torch.equal(loaded.tensors[k], v) for k, v in erased.tensors.items())


def test_applied_copy_shares_every_unchanged_weight_and_leaves_the_base(family_pipe):
    from efface.methods import erase
    from efface.models.params import named_parameters

    pipe = family_pipe("sd")
    before = {f"{c}.{n}": p.detach().clone() for c, n, p in named_parameters(pipe)}
    erased = erase(pipe, "uce", ["circle"], progress=False)
    twin = erased.applied_copy(pipe)
    mine = {f"{c}.{n}": p for c, n, p in named_parameters(pipe)}
    theirs = {f"{c}.{n}": p for c, n, p in named_parameters(twin)}
    assert mine.keys() == theirs.keys() and erased.tensors
    for key, p in theirs.items():
        if key in erased.tensors:
            assert p.data_ptr() != mine[key].data_ptr() and torch.equal(p.detach(), erased.tensors[key])
        else:
            assert p is mine[key]  # the same tensor: no second model in memory
    assert twin.tokenizer is pipe.tokenizer and twin.scheduler is not pipe.scheduler
    assert all(torch.equal(mine[k].detach(), v) for k, v in before.items())  # the base as it was
