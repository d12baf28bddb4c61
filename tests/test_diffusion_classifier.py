"""Diffusion Classifier (arXiv 2303.16203): schedule, shared noise bank, exact pruning cost, metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny_pipeline
from efface.errors import InputError
from efface.metrics.diffusion_classifier import (
    DiffusionClassifier,
    DiffusionClassifierConfig,
    DiffusionClassifierRate,
    stage_positions,
    timestep_schedule,
)
from efface.models.diffusion import count_unet_evaluations
from efface.registry import METRICS

CANDIDATES = ["a circle", "a square", "a red star", "a heart"]
TOY = DiffusionClassifierConfig.toy()  # stages of 8 then 32 pairs, keeping 2 then 1 candidate
EXHAUSTIVE = DiffusionClassifierConfig(n_samples=(32,), to_keep=(1,))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny UNet's small batches gain nothing from threads and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def images(n: int, size: tuple[int, int] = (32, 32)) -> list[Image.Image]:
    return [Image.fromarray(np.random.RandomState(i).randint(0, 256, (*size[::-1], 3), dtype=np.uint8))
            for i in range(n)]


def test_schedule_is_the_official_evenly_spaced_one():
    full = timestep_schedule(1000, 500)
    assert full[:3] == [1, 3, 5] and full[-1] == 999 and len(full) == 500
    assert [full[p] for p in stage_positions(500, 50)][:3] == [11, 31, 51]
    assert timestep_schedule(1000, 32)[:2] == [15, 46] and stage_positions(32, 8) == [2, 6, 10, 14, 18, 22, 26, 30]


def test_same_seed_gives_same_scores_and_another_seed_other_scores(pipe):
    a = DiffusionClassifier(pipe, TOY, seed=3).scores(images(2), CANDIDATES)
    b = DiffusionClassifier(pipe, TOY, seed=3).scores(images(2), CANDIDATES)
    c = DiffusionClassifier(pipe, TOY, seed=4).scores(images(2), CANDIDATES)
    assert torch.equal(a.errors, b.errors) and a.predictions == b.predictions
    assert not torch.allclose(a.errors, c.errors)


def test_noise_bank_is_shared_by_candidates_and_images(pipe):
    dc = DiffusionClassifier(pipe, EXHAUSTIVE)
    img = images(1)
    s = dc.scores(img * 2, ["a circle", "a square", "a circle"])
    assert torch.equal(s.errors[:, 0], s.errors[:, 2])  # identical prompts, identical (t, noise) pairs
    assert torch.equal(s.errors[0], s.errors[1])  # the same image twice
    assert not torch.equal(s.errors[:, 0], s.errors[:, 1])
    assert s.predictions[0] != 2  # ties go to the lower index


def test_pruning_costs_exactly_the_staged_count_and_less_than_exhaustive(pipe):
    pruned, full = DiffusionClassifier(pipe, TOY), DiffusionClassifier(pipe, EXHAUSTIVE)
    with count_unet_evaluations() as hooked:
        p = pruned.scores(images(3), CANDIDATES)
    f = full.scores(images(3), CANDIDATES)
    per_image = 4 * 8 + 2 * (32 - 8)  # every candidate on 8 pairs, the 2 best on the 24 others
    assert pruned.unet_evaluations == hooked.value == 3 * per_image
    assert full.unet_evaluations == 3 * TOY.exhaustive_evaluations(4) == 3 * 4 * 32
    assert pruned.unet_evaluations < full.unet_evaluations
    assert sorted(p.pairs[0].tolist()) == [8, 8, 32, 32]
    survivors = p.pairs == 32  # they saw the exhaustive run's pairs: same mean errors
    torch.testing.assert_close(p.errors[survivors], f.errors[survivors])
    for i, winner in enumerate(p.predictions):
        assert survivors[i, winner] and p.errors[i, winner] == p.errors[i][survivors[i]].min()


def test_images_of_another_size_are_resized_and_a_factory_is_accepted():
    dc = DiffusionClassifier(build_tiny_pipeline, TOY, progress=False)
    assert len(dc.classify(images(2, (48, 40)), CANDIDATES)) == 2


@pytest.mark.parametrize("candidates, imgs, match", [
    ([], 1, "at least two candidate prompts"),
    (["a circle"], 1, "at least two candidate prompts"),
    (["a circle", ""], 1, "empty candidate prompt"),
    (["a circle", "a square"], 0, "no images to classify"),
])
def test_bad_input_is_refused_with_what_to_do(pipe, candidates, imgs, match):
    with pytest.raises(InputError, match=match):
        DiffusionClassifier(pipe, TOY).classify(images(imgs), candidates)


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="one entry per stage"):
        DiffusionClassifierConfig(n_samples=(8, 32), to_keep=(1,))
    with pytest.raises(InputError, match="increasing"):
        DiffusionClassifierConfig(n_samples=(32, 8), to_keep=(2, 1))
    with pytest.raises(InputError, match="loss"):
        DiffusionClassifierConfig(loss="l3")


def test_rate_metric_counts_target_wins_and_says_what_judged(pipe):
    assert METRICS.get("diffusion-classifier") is DiffusionClassifierRate
    rate = DiffusionClassifierRate(pipe, CANDIDATES, target=1, config=TOY, seed=0)
    rate.update(images(3))
    expected = DiffusionClassifier(pipe, TOY, seed=0).classify(images(3), CANDIDATES)
    out = rate.compute()
    assert out == {"rate": float(np.mean([p == 1 for p in expected])), "count": 3, "unet_evaluations": 3 * 80}
    prov = rate.provenance()
    assert prov["candidates"] == CANDIDATES and prov["evaluator"]["config"]["n_samples"] == (8, 32)
    rate.reset()
    assert rate.compute() == {"rate": None, "count": 0, "unet_evaluations": 0}
    with pytest.raises(InputError, match="target"):
        DiffusionClassifierRate(pipe, CANDIDATES, target=4, config=TOY)


@pytest.mark.slow
def test_toy_sd_recognises_the_shape_it_drew(toy):
    from efface.sampling import GenerationConfig, generate_many
    from efface.toy.world import SHAPES

    imgs = generate_many(toy, [f"a {s}" for s in SHAPES], GenerationConfig(steps=20, guidance=7.5), seed=0)
    assert DiffusionClassifier(toy, TOY).classify(imgs, [f"a {s}" for s in SHAPES]) == list(range(len(SHAPES)))


@pytest.mark.parametrize("family", ["sd2-v", "sdxl", "sd3", "flux"])
def test_every_model_family_is_judged_and_its_denoiser_calls_counted(family):
    from families import build

    dc = DiffusionClassifier(build(family), TOY, progress=False)
    with count_unet_evaluations() as hooked:
        s = dc.scores(images(2), CANDIDATES)
    assert all(0 <= p < len(CANDIDATES) for p in s.predictions) and torch.isfinite(s.errors).all()
    assert dc.unet_evaluations == hooked.value == 2 * (4 * 8 + 2 * (32 - 8))


def test_flow_matching_error_is_against_the_velocity():
    """Flux: x_t = (1 - t/T) x_0 + (t/T) eps and the model is compared with eps - x_0 (not eps)."""
    from families import build

    from efface.models.diffusion import predict
    from efface.models.text import encode

    pipe = build("flux")
    dc = DiffusionClassifier(pipe, DiffusionClassifierConfig(n_samples=(4,), to_keep=(1,)), seed=7, progress=False)
    img, prompts = images(1), ["a circle", "a square"]
    errors = dc.scores(img, prompts).errors[0]
    x0 = dc._latent(img[0])
    t = torch.tensor(timestep_schedule(1000, 4))
    noise = torch.randn((4, *x0.shape[1:]), generator=torch.Generator("cpu").manual_seed(7))
    sigma = (t.float() / 1000).view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * noise
    with torch.no_grad():
        for c, prompt in enumerate(prompts):
            out = predict(pipe, x_t, t, encode(pipe, prompt))
            want = ((out - (noise - x0)) ** 2).mean(dim=(1, 2, 3)).double().mean()
            torch.testing.assert_close(errors[c], want)
