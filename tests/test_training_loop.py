"""The resumable training loop shared by every toy-sd stage, and the whole recipe at tiny scale."""

from __future__ import annotations

import json

import pytest
import torch

from efface.toy import loop


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def loss(self, r: loop.StepRandom) -> torch.Tensor:
        x = torch.randn(8, 4, generator=r.torch)
        return (self.lin(x) - x.sum(1, keepdim=True)).pow(2).mean()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight = _Toy()
    loop.train("t", straight, straight.loss, steps=10, lr=0.05, seed=1, checkpoint=tmp_path / "a.ckpt",
               checkpoint_every=5, warmup=2)

    resumed = _Toy()
    calls = {"n": 0}

    def crashing(r):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return resumed.loss(r)

    with pytest.raises(KeyboardInterrupt):
        loop.train("t", resumed, crashing, steps=10, lr=0.05, seed=1, checkpoint=tmp_path / "b.ckpt",
                   checkpoint_every=5, warmup=2)
    again = _Toy()  # a fresh process: weights come from the checkpoint
    loop.train("t", again, again.loss, steps=10, lr=0.05, seed=1, checkpoint=tmp_path / "b.ckpt",
               checkpoint_every=5, warmup=2)
    for p, q in zip(straight.parameters(), again.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_nan_loss_stops_and_names_the_step(tmp_path):
    model = _Toy()

    def bad(r):
        return model.loss(r) * float("nan")

    with pytest.raises(loop.TrainingDiverged, match="at step 0"):
        loop.train("stage-x", model, bad, steps=5, lr=0.1, seed=0, checkpoint=tmp_path / "c.ckpt")
    assert not (tmp_path / "c.ckpt").exists()


def test_whole_recipe_runs_at_tiny_scale_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    from efface.toy.classifier import ToyClassifier
    from efface.toy.train import ToyRecipe, train_toy

    recipe = ToyRecipe(n_train=64, n_test=32, text_steps=2, vae_steps=2, classifier_steps=2, unet_steps=2)
    out = train_toy(recipe, tmp_path / "work", tmp_path / "out")
    pipe = StableDiffusionPipeline.from_pretrained(out / "toy-sd", local_files_only=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    ToyClassifier.load(out / "classifier")
    summary = json.loads((out / "training.json").read_text())
    assert set(summary["seconds"]) >= {"data", "text_encoder", "vae", "classifier", "unet"}
    with pytest.raises(FileExistsError):
        train_toy(recipe, tmp_path / "work", tmp_path / "out")
    # rerunning with the same work dir skips every finished stage
    train_toy(recipe, tmp_path / "work", tmp_path / "out2")
    assert json.loads((tmp_path / "work" / "times.json").read_text()) == summary["seconds"]
