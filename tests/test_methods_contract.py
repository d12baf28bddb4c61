"""The contract every registered erasure method keeps, checked on tiny seeded SD components.

Adding a method: one row in CASES (its name and fast options for the tiny model).
"""

from __future__ import annotations

import pytest
import torch

import efface.methods  # noqa: F401  (registers the methods)
from efface.artifacts import ErasedModel
from efface.errors import InputError
from efface.methods import ErasureRequest, erase
from efface.models.params import named_parameters, select
from efface.models.text import encode
from efface.registry import METHODS

from conftest import build_tiny_pipeline

# method name -> options that keep it fast on the tiny model (one row per method)
ALL_CASES: dict[str, dict] = {
    "uce": {},
    "advunlearn": {"preset": "toy", "iterations": 6, "warmup_iter": 2, "attack_step": 2, "lr": 1e-3, "ddim_steps": 4,
                   "batch_size": 2, "retain_loss_w": 3.0, "templates": ("{}",), "retain_templates": ("{}",)},
    "rece": {},
    "esd-x": {"preset": "toy", "iterations": 3, "lr": 1e-2, "ddim_steps": 4, "batch_size": 2},
    "esd-x-strict": {"preset": "toy", "iterations": 3, "lr": 1e-2, "ddim_steps": 4, "batch_size": 2},
    "esd-u": {"preset": "toy", "iterations": 3, "lr": 1e-2, "ddim_steps": 4, "batch_size": 2},
    "esd-all": {"preset": "toy", "iterations": 3, "lr": 1e-2, "ddim_steps": 4, "batch_size": 2},
    "race": {"preset": "toy", "esd_iterations": 2, "iterations": 2, "pgd_steps": 2, "lr": 1e-2, "ddim_steps": 4,
             "batch_size": 2},
    "ca": {"preset": "toy", "iterations": 3, "lr": 1e-2, "batch_size": 4, "num_anchor_images": 4, "anchor_steps": 4},
    # the retain loss must hold "square" where all prompts embed nearly alike: strong, against the original model
    "salun": {"iterations": 60, "lr": 1e-4, "batch_size": 4, "num_images": 8, "sample_steps": 4, "templates": ("{}",),
              "retain_target": "original", "alpha": 10.0},
    "receler": {"preset": "toy", "iterations": 3, "lr": 1e-2, "ddim_steps": 4, "batch_size": 2, "adversarial_steps": 1},
    "mace": {"preset": "toy", "num_images": 2, "iterations": 3, "lr": 1e-2, "batch_size": 2, "train_preserve_scale": 10,
             "fuse_preserve_scale": 10},
    "doco": {"preset": "toy", "iterations": 4, "warmup": 1, "lr": 1e-2, "batch_size": 4, "num_anchor_images": 4,
             "anchor_steps": 4},
    "spm": {"preset": "toy", "iterations": 3, "lr": 5e-2, "ddim_steps": 4, "batch_size": 2, "anchor_batch": 2},
}
CASES = {name: options for name, options in ALL_CASES.items() if name in METHODS}
TARGET, OTHER = "circle", "square"


def test_every_registered_method_has_a_contract_row():
    assert set(METHODS.names()) <= set(ALL_CASES)


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    from efface import load_pipeline

    return load_pipeline(tiny_sd_dir)


def _eps(pipe, prompt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encode(pipe, [prompt])).sample


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c, n, p in named_parameters(pipe)}


@pytest.fixture(scope="module")
def fitted(pipe):
    out = {}
    for name, options in CASES.items():
        before, attached = _state(pipe), _attachments(pipe)
        out[name] = erase(pipe, name, [TARGET], preserve=[OTHER], seed=0, progress=False, **options)
        after = _state(pipe)
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name} left the pipeline modified"
        assert _attachments(pipe) == attached, f"{name}: fit left a processor or hook installed"
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_only_declared_parameters_change(name, pipe, fitted):
    erased = fitted[name]
    method = METHODS.get(name)(**CASES[name])
    assert erased.tensors or erased.adapter is not None, f"{name} changed nothing"
    if erased.tensors:
        assert set(erased.tensors) <= set(select(pipe, method.parameter_set))
    assert erased.manifest["tensors_changed"] == len(erased.tensors)
    assert (erased.manifest["adapter"] is None) == (erased.adapter is None)


def _attachments(pipe) -> tuple:
    """What an adapter may attach: the attention processors and every module's hooks."""
    hooks = [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in pipe.unet.named_modules()]
    hooks += [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in pipe.text_encoder.named_modules()]
    return tuple((k, id(v)) for k, v in pipe.unet.attn_processors.items()), tuple(hooks)


@pytest.mark.parametrize("name", list(CASES))
def test_applied_leaves_no_processor_or_hook_behind(name, pipe, fitted):
    before = _attachments(pipe)  # (fit itself is checked in the fixture)
    with fitted[name].applied(pipe):
        pass
    assert _attachments(pipe) == before, f"{name}: applied() left a processor or hook installed"


@pytest.mark.parametrize("name", list(CASES))
def test_target_changes_other_concepts_stay_close_and_outputs_are_finite(name, pipe, fitted):
    """On the tiny random model every prompt embeds nearly alike (circle vs square: ~2 % apart), so
    a method without a preservation term moves them nearly equally: for those, "stay close" is an
    absolute bound here, and specificity is measured on toy-sd (bench/erasure_smoke.py, and the
    slow test in test_methods_toy.py). Methods that preserve must move the preserved concept less."""
    base_t, base_o = _eps(pipe, TARGET), _eps(pipe, OTHER)
    with fitted[name].applied(pipe):
        new_t, new_o = _eps(pipe, TARGET), _eps(pipe, OTHER)
    assert torch.isfinite(new_t).all() and torch.isfinite(new_o).all()
    change_t = (new_t - base_t).norm() / base_t.norm()
    change_o = (new_o - base_o).norm() / base_o.norm()
    assert change_t > 1e-3, f"{name}: the target's prediction did not change"
    assert change_o < 0.5, f"{name}: an unrelated concept moved by {change_o:.3f}"
    if METHODS.get(name).preserves:
        assert change_o < change_t, f"{name}: the preserved concept moved more ({change_o:.4f}) than the target ({change_t:.4f})"
    torch.testing.assert_close(_eps(pipe, TARGET), base_t)  # restored after the block


@pytest.mark.parametrize("name", list(CASES))
def test_save_load_round_trips_exactly(name, pipe, fitted, tmp_path):
    erased = fitted[name]
    erased.save(tmp_path / name)
    loaded = ErasedModel.load(tmp_path / name)
    assert loaded.manifest == erased.manifest
    assert loaded.tensors.keys() == erased.tensors.keys()
    for k in erased.tensors:
        assert torch.equal(loaded.tensors[k], erased.tensors[k])
    if erased.adapter is not None:
        assert type(loaded.adapter) is type(erased.adapter)
        state, again = erased.adapter.state_dict(), loaded.adapter.state_dict()
        assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
        with erased.applied(pipe):
            expected = _eps(pipe, TARGET)
        with loaded.applied(pipe):
            torch.testing.assert_close(_eps(pipe, TARGET), expected, rtol=0, atol=0)
    with loaded.applied(pipe):
        for k, v in erased.tensors.items():
            c, _, n = k.partition(".")
            assert torch.equal(getattr(pipe, c).get_parameter(n), v)


@pytest.mark.parametrize("name", list(CASES))
def test_same_seed_same_weights(name, pipe, fitted):
    again = erase(pipe, name, [TARGET], preserve=[OTHER], seed=0, progress=False, **CASES[name])
    for k, v in fitted[name].tensors.items():
        assert torch.equal(again.tensors[k], v)
    if fitted[name].adapter is not None:
        state, again_state = fitted[name].adapter.state_dict(), again.adapter.state_dict()
        assert all(torch.equal(again_state[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", list(CASES))
def test_wrong_base_is_refused(name, fitted):
    torch.manual_seed(1)
    other = build_tiny_pipeline()
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(0.05)
    with pytest.raises(InputError, match="does not match"):
        fitted[name].apply(other)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_before_work(name, pipe):
    with pytest.raises(InputError, match="valid options"):
        erase(pipe, name, [TARGET], no_such_option=1)
    with pytest.raises(InputError, match="empty"):
        erase(pipe, name, ["  "], **CASES[name])
    with pytest.raises(InputError, match="tokens"):
        erase(pipe, name, ["circle " * 40], **CASES[name])
    with pytest.raises(InputError, match="no concept"):
        erase(pipe, name, [], **CASES[name])


def test_unknown_method_lists_valid_ones(pipe):
    with pytest.raises(InputError, match="valid methods: .*uce"):
        erase(pipe, "ucee", [TARGET])


def test_request_rejects_mismatched_anchors_and_overlap():
    with pytest.raises(InputError, match="anchors"):
        ErasureRequest.build(["a", "b"], ["x", "y", "z"])
    with pytest.raises(InputError, match="both erased and preserved"):
        ErasureRequest.build(["a"], preserve=["a"])
