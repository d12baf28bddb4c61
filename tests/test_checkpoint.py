"""Checkpoint and resume (issue 14): a fit interrupted after a checkpoint and rerun gives exactly the
weights of an uninterrupted one (CPU, same seed), for every training method; a checkpoint of another
run is refused; ``efface erase --checkpoint-every`` survives a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import efface.methods  # noqa: F401  (registers the methods)
from efface.errors import InputError
from efface.methods import erase
from efface.models import checkpoint as checkpoint_module
from efface.toy.presets import method_inputs, method_preset


class Killed(BaseException):
    """Stands for the process dying right after a checkpoint was written."""


def killed_after(monkeypatch, writes: int) -> None:
    """Make the ``writes``-th checkpoint write (counting every loop's) raise :class:`Killed` once written."""
    real, count = checkpoint_module.Loop._write, [0]

    def write(self, iteration: int, done: bool) -> None:
        real(self, iteration, done)
        count[0] += 1
        if count[0] == writes:
            raise Killed

    monkeypatch.setattr(checkpoint_module.Loop, "_write", write)


def toy(name: str, **options) -> dict:
    return {"preset": method_preset(name), **method_inputs(name), **options}


# name -> (options, concepts, checkpoint writes before the kill: in a later loop where a fit has several);
# the killed loop resumes at iteration 2 (advunlearn: 3)
CASES = {
    "esd-x": (toy("esd-x", iterations=4, lr=1e-2, ddim_steps=4, batch_size=2), ["circle"], 2),
    # loops: ESD (1, done 2), then adversarial (1, 2, done 3): killed in the second at 2
    "race": (toy("race", esd_iterations=2, iterations=3, pgd_steps=2, lr=3e-3, ddim_steps=4, batch_size=2),
             ["circle"], 4),
    "ca": (toy("ca", iterations=4, lr=1e-2, batch_size=4, num_anchor_images=4, anchor_steps=4), ["circle"], 2),
    "salun": ({"iterations": 4, "lr": 1e-4, "batch_size": 4, "num_images": 8, "sample_steps": 4, "templates": ("{}",),
               "retain_target": "original", "alpha": 10.0}, ["circle"], 2),
    # an attack every 2 iterations, so that iteration 3 uses the adversarial embeddings restored from 2
    "advunlearn": (toy("advunlearn", iterations=5, warmup_iter=2, attack_step=2, lr=1e-3, ddim_steps=4, batch_size=2,
                       adv_prompt_update_step=2, retain_loss_w=3.0, templates=("{}",), retain_templates=("{}",)),
                   ["circle"], 3),
    # loops: discriminator warm-up (1, done 2), then UNet + discriminator (1, 2, done 3): killed at 2 of the second
    "doco": (toy("doco", iterations=5, warmup=2, lr=1e-2, batch_size=4, num_anchor_images=4, anchor_steps=4),
             ["circle"], 4),
    "receler": (toy("receler", iterations=4, lr=1e-2, ddim_steps=4, batch_size=2, adversarial_steps=1), ["circle"], 2),
    # one loop per concept (1, 2, done 3 each): killed at 2 of the second concept's
    "spm": (toy("spm", iterations=3, lr=5e-2, ddim_steps=4, batch_size=2, anchor_batch=2), ["circle", "star"], 5),
    "mace": (toy("mace", num_images=2, iterations=3, lr=1e-2, batch_size=2), ["circle", "star"], 5),
}


@pytest.fixture(scope="module")
def pipe(family_dirs):
    from efface import load_pipeline

    return load_pipeline(family_dirs("sd"))


def _weights(erased) -> dict[str, torch.Tensor]:
    out = {f"tensor.{k}": v for k, v in erased.tensors.items()}
    if erased.adapter is not None:
        out |= {f"adapter.{k}": v for k, v in erased.adapter.state_dict().items()}
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_fit_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(name, pipe, tmp_path, monkeypatch):
    options, concepts, writes = CASES[name]
    run = dict(seed=0, progress=False, preserve=["square"], **options)
    straight = _weights(erase(pipe, name, concepts, **run))
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        killed_after(m, writes)
        with pytest.raises(Killed):
            erase(pipe, name, concepts, checkpoint_dir=work, checkpoint_every=1, **run)
    resumed = erase(pipe, name, concepts, checkpoint_dir=work, checkpoint_every=1, **run)
    assert resumed.manifest["resumed"], f"{name} did not resume from its checkpoint"
    assert list(resumed.manifest["resumed"].values())[-1] == (3 if name == "advunlearn" else 2)
    assert straight.keys() == _weights(resumed).keys() and straight
    assert all(torch.equal(v, _weights(resumed)[k]) for k, v in straight.items()), f"{name}: resumed weights differ"


def test_a_checkpoint_of_another_run_is_refused(pipe, tmp_path, monkeypatch):
    options, concepts, _ = CASES["esd-x"]
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        killed_after(m, 1)
        with pytest.raises(Killed):
            erase(pipe, "esd-x", concepts, seed=0, progress=False, checkpoint_dir=work, checkpoint_every=1, **options)
    with pytest.raises(InputError, match=r"another run \(different config.lr\).*delete"):
        erase(pipe, "esd-x", concepts, seed=0, progress=False, checkpoint_dir=work, checkpoint_every=1,
              **{**options, "lr": 1e-3})
    with pytest.raises(InputError, match="different seed"):
        erase(pipe, "esd-x", concepts, seed=1, progress=False, checkpoint_dir=work, checkpoint_every=1, **options)
    with pytest.raises(InputError, match="checkpoint_every"):
        erase(pipe, "esd-x", concepts, progress=False, checkpoint_every=5, **options)


def test_sigkilled_erase_command_resumes_to_the_uninterrupted_weights(tiny_sd_dir, tmp_path):
    from efface.cli import main

    argv = ["erase", "--model", str(tiny_sd_dir), "--method", "esd-x", "--concept", "circle", "--seed", "0",
            "--set", "iterations=30", "--set", "ddim_steps=4", "--set", "lr=1e-2", "--checkpoint-every", "3"]
    out, work = tmp_path / "esd", tmp_path / "esd.work"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "efface", "-q", *argv, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while not list(work.glob("*.safetensors")):
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and not out.exists()

    assert main(["-q", *argv, "--out", str(out)]) == 0  # the same command again: resumes
    assert not work.exists()
    resumed_at = json.loads((out / "manifest.json").read_text())["resumed"]["00-esd-x"]
    assert 3 <= resumed_at < 30
    assert main(["-q", *argv, "--out", str(tmp_path / "straight")]) == 0
    a, b = load_file(out / "weights.safetensors"), load_file(tmp_path / "straight" / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
