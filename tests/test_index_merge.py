"""Merged tokens (``Index.build(max_tokens=...)``, engine/index/layout.py ``merge_tokens``):
a sample of more label tokens than ``max_tokens`` is stored as the directions of largest error
energy, so its values are those of ``G_r = E^T U_r U_r^T H``, checked against a float64
reference from full logits; shorter samples are stored as before; the label-token counts,
edits and refusals keep working."""

import json

import numpy as np
import pytest
import torch

from forvalue.engine import Index, IndexMismatch, ValuationConfig, Valuator, load_model
from forvalue.engine.index.layout import merge_tokens
from forvalue.engine.index.store import MANIFEST
from forvalue.engine.valuation.precondition import Preconditioner

from kernel_reference import dense_errors
from tiny_models import random_samples, tiny_model

MAX_TOKENS = 3


@pytest.fixture(scope="module")
def model():
    return load_model(tiny_model("softcap", seed=91), dtype=torch.float64)


@pytest.fixture(scope="module")
def pool():
    return random_samples(9, seed=92, min_len=2, max_len=16), random_samples(3, seed=93)


def build(model, train, folder, config, **options):
    options = {"sketch_rows": 0, "storage": "float32", "max_tokens": MAX_TOKENS, **options}
    return Index.build(train, folder, model=model, config=config, progress=False, **options)


def test_merging_keeps_the_error_energy_s_top_directions():
    """Against numpy's own eigenvectors: the merged gram is the top eigenvalues, ``E'^T H'`` is
    ``E^T`` times the projector on their span times ``H``; all of ``G`` at full rank, the sample
    untouched when short enough."""
    gen = np.random.default_rng(94)
    for size, keep in [(9, 4), (6, 6), (5, 1), (1, 1), (7, 9)]:
        E, H = gen.normal(size=(size, 13)), gen.normal(size=(size, 5))
        gram = torch.from_numpy((E @ E.T).reshape(-1))
        hidden, errors, merged, share = merge_tokens(torch.from_numpy(H), torch.from_numpy(E), gram, keep)
        if size <= keep:
            assert hidden.shape[0] == size and share == 1.0 and torch.equal(merged, gram)
            continue
        energy, basis = np.linalg.eigh(E @ E.T)
        top = basis[:, -keep:]
        projector = top @ top.T
        top_energy = np.diag(energy[::-1][:keep])
        np.testing.assert_allclose(errors.numpy().T @ hidden.numpy(), E.T @ projector @ H, atol=1e-10)
        np.testing.assert_allclose(merged.reshape(keep, keep).numpy(), top_energy, atol=1e-10)
        np.testing.assert_allclose(errors.numpy() @ errors.numpy().T, top_energy, atol=1e-10)
        assert share == pytest.approx(energy[-keep:].sum() / energy.sum())


def reference_g(model, states, max_tokens=None):
    """``G`` of each sample (``V x D``) from full float64 logits; merged to the ``max_tokens``
    top eigen-directions of ``E E^T`` where longer."""
    out = []
    for s in states:
        H = s.hidden.double().clone()  # out of inference mode: the oracle uses autograd
        _, _, E = dense_errors(H, model.head_weight.clone(), s.labels.clone(), **model.transform.kwargs())
        if max_tokens is not None and len(H) > max_tokens:
            _, basis = torch.linalg.eigh(E @ E.T)
            top = basis[:, -max_tokens:]
            E = top @ top.T @ E  # E^T (U U^T) H
        out.append(E.T @ H)
    return out


@pytest.mark.parametrize("normalize", ["none", "mean", "cosine"])
def test_a_merged_index_gives_the_merged_gradients_values(model, pool, tmp_path, normalize):
    """Within ``1e-6`` of the largest value (float32 storage): ``<G_r(a) P, Gbar>`` with ``P``
    from the validation set, divided as ``normalize`` says (``mean``: by the sample's label
    tokens, not the stored merged ones)."""
    train, valid = pool
    config = ValuationConfig(normalize=normalize, precondition="input", damping=0.1, batch_tokens=64)
    index = build(model, train, tmp_path / "index", config)
    found = index.values(valid).values[:, 0]
    valuator = Valuator(model, config=config, progress=False)
    train_states, valid_states = valuator.label_states(train), valuator.label_states(valid)
    hidden = torch.cat([s.hidden for s in valid_states]).double()
    identity = torch.eye(hidden.shape[1], dtype=torch.float64)
    P = Preconditioner(hidden.T @ hidden, len(hidden), 0.1).apply(identity)

    def divisor(g, s):
        return {"none": 1.0, "mean": len(s.labels), "cosine": float(torch.sqrt((g @ P * g).sum()))}[normalize]

    pairs = zip(reference_g(model, valid_states), valid_states, strict=True)
    target = sum(g / divisor(g, s) for g, s in pairs) / len(valid)
    expected = np.array([float((g @ P * target).sum()) / divisor(g, s) for g, s
                         in zip(reference_g(model, train_states, MAX_TOKENS), train_states, strict=True)])
    assert any(len(s.labels) > MAX_TOKENS for s in train_states)
    assert any(len(s.labels) <= MAX_TOKENS for s in train_states)
    assert np.abs(found - expected).max() <= 1e-6 * np.abs(expected).max()


def test_merged_values_differ_from_the_exact_ones_only_for_merged_samples(model, pool, tmp_path):
    train, valid = pool
    config = ValuationConfig(normalize="cosine", precondition="input", batch_tokens=64)
    merged = build(model, train, tmp_path / "merged", config).values(valid).values[:, 0]
    whole = build(model, train, tmp_path / "whole", config, max_tokens=None).values(valid).values[:, 0]
    counts = [len(s.labels) for s in Valuator(model, config=config, progress=False).label_states(train)]
    short = np.array(counts) <= MAX_TOKENS
    scale = np.abs(whole).max()
    assert np.abs(merged[short] - whole[short]).max() <= 1e-6 * scale  # float32 sums in other chunks
    assert np.abs(merged[~short] - whole[~short]).min() > 1e-4 * scale, (merged, whole)


def test_info_edits_and_refusals_of_a_merged_index(model, pool, tmp_path):
    train, valid = pool
    config = ValuationConfig(normalize="mean", batch_tokens=64)
    index = build(model, train, tmp_path / "index", config, shard_samples=4)
    info = index.info()
    counts = [len(s.labels) for s in Valuator(model, config=config, progress=False).label_states(train)]
    assert info["merged_samples"] == sum(n > MAX_TOKENS for n in counts)
    assert 0 < info["least_energy_kept"] < 1 and info["max_tokens"] == MAX_TOKENS
    assert info["label_tokens"] == sum(min(n, MAX_TOKENS) for n in counts)  # what is stored
    before = dict(zip(index.ids(), index.values(valid).values[:, 0], strict=True))
    index.delete([train[0]["id"], train[5]["id"]])
    index.compact()
    after = index.values(valid)
    kept = [before[i] for i in after.ids]
    assert after.values[:, 0].tolist() == pytest.approx(kept, rel=1e-6)  # the label-token counts kept
    with pytest.raises(IndexMismatch, match="identity: max_tokens"):  # another one does not resume it
        build(model, train, tmp_path / "index", config, max_tokens=MAX_TOKENS + 1)
    with pytest.raises(ValueError, match="max_tokens >= 1"):
        build(model, train, tmp_path / "other", config, max_tokens=0)
    manifest = json.loads((tmp_path / "index" / MANIFEST).read_text())
    assert manifest["identity"]["max_tokens"] == MAX_TOKENS
    plain = build(model, train, tmp_path / "plain", config, max_tokens=None)
    assert "max_tokens" not in plain.manifest["identity"]


def test_a_query_s_pool_p_is_the_unmerged_pool_s(model, pool, tmp_path):
    """The pool's moments are of the states before merging, with every label token counted, so
    a query (P from the pool) values unmerged samples as an index without merging does; after
    a short sample is deleted and compacted too."""
    train, valid = pool
    config = ValuationConfig(normalize="cosine", precondition="input", batch_tokens=64)
    merged = build(model, train, tmp_path / "merged", config, shard_samples=4)
    whole = build(model, train, tmp_path / "whole", config, shard_samples=4, max_tokens=None)
    states = Valuator(model, config=config, progress=False).label_states(train)
    counts = {s["id"]: len(x.labels) for s, x in zip(train, states, strict=True)}
    short = [i for i, n in counts.items() if n <= MAX_TOKENS]

    def check_same_pool(live):
        ours, theirs = merged.pool_preconditioner(), whole.pool_preconditioner()
        assert ours.tokens == theirs.tokens == sum(counts[i] for i in live)
        torch.testing.assert_close(ours.moment_sum, theirs.moment_sum, rtol=1e-12, atol=1e-9)
        found = [{a["id"]: a["value"] for a in index.query(valid[:1], top=len(train), exact=True)[0]["most"]}
                 for index in (merged, whole)]
        assert [found[0][i] for i in live if i in short] == \
            pytest.approx([found[1][i] for i in live if i in short], rel=1e-5)

    check_same_pool(list(counts))
    for index in (merged, whole):
        index.delete([short[0]])
        index.compact()
    check_same_pool([i for i in counts if i != short[0]])
