"""Seeds are checked like every other option: a negative, non-integer or too large seed is an
InputError naming it, before any work, wherever a seed enters (erase, fit, attacks, generation, CLI)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import efface.attacks  # noqa: F401  (registers the attacks)
from efface.cli import main
from efface.config import check_seed
from efface.errors import InputError
from efface.methods import erase
from efface.methods.base import ErasureRequest
from efface.models.diffusion import count_denoiser_evaluations
from efface.registry import ATTACKS, METHODS
from efface.sampling import GenerationConfig, generate, generate_many

BAD = [-1, 1.5, "3", True, None, 2**32]


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    from efface import load_pipeline

    return load_pipeline(tiny_sd_dir)


def test_check_seed_takes_integers_in_range_only():
    assert check_seed(0) == 0 and check_seed(np.int64(7)) == 7 and check_seed(2**32 - 1) == 2**32 - 1
    assert check_seed(2**40, limit=2**64 - 1) == 2**40
    for bad in BAD:
        with pytest.raises(InputError, match=r"seed must be an integer in \[0, 4294967295\], not "):
            check_seed(bad)


@pytest.mark.parametrize("seed", BAD)
def test_erase_and_fit_refuse_a_bad_seed_before_any_work(pipe, seed):
    with count_denoiser_evaluations() as n:
        with pytest.raises(InputError, match="seed must be an integer"):
            erase(pipe, "esd-x", ["a cat"], seed=seed, progress=False, iterations=1, ddim_steps=2)
        with pytest.raises(InputError, match="seed must be an integer"):
            METHODS.get("uce")().fit(pipe, ErasureRequest.build(["a cat"]), seed=seed, progress=False)
    assert n.value == 0


def test_attack_run_and_generation_refuse_bad_seeds(pipe):
    gen = GenerationConfig(num_images=1, steps=1, batch_size=1)
    attack = ATTACKS.get("unlearndiffatk")()
    with count_denoiser_evaluations() as n:
        with pytest.raises(InputError, match="seed must be an integer"):
            attack.run(pipe, "cat", ["a cat"], original=pipe, seed=-1, generation=gen, progress=False)
        with pytest.raises(InputError, match=r"seeds\[1\] must be an integer"):
            attack.run(pipe, "cat", ["a cat", "the cat"], seeds=[0, -5], original=pipe, generation=gen,
                       progress=False)
        with pytest.raises(InputError, match="seed must be an integer"):
            generate(pipe, "a cat", gen, seed=-2)
        with pytest.raises(InputError, match=r"seeds\[0\] must be an integer"):
            generate_many(pipe, ["a cat"], gen, seeds=[0.5])
    assert n.value == 0


def test_cli_refuses_a_negative_seed_with_a_message(tiny_sd_dir, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = main(["generate", "--model", str(tiny_sd_dir), "--prompt", "a cat", "--num-images", "1",
                     "--steps", "1", "--seed", "-3", "--out", str(tmp_path / "g")])
    assert code == 2 and "--seed must be an integer in [0, 4294967295], not -3" in caplog.text
    assert not (tmp_path / "g").exists()
