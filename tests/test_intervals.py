"""``--seeds`` and the 95 % bootstrap intervals: every prompt once per seed (a file's own seeds offset
by each), the interval over prompts and seeds (properties of the two-way bootstrap)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efface.errors import InputError
from efface.evaluation import EvalConfig, evaluate, intervals
from efface.metrics.stats import bootstrap_interval
from efface.protocols.base import EvalPrompt
from efface.suites.base import Group, expand, seed_offsets


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1), min_size=3, max_size=3), min_size=1, max_size=4),
       st.integers(1, 3))
def test_the_interval_lies_within_the_values_and_is_ordered(blocks, seeds):
    values = [v for block in blocks for v in block] * seeds  # seeds x the same prompts, repeated
    low, high = bootstrap_interval({"g": values}, seeds, resamples=200)
    assert min(values) - 1e-12 <= low <= high <= max(values) + 1e-12


def test_constant_values_give_a_point_and_more_prompts_a_narrower_interval():
    assert bootstrap_interval({"g": [0.5] * 10}) == (0.5, 0.5)
    rng = np.random.default_rng(0)
    few = bootstrap_interval({"g": rng.integers(0, 2, 20).tolist()})
    many = bootstrap_interval({"g": rng.integers(0, 2, 2000).tolist()})
    assert many[1] - many[0] < (few[1] - few[0]) / 3


def test_the_interval_is_of_the_mean_of_group_means_and_seeded():
    groups = {"a": [0.0] * 50, "b": [1.0] * 50}
    assert bootstrap_interval(groups) == (0.5, 0.5)  # every resample: mean(0, 1)
    noisy = {"a": list(np.random.default_rng(1).random(30))}
    assert bootstrap_interval(noisy, seed=3) == bootstrap_interval(noisy, seed=3)
    with pytest.raises(ValueError, match="blocks"):
        bootstrap_interval({"a": [1.0, 0.0, 1.0]}, 2)


def test_seed_variation_widens_the_interval():
    """Two seeds that disagree on every prompt: the two-way bootstrap sees the seed variance."""
    same = bootstrap_interval({"g": [0.5] * 40}, 2)
    split = bootstrap_interval({"g": [0.0] * 20 + [1.0] * 20}, 2)
    assert same == (0.5, 0.5) and split[0] < 0.2 and split[1] > 0.8


def test_intervals_report_mean_bounds_and_counts():
    out = intervals({"effectiveness.target_rate": {"a": [1.0, 0.0, 1.0, 1.0]}, "empty": {"a": []}}, 2)
    entry = out["effectiveness.target_rate"]
    assert entry["mean"] == 0.75 and entry["n_images"] == 4 and entry["seeds"] == 2 and entry["low"] <= entry["high"]
    assert "empty" not in out


def test_seeds_offset_a_files_seeds_and_number_the_others():
    group = Group("g", [EvalPrompt("a", seed=41), EvalPrompt("b"), EvalPrompt("c", seed=7)])
    (once,) = expand([group], None, 100)
    assert [p.seed for p in once.prompts] == [41, 101, 7]
    (twice,) = expand([group], [0, 10], 100)
    assert [(p.prompt, p.seed) for p in twice.prompts] == [("a", 41), ("b", 1), ("c", 7), ("a", 51), ("b", 11),
                                                          ("c", 17)]
    assert seed_offsets("") is None and seed_offsets("0, 1,2") == [0, 1, 2]


@pytest.mark.parametrize("bad", ["a,b", "1,1", ",", "-1"])
def test_bad_seed_lists_are_refused_when_the_config_is_made(bad):
    with pytest.raises(InputError):
        EvalConfig(seeds=bad)


def test_toy_evaluation_once_per_seed(toy):
    fast = dict(n=2, n_other=1, steps=4, kid_subsets=2)
    plain = evaluate(toy, None, "circle", config=EvalConfig(**fast), seed=0)
    zero = evaluate(toy, None, "circle", config=EvalConfig(**fast, seeds="0"), seed=0)
    assert zero["effectiveness"] == plain["effectiveness"]  # offset 0: the same seeds
    two = evaluate(toy, None, "circle", config=EvalConfig(**fast, seeds="0,1000"), seed=0)
    target = two["intervals"]["effectiveness.target_rate"]
    assert target["n_images"] == 2 * plain["intervals"]["effectiveness.target_rate"]["n_images"] == 4
    assert target["seeds"] == 2 and target["mean"] == two["effectiveness"]["target_rate"]
    assert two["provenance"]["prompts"] == plain["provenance"]["prompts"]
    assert two["provenance"]["prompt_seeds"]["circle/target"] == [0, 1, 1000, 1001]
