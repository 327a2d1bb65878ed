"""The small VLM of bench/: its synthetic scenes, the vlm-mislabel task, and a build on a tiny
recipe that load_model takes and values exactly."""

import json
from collections import Counter

import numpy as np
import pytest

from forvalue.bench.evals import vlm_model
from forvalue.bench.evals.baselines import mean_hidden_states
from forvalue.bench.evals.methods import IMAGE_TASK_METHODS, methods_for
from forvalue.bench.evals.vlm_task import (
    COLOURS,
    SHAPES,
    VLM_CLASSES,
    VLM_FLIP_SHARE,
    VLM_QUESTION,
    make_vlm_task,
    scenes,
)
from forvalue.engine import Valuator, load_model

# A few seconds of building: a 16-pixel image in 4 patches, one tower layer, a few steps.
TINY = vlm_model.Recipe(image_size=16, patch_size=8, hidden_size=16, layers=1, heads=2, align_pool=8,
                        align_steps=2, align_batch=4, caption_steps=1, caption_batch=1, probe_scenes=0)


def pixels(scene):
    return np.asarray(scene.image())


def test_scenes_are_deterministic_and_balanced():
    first, again = scenes(48, seed=3), scenes(48, seed=3)
    assert first == again
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(pixels(first[0]), pixels(scenes(1, seed=4)[0]))
    assert Counter((s.shape, s.colour) for s in first) == {(shape, colour): 2 for shape in SHAPES
                                                            for colour in COLOURS}
    assert {s.count for s in first} == {1, 2, 3}
    assert pixels(first[0]).shape == (64, 64, 3)
    assert [s.caption() for s in scenes(2, seed=0, shapes=("cross",), counts=(2,))] == ["Two red crosses.",
                                                                                       "Two green crosses."]


def test_vlm_task_flips_and_validation_balance():
    task = make_vlm_task("small", seed=1)
    flipped, classes, given = task.train_meta("flipped"), task.train_meta("class"), task.train_meta("given")
    assert flipped.sum() == round(VLM_FLIP_SHARE * len(task.train))
    assert np.array_equal(given != classes, flipped.astype(bool))
    for sample, answer in zip(task.train, given, strict=True):
        user, assistant = sample["messages"]
        assert user["content"][1]["text"] == VLM_QUESTION
        assert assistant["content"] == f"It is a {VLM_CLASSES[answer]}"
    assert not task.valid_meta("flipped").any()
    assert Counter(task.valid_meta("class")) == {0: len(task.valid) // 2, 1: len(task.valid) // 2}
    again = make_vlm_task("small", seed=1)
    assert np.array_equal(np.asarray(again.train[5]["messages"][0]["content"][0]["image"]),
                          np.asarray(task.train[5]["messages"][0]["content"][0]["image"]))
    assert not np.array_equal(make_vlm_task("small", seed=2).train_meta("flipped"), flipped)


def test_image_task_methods_take_images():
    task = make_vlm_task("small")
    assert [m.name for m in methods_for(task, None, images=True)] == list(IMAGE_TASK_METHODS)
    with pytest.raises(ValueError, match=r"\['lora-less', 'tfidf-cosine'\] cannot value samples with images"):
        methods_for(task, ["forvalue-response", "lora-less", "tfidf-cosine"], images=True)


@pytest.mark.model
def test_tiny_build_loads_and_values_exactly(tmp_path, monkeypatch):
    folder = vlm_model.build_vlm(TINY, cache=tmp_path, log=lambda _: None)
    assert folder == vlm_model.vlm_folder(TINY, tmp_path)
    record = json.loads((folder / "build.json").read_text())
    assert record["recipe"]["align_steps"] == 2 and np.isfinite(record["caption"]["loss_last"])

    model = load_model(str(folder), device="cpu")
    task = make_vlm_task("small")
    train, valid = task.train[:3], task.valid[:2]
    (states,) = Valuator(model, progress=False).label_states(train[:1])
    assert sum(t in model.vision.image_token_ids for t in states.sample.input_ids) == TINY.image_tokens
    v = Valuator(model, progress=False)
    np.testing.assert_allclose(v.score(train, v.reference(valid)), v.pairwise(train, valid).mean(axis=1),
                               rtol=1e-5)
    # The representation baseline sees the image: the same text with another image differs.
    other = {**train[0], "messages": [{**train[0]["messages"][0], "content": [
        {"type": "image", "image": scenes(1, seed=9)[0].image()}, train[0]["messages"][0]["content"][1]]},
        train[0]["messages"][1]]}
    means = mean_hidden_states(model, [train[0], other]).numpy()
    assert not np.allclose(means[0], means[1])

    # Cached: a second call builds nothing.
    monkeypatch.setattr(vlm_model, "assemble", lambda *a: pytest.fail("rebuilt a cached model"))
    assert vlm_model.build_vlm(TINY, cache=tmp_path, log=lambda _: None) == folder
