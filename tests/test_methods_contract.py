"""The contract every registered erasure method keeps, on every model family it declares: a matrix
of (method, family) pairs over tiny seeded pipelines of each family (tests/families.py), loaded
through the real loaders; every family a method does not declare is refused before any work.

Adding a method: one row in CASES (its name and fast options for the tiny models). Adding a family:
its builder in tests/families.py and its name in MATRIX_FAMILIES.
"""

from __future__ import annotations

import pytest
import torch

import efface.methods  # noqa: F401  (registers the methods)
from efface.artifacts import ErasedModel
from efface.errors import InputError
from efface.methods import ErasureRequest, erase
from efface.models.diffusion import count_denoiser_evaluations, predict
from efface.models.families import family_of
from efface.models.params import named_parameters, select
from efface.models.text import encode
from efface.registry import METHODS
from efface.toy.presets import method_inputs, method_preset

from families import build


def toy(name: str, **options) -> dict:
    """The toy preset of ``name`` and its toy inputs (as efface erase --model toy), then ``options``."""
    return {"preset": method_preset(name), **method_inputs(name), **options}


# method name -> options that keep it fast on the tiny model (one row per method)
ALL_CASES: dict[str, dict] = {
    "uce": {},
    "advunlearn": toy("advunlearn", iterations=6, warmup_iter=2, attack_step=2, lr=1e-3, ddim_steps=4, batch_size=2,
                      retain_loss_w=3.0, templates=("{}",), retain_templates=("{}",)),
    # on the tiny SDXL (20-d context, every prompt alike) RECE's official preserve weight 0.1 lets its
    # rounds move "square" (0.017) more than "circle" (0.006); UCE's weight 1 holds it (0.005 vs 0.012)
    "rece": {"preserve_scale": 1.0},
    "esd-x": toy("esd-x", iterations=3, lr=1e-2, ddim_steps=4, batch_size=2),
    "esd-x-strict": toy("esd-x-strict", iterations=3, lr=1e-2, ddim_steps=4, batch_size=2),
    # (the whole UNet at lr 1e-2 moves every prompt of the tiny SDXL by ~0.6: 3e-3)
    "esd-u": toy("esd-u", iterations=3, lr=3e-3, ddim_steps=4, batch_size=2),
    "esd-all": toy("esd-all", iterations=3, lr=3e-3, ddim_steps=4, batch_size=2),
    "race": toy("race", esd_iterations=2, iterations=2, pgd_steps=2, lr=3e-3, ddim_steps=4, batch_size=2),
    "ca": toy("ca", iterations=3, lr=1e-2, batch_size=4, num_anchor_images=4, anchor_steps=4),
    # the retain loss must hold "square" where all prompts embed nearly alike: strong, against the original model
    "salun": {"iterations": 60, "lr": 1e-4, "batch_size": 4, "num_images": 8, "sample_steps": 4, "templates": ("{}",),
              "retain_target": "original", "alpha": 10.0},
    "receler": toy("receler", iterations=3, lr=1e-2, ddim_steps=4, batch_size=2, adversarial_steps=1),
    "mace": toy("mace", num_images=2, iterations=3, lr=1e-2, batch_size=2, train_preserve_scale=10,
                fuse_preserve_scale=10),
    "doco": toy("doco", iterations=4, warmup=1, lr=1e-2, batch_size=4, num_anchor_images=4, anchor_steps=4),
    "spm": toy("spm", iterations=3, lr=5e-2, ddim_steps=4, batch_size=2, anchor_batch=2, lr_scheduler="constant"),
}
CASES = {name: options for name, options in ALL_CASES.items() if name in METHODS}
TARGET, OTHER = "circle", "square"
MATRIX_FAMILIES = ("sd", "sdxl", "sd3", "flux")  # tiny pipelines of tests/families.py, one per family
# every (method, family) pair a method declares
PAIRS = [(name, family) for name in CASES for family in MATRIX_FAMILIES if family in METHODS.get(name).families]
REFUSED = [(name, family) for name in CASES for family in MATRIX_FAMILIES if family not in METHODS.get(name).families]


def test_every_registered_method_has_a_contract_row():
    assert set(METHODS.names()) <= set(ALL_CASES)


@pytest.fixture(scope="module")
def pipes(family_dirs):
    from efface import load_pipeline

    pipes = {f: load_pipeline(family_dirs(f)) for f in MATRIX_FAMILIES}
    for pipe in pipes.values():  # transformers installs its hidden-state recorders (hooks) on first use: before any check
        encode(pipe, [TARGET])
    return pipes


@pytest.fixture(scope="module")
def pipe(pipes):
    return pipes["sd"]


def _eps(pipe, prompt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *family_of(pipe).latent_shape(pipe), generator=g)
    with torch.no_grad():
        return predict(pipe, x, 500, encode(pipe, [prompt]))


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c, n, p in named_parameters(pipe)}


def _attachments(pipe) -> tuple:
    """What an adapter may attach: the denoiser's attention processors and every module's hooks."""
    family = family_of(pipe)
    hooks = [(c, n, len(m._forward_hooks), len(m._forward_pre_hooks))
             for c in family.components(pipe) for n, m in getattr(pipe, c).named_modules()]
    return tuple((k, id(v)) for k, v in family.denoiser(pipe).attn_processors.items()), tuple(hooks)


@pytest.fixture(scope="module")
def fitted(pipes):
    """``get(name, family)``: the method's erasure of TARGET on that family's tiny pipeline (fitted once),
    checked to leave the pipeline's weights, processors and hooks as they were."""
    cache: dict[tuple[str, str], ErasedModel] = {}

    def get(name: str, family: str) -> ErasedModel:
        if (name, family) not in cache:
            pipe = pipes[family]
            before, attached = _state(pipe), _attachments(pipe)
            cache[name, family] = erase(pipe, name, [TARGET], preserve=[OTHER], seed=0, progress=False, **CASES[name])
            after = _state(pipe)
            assert all(torch.equal(before[k], after[k]) for k in before), f"{name} left the {family} pipeline modified"
            assert _attachments(pipe) == attached, f"{name}: fit left a processor or hook installed on {family}"
        return cache[name, family]

    return get


@pytest.mark.parametrize("name, family", PAIRS)
def test_only_declared_parameters_change(name, family, pipes, fitted):
    erased, pipe = fitted(name, family), pipes[family]
    method = METHODS.get(name)(**CASES[name])
    assert erased.tensors or erased.adapter is not None, f"{name} changed nothing"
    if erased.tensors:
        assert set(erased.tensors) <= set(select(pipe, method.parameter_set))
    assert erased.manifest["tensors_changed"] == len(erased.tensors)
    assert (erased.manifest["adapter"] is None) == (erased.adapter is None)
    assert erased.manifest["base"]["family"] == family


@pytest.mark.parametrize("name, family", PAIRS)
def test_applied_leaves_no_processor_or_hook_behind(name, family, pipes, fitted):
    pipe = pipes[family]
    before = _attachments(pipe)  # (fit itself is checked in the fixture)
    with fitted(name, family).applied(pipe):
        pass
    assert _attachments(pipe) == before, f"{name}: applied() left a processor or hook installed"


@pytest.mark.parametrize("name, family", PAIRS)
def test_target_changes_other_concepts_stay_close_and_outputs_are_finite(name, family, pipes, fitted):
    """On the tiny random models every prompt embeds nearly alike (circle vs square: ~2 % apart), so
    a method without a preservation term moves them nearly equally: for those, "stay close" is an
    absolute bound here, and specificity is measured on toy-sd (bench/erasure_smoke.py, and the
    slow test in test_methods_toy.py). Methods that preserve must move the preserved concept less."""
    pipe = pipes[family]
    base_t, base_o = _eps(pipe, TARGET), _eps(pipe, OTHER)
    with fitted(name, family).applied(pipe):
        new_t, new_o = _eps(pipe, TARGET), _eps(pipe, OTHER)
    assert torch.isfinite(new_t).all() and torch.isfinite(new_o).all()
    change_t = (new_t - base_t).norm() / base_t.norm()
    change_o = (new_o - base_o).norm() / base_o.norm()
    assert change_t > 1e-3, f"{name}: the target's prediction did not change on {family}"
    assert change_o < 0.5, f"{name}: an unrelated concept moved by {change_o:.3f} on {family}"
    if METHODS.get(name).preserves:
        assert change_o < change_t, (f"{name}: the preserved concept moved more ({change_o:.4f}) than the target "
                                     f"({change_t:.4f}) on {family}")
    torch.testing.assert_close(_eps(pipe, TARGET), base_t)  # restored after the block


@pytest.mark.parametrize("name, family", PAIRS)
def test_save_load_round_trips_exactly(name, family, pipes, fitted, tmp_path):
    erased, pipe = fitted(name, family), pipes[family]
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


@pytest.mark.parametrize("name, family", PAIRS)
def test_same_seed_same_weights(name, family, pipes, fitted):
    again = erase(pipes[family], name, [TARGET], preserve=[OTHER], seed=0, progress=False, **CASES[name])
    first = fitted(name, family)
    assert first.tensors.keys() == again.tensors.keys()
    for k, v in first.tensors.items():
        assert torch.equal(again.tensors[k], v)
    if first.adapter is not None:
        state, again_state = first.adapter.state_dict(), again.adapter.state_dict()
        assert all(torch.equal(again_state[k], v) for k, v in state.items())


@pytest.mark.parametrize("name, family", PAIRS)
def test_wrong_base_is_refused(name, family, fitted):
    other = build(family)
    with torch.no_grad():
        for _, _, p in named_parameters(other):  # every component: the artifact depends on some of them
            p.add_(0.05)
    with pytest.raises(InputError, match="does not match"):
        fitted(name, family).apply(other)


@pytest.mark.parametrize("name, family", REFUSED)
def test_undeclared_family_is_refused_before_work_with_the_reason(name, family, pipes):
    pipe = pipes[family]
    before = _state(pipe)
    with count_denoiser_evaluations() as n, pytest.raises(InputError, match=f"supports .* models, not {family}: "):
        erase(pipe, name, [TARGET], seed=0, progress=False, **CASES[name])
    assert n.value == 0 and all(torch.equal(v, _state(pipe)[k]) for k, v in before.items())


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
