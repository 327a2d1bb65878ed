"""Values equal autograd's <dW_a, dW_b> through each family's own forward, in float64."""

import numpy as np
import pytest
import torch

from forvalue.engine import Reference, ReferenceMismatch, SampleError, Valuation, Valuator, load_model

from tiny_models import autograd_gradient, frob, random_samples, tiny_model

KINDS = ["tied", "untied", "bias", "softcap", "scale"]


def gradients(model, samples):
    hf = model
    out = []
    for s in samples:
        mask = [bool(m) for m in s["loss_mask"]]
        mask[0] = False
        out.append(autograd_gradient(hf, s["input_ids"], mask))
    return out


@pytest.fixture(scope="module", params=KINDS)
def family(request):
    hf = tiny_model(request.param)
    return hf, load_model(hf, dtype=torch.float64)


def test_pairwise_self_and_score_equal_autograd(family):
    hf, model = family
    train, valid = random_samples(5, seed=1), random_samples(3, seed=2)
    Ga, Gb = gradients(hf, train), gradients(hf, valid)
    expected = np.array([[frob(a, b) for b in Gb] for a in Ga])

    v = Valuator(model, batch_tokens=32, progress=False)
    for route in ("gram", "outer", "auto"):
        np.testing.assert_allclose(v.pairwise(train, valid, route=route), expected, rtol=1e-5)
    np.testing.assert_allclose(v.self_value(train), [frob(a, a) for a in Ga], rtol=1e-5)
    ref = v.reference(valid)
    np.testing.assert_allclose(v.score(train, ref), expected.mean(axis=1), rtol=1e-5)


@pytest.mark.parametrize("normalize", ["mean", "cosine"])
def test_normalisations_equal_their_definition(normalize):
    hf = tiny_model("untied", seed=3)
    model = load_model(hf, dtype=torch.float64)
    train, valid = random_samples(4, seed=4), random_samples(3, seed=5)
    Ga, Gb = gradients(hf, train), gradients(hf, valid)
    if normalize == "mean":
        scale = [max(1, sum(s["loss_mask"][1:])) for s in train + valid]
    else:
        scale = [float(g.norm()) for g in Ga + Gb]
    Na = [g / c for g, c in zip(Ga, scale[:4], strict=True)]
    Nb = [g / c for g, c in zip(Gb, scale[4:], strict=True)]
    expected = np.array([[frob(a, b) for b in Nb] for a in Na])
    v = Valuator(model, normalize=normalize, progress=False)
    np.testing.assert_allclose(v.pairwise(train, valid), expected, rtol=1e-5)
    np.testing.assert_allclose(v.score(train, v.reference(valid)), expected.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(v.self_value(train), [frob(a, a) for a in Na], rtol=1e-5)


def test_float32_model_within_1e4():
    hf = tiny_model("untied", seed=6)
    train, valid = random_samples(4, seed=7), random_samples(2, seed=8)
    expected = np.array([[frob(a, b) for b in gradients(hf, valid)] for a in gradients(hf, train)])
    v = Valuator(load_model(hf, dtype=torch.float32), progress=False)
    np.testing.assert_allclose(v.pairwise(train, valid), expected, rtol=1e-4)


def test_token_values_sum_to_the_value():
    model = load_model(tiny_model("tied"), dtype=torch.float64)
    train, valid = random_samples(3, seed=9), random_samples(2, seed=10)
    v = Valuator(model, progress=False)
    values, tokens = v.score(train, v.reference(valid), token_values=True)
    for value, sample, tv in zip(values, train, tokens, strict=True):
        assert tv.values.sum() == pytest.approx(value, rel=1e-12)
        assert list(tv.positions) == [k for k, m in enumerate(sample["loss_mask"]) if m and k > 0]
        assert list(tv.token_ids) == [sample["input_ids"][k] for k in tv.positions]


def test_collect_mode_gives_nan_and_named_errors():
    model = load_model(tiny_model("tied"), dtype=torch.float64)
    v = Valuator(model, progress=False)
    good = random_samples(2, seed=11)
    bad = [{"id": "empty", "input_ids": [1, 2], "loss_mask": [1, 0]},
           {"id": "oov", "input_ids": [1, 500], "loss_mask": [0, 1]}]
    ref = v.reference(good)
    values, errors = v.score(good + bad, ref, errors="collect")
    assert np.isfinite(values[:2]).all() and np.isnan(values[2:]).all()
    assert [e.sample_id for e in errors] == ["empty", "oov"]
    assert "nothing to value" in str(errors[0]) and "outside the model's vocabulary" in str(errors[1])
    with pytest.raises(SampleError, match="'empty' \\(index 2\\)"):
        v.score(good + bad, ref)


def test_reference_round_trip_merge_and_mismatch(tmp_path):
    hf = tiny_model("untied", seed=12)
    model = load_model(hf, dtype=torch.float64)
    v = Valuator(model, progress=False)
    train, valid = random_samples(3, seed=13), random_samples(4, seed=14)
    ref = v.reference(valid)
    ref.save(tmp_path / "ref.safetensors")
    loaded = Reference.load(tmp_path / "ref.safetensors")
    assert loaded.count == 4 and loaded.identity == ref.identity
    np.testing.assert_array_equal(v.score(train, loaded), v.score(train, ref))
    merged = v.reference(valid[:2]).merge(v.reference(valid[2:]))
    np.testing.assert_allclose(v.score(train, merged), v.score(train, ref), rtol=1e-12)

    with pytest.raises(ReferenceMismatch, match="normalize"):
        Valuator(model, normalize="mean", progress=False).score(train, ref)
    other = load_model(tiny_model("untied", seed=99), dtype=torch.float64)
    with pytest.raises(ReferenceMismatch, match="model_hash"):
        Valuator(other, progress=False).score(train, ref)
    (tmp_path / "junk.safetensors").write_bytes(b"not a reference")
    with pytest.raises(ReferenceMismatch, match="cannot read"):
        Reference.load(tmp_path / "junk.safetensors")


def test_non_finite_hidden_states_are_refused():
    hf = tiny_model("untied", seed=15)
    with torch.no_grad():
        hf.model.embed_tokens.weight[7] = float("nan")
    model = load_model(hf, dtype=torch.float64)
    v = Valuator(model, progress=False)
    sample = {"id": "poisoned", "input_ids": [3, 7, 5], "loss_mask": [0, 1, 1]}
    with pytest.raises(SampleError, match=r"'poisoned'.*non-finite"):
        v.self_value([sample])


def test_the_result_methods_return_one_type_with_values_errors_and_token_values():
    model = load_model(tiny_model("untied", seed=5), dtype=torch.float64)
    v = Valuator(model, progress=False)
    train = random_samples(4, seed=6)
    train[2] = {"id": "bad", "input_ids": [1, 2], "loss_mask": [1, 0]}
    valid = random_samples(2, seed=7)
    reference = v.reference(valid)
    scored = v.score_result(train, reference, token_values=True)
    assert isinstance(scored, Valuation) and scored.values.shape == (4,)
    assert np.isnan(scored.values[2]) and [e.index for e in scored.errors] == [2]
    assert scored.token_values[2] is None
    assert scored.token_values[0].values.sum() == pytest.approx(scored.values[0], rel=1e-9)
    pairs = v.pairwise_result(train, valid)
    assert pairs.values.shape == (4, 2) and np.isnan(pairs.values[2]).all() and pairs.token_values is None
    np.testing.assert_allclose(pairs.values[[0, 1, 3]].mean(axis=1), scored.values[[0, 1, 3]], rtol=1e-9)
    own = v.self_value_result(train)
    assert [e.index for e in own.errors] == [2] and (own.values[[0, 1, 3]] > 0).all()
