"""Baselines of the quality benchmark against their definitions, on tiny random models."""

import copy

import numpy as np
import pytest
import torch

from forvalue.bench.evals import baselines
from forvalue.engine import Valuator, load_model

from tiny_models import random_samples, tiny_model


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_model("untied", seed=11)
    return hf, load_model(hf, dtype=torch.float32)


@pytest.mark.parametrize("kind", ["tied", "softcap", "bias"])
@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_autograd_baseline_equals_forvalue(kind, loss_on):
    model = load_model(tiny_model(kind, seed=1), dtype=torch.float32)
    train, valid = random_samples(6, seed=2), random_samples(3, seed=3)
    valuator = Valuator(model, loss_on=loss_on, progress=False)
    exact = valuator.pairwise(train, valid)
    # memory_gb so small that each validation gradient is a block of its own.
    got = baselines.autograd_values(model, train, valid, loss_on=loss_on, memory_gb=1e-9, train_chunk=4)
    assert np.abs(got - exact).max() <= 1e-4 * np.abs(exact).max()
    reference = baselines.autograd_values(model, train, valid, loss_on=loss_on, reference=True)
    score = valuator.score(train, valuator.reference(valid))
    assert np.abs(reference - score).max() <= 1e-4 * np.abs(score).max()


def _explicit_datainf(train_blocks, valid_blocks, damping):
    """``v^T mean_i (g_i g_i^T + lam I)^-1 g`` with a real matrix inverse, per block."""
    total = 0
    for G, V in zip(train_blocks, valid_blocks, strict=True):
        G, V = G.double(), V.double()
        lam = damping * float(G.square().sum(1).mean())
        eye = torch.eye(G.shape[1], dtype=torch.float64)
        inverse = sum(torch.linalg.inv(torch.outer(g, g) + lam * eye) for g in G) / len(G)
        total = total + (G @ inverse @ V.T).numpy()
    return total


def test_datainf_equals_explicit_inverse():
    gen = torch.Generator().manual_seed(0)
    train = [torch.randn(7, 5, generator=gen), torch.randn(7, 3, generator=gen) * 4]
    valid = [torch.randn(4, 5, generator=gen), torch.randn(4, 3, generator=gen)]
    got = baselines.datainf_values(train, valid, damping=0.1)
    np.testing.assert_allclose(got, _explicit_datainf(train, valid, 0.1), rtol=1e-9)


def _grads(train, valid, avg, avg_sq):
    sizes = [3, 2]
    return baselines.LoraGradients(["a", "b"], sizes, train, valid, avg, avg_sq, 0.0, 0.0)


def test_tracin_and_less_by_definition():
    gen = torch.Generator().manual_seed(1)
    train, valid = torch.randn(4, 5, generator=gen), torch.randn(2, 5, generator=gen)
    avg, avg_sq = torch.randn(5, generator=gen), torch.rand(5, generator=gen)
    grads = _grads(train, valid, avg, avg_sq)
    np.testing.assert_allclose(baselines.tracin_values(grads), (train @ valid.T).numpy(), rtol=1e-6)
    update = (0.9 * avg + 0.1 * train) / torch.sqrt(0.999 * avg_sq + 0.001 * train**2 + 1e-8)
    expected = np.array([[float(torch.cosine_similarity(u, v, dim=0)) for v in valid] for u in update])
    np.testing.assert_allclose(baselines.less_values(grads), expected, rtol=1e-5)
    assert [b.shape[1] for b in grads.blocks(train)] == [3, 2]


def test_lora_gradients_equal_peft_on_the_whole_model(tiny):
    hf, model = tiny
    train, valid = random_samples(3, seed=4), random_samples(2, seed=5)
    # lr=0: the warm-up leaves the adapters as initialised, so the whole-model copy below
    # (same seed, same injection order) holds the same adapters.
    grads = baselines.lora_gradients(model, train, valid, loss_on="response", lr=0.0, seed=7)
    assert grads.train.shape == (3, sum(grads.sizes)) and grads.valid.shape == (2, sum(grads.sizes))
    assert not any("lora" in name for name, _ in model.backbone.named_parameters())  # untouched

    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(7)
    whole = copy.deepcopy(hf).float()
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                       target_modules=list(baselines.LORA_TARGETS)), whole.model)
    params = [p.requires_grad_(True) for name, p in whole.named_parameters() if "lora_" in name]
    for row, sample in enumerate(train):
        ids = torch.tensor([sample["input_ids"]])
        labels = torch.where(torch.tensor([sample["loss_mask"]]) == 1, ids, -100)
        labels[0, 0] = -100
        loss = whole(input_ids=ids, labels=labels, use_cache=False).loss  # mean label NLL
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        torch.testing.assert_close(grads.train[row], expected, rtol=1e-4, atol=1e-6)


def test_lora_warm_up_makes_both_factors_learn(tiny):
    _, model = tiny
    train, valid = random_samples(8, seed=6), random_samples(2, seed=7)
    grads = baselines.lora_gradients(model, train, valid, loss_on="all", lr=1e-2)
    for name, block in zip(grads.names, grads.blocks(grads.train), strict=True):
        assert block.abs().sum() > 0, f"{name} has no gradient after the warm-up"
    assert grads.adam_avg_sq.sum() > 0 and grads.warmup_seconds > 0


def test_tfidf_by_hand():
    # Documents (a b), (a c !), (a): df a=3, b=c=!=1; idf = ln((1 + 3) / (1 + df)) + 1.
    idf_a, idf_1 = np.log(4 / 4) + 1, np.log(4 / 2) + 1
    got = baselines.tfidf_similarity(["a b", "A c!"], ["a"])
    expected = [idf_a / np.sqrt(idf_a**2 + idf_1**2), idf_a / np.sqrt(idf_a**2 + 2 * idf_1**2)]
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-12)
    assert baselines.words_of("A c!") == ["a", "c", "!"]


def test_tfidf_of_identical_texts_is_one():
    got = baselines.tfidf_similarity(["the cat sat", "a dog"], ["the cat sat"])
    assert got[0, 0] == pytest.approx(1.0)
    assert got[1, 0] == pytest.approx(0.0)


def test_representation_similarity(tiny):
    _, model = tiny
    samples = random_samples(3, seed=8)
    got = baselines.representation_similarity(model, samples, samples)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(np.diag(got), 1.0, rtol=1e-6)
    ids = torch.tensor([samples[0]["input_ids"]])
    mean = model.hidden_states(ids, torch.ones_like(ids))[0].double().mean(0)
    torch.testing.assert_close(baselines.mean_hidden_states(model, samples[:1])[0], mean)


def test_rds_plus_by_hand(tiny):
    """Each sample run alone (no padding): token i of n weighted i / (n (n + 1) / 2), the
    pooled states L2-normalised, each training sample's best cosine over the validation set."""
    hf, _ = tiny
    model = load_model(hf, dtype=torch.float64)
    train, valid = random_samples(5, seed=9, min_len=2, max_len=17), random_samples(3, seed=10)

    def pooled(sample):
        ids = torch.tensor([sample["input_ids"]])
        hidden = model.hidden_states(ids, torch.ones_like(ids))[0].double()
        weights = torch.arange(1, len(hidden) + 1, dtype=torch.float64)
        vector = (weights[:, None] * hidden).sum(0) / weights.sum()
        return vector / vector.norm()

    cosines = np.array([[float(pooled(a) @ pooled(b)) for b in valid] for a in train])
    pairs = baselines.rds_plus_values(model, train, valid, reference=False)
    np.testing.assert_allclose(pairs, cosines, rtol=1e-9, atol=1e-12)
    best = baselines.rds_plus_values(model, train, valid, reference=True)
    np.testing.assert_allclose(best, cosines.max(axis=1), rtol=1e-9, atol=1e-12)
    assert not np.allclose(pairs, baselines.representation_similarity(model, train, valid))
