"""The resumable training loop shared by every toy-sd stage, and the whole recipe at tiny scale."""

from __future__ import annotations

import json

import pytest
import torch

from efface.toy import TOY_SD, loop


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


@pytest.fixture(scope="module")
def tiny_toy_flux(tmp_path_factory):
    """toy-flux's whole recipe at tiny scale, on the bundled toy-sd's VAE and CLIP encoder."""
    from efface.toy.recipe import ToyRecipe
    from efface.toy.train_flux import train_toy_flux

    root = tmp_path_factory.mktemp("toy-flux")
    recipe = ToyRecipe(n_train=64, n_test=32, t5_steps=2, flux_steps=2)
    return recipe, root, train_toy_flux(recipe, root / "work", root / "out")


@pytest.mark.skipif(not (TOY_SD / "model_index.json").exists(), reason="bundled toy-sd not present")
def test_toy_flux_recipe_runs_at_tiny_scale_shares_toy_sd_and_resumes(tiny_toy_flux, tmp_path):
    from diffusers import AutoencoderKL, FluxPipeline

    from efface.models.families import family_of
    from efface.sampling import GenerationConfig, generate
    from efface.toy.train_flux import train_toy_flux

    recipe, root, out = tiny_toy_flux
    pipe = FluxPipeline.from_pretrained(out / "toy-flux", local_files_only=True)
    assert family_of(pipe).name == "flux" and not pipe.transformer.config.guidance_embeds
    images = generate(pipe, "a red circle", GenerationConfig(num_images=1, steps=2, guidance=3.0))
    assert images[0].size == (32, 32)  # the family's native size, not FluxPipeline's 1024 px
    base = AutoencoderKL.from_pretrained(TOY_SD / "vae")
    for name, p in base.state_dict().items():  # the same VAE, so one classifier judges both toy models
        assert torch.equal(p, pipe.vae.state_dict()[name]), name
    assert pipe.vae.config.shift_factor == 0.0 and pipe.tokenizer_2.model_max_length == 24
    summary = json.loads((out / "toy-flux" / "training.json").read_text())
    assert set(summary["seconds"]) >= {"t5_encoder", "transformer"}
    with pytest.raises(FileExistsError):
        train_toy_flux(recipe, root / "work", root / "out")
    times = json.loads((root / "work" / "times.json").read_text())
    train_toy_flux(recipe, root / "work", tmp_path / "out2")  # every finished stage is skipped
    assert json.loads((root / "work" / "times.json").read_text()) == times


def test_toy_flux_refuses_a_base_without_the_shared_components_before_any_work(tmp_path):
    from efface.errors import InputError
    from efface.toy.recipe import ToyRecipe
    from efface.toy.train_flux import train_toy_flux

    with pytest.raises(InputError, match="toy-sd pipeline directory"):
        train_toy_flux(ToyRecipe(), tmp_path / "work", tmp_path / "out", base=tmp_path)
    assert not (tmp_path / "work").exists()


@pytest.mark.skipif(not (TOY_SD / "model_index.json").exists(), reason="bundled toy-sd not present")
def test_toy_flux_trains_what_the_flux_family_calls(tiny_toy_flux):
    """The trainer's packing, ids and timestep scale are those of efface's Flux family (and so of
    FluxPipeline): the transformer trained on pack(x_t) at sigma is the one sampled at t = 1000 sigma."""
    from diffusers import FluxPipeline

    from efface.models.families import family_of
    from efface.toy.flux import pack

    pipe = FluxPipeline.from_pretrained(tiny_toy_flux[2] / "toy-flux", local_files_only=True)
    family = family_of(pipe)
    cond = family.encode(pipe, ["a red circle"])
    x = torch.randn(1, *family.latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    tokens, img_ids = pack(x)
    with torch.no_grad():
        ours = family.predict(pipe, x, 500, cond)
        direct = pipe.transformer(hidden_states=tokens, timestep=torch.tensor([0.5]), pooled_projections=cond.pooled,
                                  encoder_hidden_states=cond.embeds, txt_ids=torch.zeros(cond.embeds.shape[1], 3),
                                  img_ids=img_ids, return_dict=False)[0]
    assert torch.allclose(pack(ours)[0], direct, atol=1e-5)


def test_cli_toy_train_checks_base_before_any_work(tmp_path, caplog):
    from efface.cli import main

    work = tmp_path / "work"
    assert main(["toy", "train", "--base", str(tmp_path), "--work", str(work), "--out", str(tmp_path / "o")]) == 2
    assert "--base is for --model toy-flux" in caplog.text
    assert main(["toy", "train", "--model", "toy-flux", "--base", str(tmp_path), "--work", str(work),
                 "--out", str(tmp_path / "o")]) == 2
    assert "toy-sd pipeline directory" in caplog.text and not work.exists()


def test_a_work_directory_refuses_another_recipe_before_any_work(tmp_path):
    """A rerun with another recipe would skip the stages the first one finished: refused, saying
    which fields differ; a rerun that changes only the thread count goes on."""
    from efface.errors import InputError
    from efface.toy.recipe import ToyRecipe
    from efface.toy.train import pin_recipe, train_toy

    from dataclasses import asdict

    work = tmp_path / "work"
    work.mkdir()
    pin_recipe(work, "recipe.json", asdict(ToyRecipe(n_train=64)))
    pin_recipe(work, "recipe.json", asdict(ToyRecipe(n_train=64, threads=1)))  # threads change nothing made
    with pytest.raises(InputError, match="another recipe \\(n_train differ: n_train 64 -> 128\\).*new --work"):
        train_toy(ToyRecipe(n_train=128), work, tmp_path / "out")
    assert sorted(p.name for p in work.iterdir()) == ["recipe.json"]  # nothing was made
    assert json.loads((work / "recipe.json").read_text())["n_train"] == 64
