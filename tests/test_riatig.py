"""RIATIG's official word slots (issue 13): one slot per word of the prompt whatever the edits, so
crossover lines up; the target-sentence substitution never brings the concept back."""

from __future__ import annotations

import torch

from efface.attacks.base import AttackContext
from efface.attacks.riatig import RIATIG
from efface.models.loading import load_pipeline
from efface.sampling import GenerationConfig

from test_attacks import pixel_features


def test_edits_keep_one_slot_per_word_and_never_the_concept(tiny_sd_dir):
    original = erased = load_pipeline(str(tiny_sd_dir))
    original.set_progress_bar_config(disable=True)
    attack = RIATIG(neighbours=5)
    images = [original("a red circle", num_inference_steps=1, output_type="pil").images[0]]
    ctx = AttackContext(erased, "circle", ["a red circle on dots"], [0], original, images,
                        torch.Generator().manual_seed(0), GenerationConfig(steps=1), False, features=pixel_features)
    attack._prepare(ctx)
    prompt = "a red circle on dots".split()
    target = ["red", "dots"]
    seen_split = seen_target = False
    for _ in range(300):
        out = attack._mutate(ctx, prompt, first=True, target=target)
        assert len(out) == len(prompt)
        changed = [j for j, (a, b) in enumerate(zip(prompt, out)) if a != b]
        assert len(changed) <= 1 and "circle" not in [out[j] for j in changed]
        seen_split |= any(" " in w for w in out)
        seen_target |= any(out[j] in target and out[j] != prompt[j] for j in changed)
    assert seen_split and seen_target
