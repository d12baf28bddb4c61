"""How training methods train (issue 14): fp32 master weights and autocast on fp16 / bf16
pipelines, dynamic loss scaling, gradient checkpointing of the denoiser, the 8-bit optimizer's
refusal without its package; fp32 training unchanged bit for bit."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import efface.methods  # noqa: F401  (registers the methods)
from efface.errors import InputError
from efface.methods import erase
from efface.methods.base import TrainingConfig
from efface.models.diffusion import train_steps
from efface.models.families import family_of
from efface.models.precision import Active, LossScale, Trainer, TrainingOptions
from efface.registry import METHODS

from test_checkpoint import Killed, killed_after
from test_methods_contract import ALL_CASES


def _trainer(params, mode="auto", dtype=torch.float16, **kw) -> Trainer:
    active = Active(TrainingOptions(mixed_precision=mode), dtype, "cpu")
    return Trainer(params, optimizer="adam", lr=1e-4, weight_decay=0.0, max_grad_norm=0.0, active=active, **kw)


def _steps(trainer: Trainer, grad: torch.Tensor, n: int) -> None:
    for _ in range(n):
        trainer.zero_grad()
        with trainer.autocast():
            loss = (trainer.params[0].float() * grad).sum()
        trainer.backward(loss)
        trainer.step()


def test_fp32_parameters_train_exactly_as_plain_adam():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16))
    b = torch.nn.Parameter(a.detach().clone())
    grad = torch.randn(16)
    _steps(_trainer([a], dtype=torch.float32), grad, 5)
    plain = torch.optim.Adam([b], lr=1e-4)
    for _ in range(5):
        plain.zero_grad()
        (b * grad).sum().backward()
        plain.step()
    assert torch.equal(a, b)


def test_fp16_adam_without_masters_breaks_and_masters_keep_small_updates():
    grad = torch.tensor([0.5, 0.0, 1e-3, 0.5])
    off = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    _steps(_trainer([off], mode="off"), grad, 1)
    assert not torch.isfinite(off).all()  # Adam's eps (1e-8) is 0 in fp16: 0 / 0 and x / 0
    auto = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    trainer = _trainer([auto])
    _steps(trainer, grad, 20)
    assert auto.dtype == torch.float16 and torch.isfinite(auto).all() and trainer.skipped == 0
    # each step moves the master by ~lr = 1e-4, under half of fp16's spacing at 1 (9.8e-4): alone it
    # would round away; twenty steps on the master move the fp16 value by ~2e-3
    assert torch.allclose(trainer.masters[0][[0, 2, 3]], torch.full((3,), 1 - 20e-4), atol=2e-5)
    assert (auto[[0, 2, 3]] < 1).all() and auto[1] == 1


def test_bf16_needs_no_loss_scale_fp16_gets_one():
    assert _trainer([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], dtype=torch.bfloat16).loss_scale is None
    assert _trainer([torch.nn.Parameter(torch.ones(2, dtype=torch.float16))]).loss_scale.scale == 2.0**16


def test_an_overflowing_fp16_gradient_skips_the_step_and_halves_the_scale():
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    trainer = _trainer([p])
    trainer.zero_grad()
    trainer.backward((p.float() * 1e3).sum())  # 1e3 x 2^16 overflows fp16's 65504
    assert not trainer.step() and trainer.skipped == 1
    assert trainer.loss_scale.scale == 2.0**15 and torch.equal(p, torch.ones(2, dtype=torch.float16))
    scale = LossScale(growth_interval=2)
    scale.update(True)
    scale.update(True)
    assert scale.scale == 2.0**17


TRAINED = [name for name in ALL_CASES if name in METHODS and issubclass(METHODS.get(name).Config, TrainingConfig)]


def test_the_training_methods_are_the_methods_with_training_loops():
    assert set(TRAINED) == set(METHODS.names()) - {"uce", "rece"}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", TRAINED)
def test_every_training_method_trains_finite_weights_on_a_half_precision_pipeline(name, dtype, family_dirs):
    from efface import load_pipeline

    pipe = load_pipeline(family_dirs("sd"), dtype=dtype)
    options = dict(ALL_CASES[name])
    if name == "salun":
        options["iterations"] = 4
    erased = erase(pipe, name, ["circle"], preserve=["square"], seed=0, progress=False, **options)
    weights = list(erased.tensors.values()) + (list(erased.adapter.parameters()) if erased.adapter else [])
    assert weights and all(torch.isfinite(w).all() for w in weights)
    assert all(v.dtype == getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype]) for v in erased.tensors.values())
    assert erased.manifest["base"]["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[dtype]


def test_an_fp16_fit_killed_after_a_checkpoint_resumes_to_the_same_weights(family_dirs, tmp_path, monkeypatch):
    """The fp32 masters and the loss scale are part of the checkpoint."""
    from efface import load_pipeline

    _killed_and_resumed_equals_straight(load_pipeline(family_dirs("sd"), dtype="fp16"), {}, tmp_path, monkeypatch)


def _killed_and_resumed_equals_straight(pipe, options: dict, tmp_path, monkeypatch) -> None:
    """esd-x (4 iterations) killed after its second checkpoint and rerun gives the uninterrupted weights."""
    run = dict(seed=0, progress=False, **options, **{**ALL_CASES["esd-x"], "iterations": 4})
    straight = erase(pipe, "esd-x", ["circle"], **run).tensors
    with monkeypatch.context() as m:
        killed_after(m, 2)
        with pytest.raises(Killed):
            erase(pipe, "esd-x", ["circle"], checkpoint_dir=tmp_path / "w", checkpoint_every=1, **run)
    resumed = erase(pipe, "esd-x", ["circle"], checkpoint_dir=tmp_path / "w", checkpoint_every=1, **run)
    assert resumed.manifest["resumed"] and resumed.tensors.keys() == straight.keys()
    assert all(torch.equal(v, resumed.tensors[k]) for k, v in straight.items())


def test_gradient_checkpointing_recomputes_the_denoiser_and_trains_the_same(family_pipe):
    pipe = family_pipe("sd")
    unet = family_of(pipe).denoiser(pipe)
    block = unet.down_blocks[0].resnets[0]
    calls = [0]
    handle = block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # (a recompute may stop early)
    options = {**ALL_CASES["esd-u"], "iterations": 2}
    try:
        plain = erase(pipe, "esd-u", ["circle"], seed=0, progress=False, **options).tensors
        without, calls[0] = calls[0], 0
        checkpointed = erase(pipe, "esd-u", ["circle"], seed=0, progress=False, gradient_checkpointing=True,
                             **options).tensors
    finally:
        handle.remove()
    assert calls[0] == without + 2  # each training step's forward runs again in its backward pass
    assert not unet.is_gradient_checkpointing  # put back as it was
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(v, checkpointed[k], atol=1e-6) for k, v in plain.items())


def test_gradient_checkpointing_outside_a_fit_is_left_as_the_caller_set_it(family_pipe):
    pipe = family_pipe("sd")
    unet = family_of(pipe).denoiser(pipe)
    unet.enable_gradient_checkpointing()
    erase(pipe, "esd-x", ["circle"], seed=0, progress=False, gradient_checkpointing=True,
          **{**ALL_CASES["esd-x"], "iterations": 1})
    assert unet.is_gradient_checkpointing


def test_precision_options_are_checked_before_any_work():
    with pytest.raises(InputError, match="mixed_precision must be one of auto, off"):
        METHODS.get("esd-x")(mixed_precision="fp8")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(InputError, match="pip install bitsandbytes"):
            METHODS.get("esd-x")(optimizer_8bit=True)


def test_train_steps_keeps_its_own_state_names():
    p = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="masters"):
        train_steps(lambda i: p.sum(), [p], 1, lr=1e-3, name="x", progress=False, state={"masters": {}})


def test_the_8bit_optimizer_trains_and_resumes(family_dirs, tmp_path, monkeypatch):
    """bitsandbytes' 8-bit Adam where the package is installed (``pip install -e ".[8bit]"``)."""
    bnb = pytest.importorskip("bitsandbytes")
    from efface import load_pipeline

    p = torch.nn.Parameter(torch.ones(4096))
    trainer = Trainer([p], optimizer="adam", lr=1e-2, weight_decay=0.0, max_grad_norm=0.0,
                      active=Active(TrainingOptions(optimizer_8bit=True)))
    assert isinstance(trainer.optimizer, bnb.optim.Adam8bit)
    losses = []
    for _ in range(5):
        trainer.zero_grad()
        loss = (p**2).sum()
        losses.append(float(loss.detach()))
        trainer.backward(loss)
        trainer.step()
    assert losses[-1] < losses[0]
    _killed_and_resumed_equals_straight(load_pipeline(family_dirs("sd")), {"optimizer_8bit": True}, tmp_path,
                                        monkeypatch)
