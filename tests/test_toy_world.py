"""The toy world: vocabulary splits, captions, drawing and tokenizer."""

from __future__ import annotations

import random

import numpy as np
import pytest

from efface.errors import InputError
from efface.toy import draw, world
from efface.toy.tokenizer import MAX_LENGTH, write_tokenizer


def test_world_has_the_promised_axes():
    assert len(world.SHAPES) >= 6 and len(world.COLOURS) >= 5 and len(world.STYLES) >= 4
    assert set(world.SYNONYMS) == set(world.SHAPES + world.COLOURS + world.STYLES)


@pytest.mark.parametrize("concept", list(world.SYNONYMS))
def test_train_and_heldout_synonyms_are_disjoint_and_canonical_first(concept):
    train, heldout = world.synonyms(concept, "train"), world.synonyms(concept, "heldout")
    assert train[0] == concept
    assert not set(train) & set(heldout)
    assert len(train) >= 2 and len(heldout) >= 2


def test_heldout_templates_are_new_and_name_every_axis():
    assert not set(world.TRAIN_TEMPLATES) & set(world.HELDOUT_TEMPLATES)
    for t in world.HELDOUT_TEMPLATES:
        assert all(slot in t for slot in ("{s}", "{c}", "{t}"))


def test_heldout_captions_use_only_heldout_words():
    rng = random.Random(0)
    train_only = {w for c in world.SYNONYMS for w in world.synonyms(c, "train")}
    for _ in range(200):
        text, named = world.caption(world.random_scene(rng), rng, "heldout")
        assert all(named.values())
        for word in train_only:
            assert f" {word} " not in f" {text.replace(',', ' ')} ", (word, text)


def test_prompts_for_names_the_concept_in_every_prompt():
    rng = random.Random(1)
    for p in world.prompts_for("circle", "heldout", rng=rng, n=20):
        assert any(w in p for w in world.synonyms("circle", "heldout"))


def test_unknown_concept_is_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match="circle"):
        world.axis_of("dog")


def test_drawing_is_seeded_and_masks_cover_the_shape():
    a, b = draw.dataset(20, seed=3), draw.dataset(20, seed=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    images, masks, labels = a
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert (masks.mean((1, 2)) > 0.1).all()
    assert labels.shape == (20, 3)
    assert not np.array_equal(draw.dataset(20, seed=4)[0], images)


def test_tokenizer_makes_every_toy_word_one_token(tmp_path):
    tok = write_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    assert tok.model_max_length == MAX_LENGTH
    for word in world.vocabulary():
        if " " not in word:
            assert len(tok(word).input_ids) == 3, word
    # any text still tokenizes, character by character
    assert len(tok("zebra").input_ids) > 3


def test_registry_lists_valid_names_on_unknown():
    from efface.registry import Registry

    reg: Registry = Registry("method")
    reg.register("uce")(object)
    with pytest.raises(InputError, match="valid methods: uce"):
        reg.get("ucee")
    with pytest.raises(ValueError):
        reg.register("Bad_Name")
