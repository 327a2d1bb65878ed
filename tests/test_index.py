"""The index (engine/index/): with the identity sketch it equals the exact values of the
Valuator (float64 models, several families, every normalisation, with and without the
preconditioner and the skip readout); the Gaussian sketch is unbiased; builds resume after a
kill, parts merge into the whole, appends, deletes and compaction keep every value; what does
not match is refused by name."""

import json

import numpy as np
import pytest
import torch

from forvalue.engine import Index, IndexMismatch, ValuationConfig, Valuator, load_model
from forvalue.engine.index import coarse, lists, writer
from forvalue.engine.index.layout import Sketch, encode, moments_of, target_of
from forvalue.engine.index.store import MANIFEST
from forvalue.engine.valuation.precondition import Preconditioner

from tiny_models import random_samples, tiny_model

EXACT = 0  # sketch rows: the identity sketch
OPTIONS = [dict(normalize="none"), dict(normalize="cosine", precondition="input"),
           dict(normalize="mean", precondition="input", damping=0.1), dict(normalize="cosine")]


@pytest.fixture(scope="module", params=["untied", "softcap", "bias"])
def model(request):
    return load_model(tiny_model(request.param, seed=81), dtype=torch.float64)


@pytest.fixture(scope="module")
def pool():
    return random_samples(11, seed=82), random_samples(4, seed=83)


def build(model, train, folder, config, **options):
    options = {"sketch_rows": EXACT, "storage": "float32", **options}
    return Index.build(train, folder, model=model, config=config, progress=False, **options)


def values(index, valid, columns="mean"):
    found = index.values(valid, columns=columns)
    return dict(zip(found.ids, found.values[:, 0].tolist(), strict=True))


def own_scales(model, config, samples, valid):
    """``sqrt(v(x, x))`` of each sample under the validation set's ``P`` and the normalisation."""
    if config.precondition is not None:  # the same P through an external covariance
        config = config.replace(damping=config.damping or 0.01)
    covariance = valid if config.precondition else None
    valuator = Valuator(model, config=config, covariance=covariance, progress=False)
    return np.sqrt(np.diag(valuator.pairwise(samples, samples)))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("skip_depth", [None, 0.5])
def test_the_identity_sketch_gives_the_exact_values(model, pool, tmp_path, options, skip_depth):
    """Within ``1e-5 sqrt(v(a, a) v(b, b))`` (against the mean: ``sqrt(v(b, b))`` averaged)."""
    train, valid = pool
    config = ValuationConfig(**options, skip_depth=skip_depth, batch_tokens=48)
    exact = Valuator(model, config=config, progress=False)
    index = build(model, train, tmp_path / "index", config, shard_samples=4)
    mean, pairs = index.values(valid), index.values(valid, columns="each")
    assert mean.ids == [s["id"] for s in train] and mean.values.shape == (11, 1)
    scales = own_scales(model, config, train + valid, valid)
    train_scale, valid_scale = scales[:11], scales[11:]
    expected = exact.score(train, exact.reference(valid))
    assert np.all(np.abs(mean.values[:, 0] - expected) <= 1e-5 * train_scale * valid_scale.mean())
    pair_scale = np.outer(train_scale, valid_scale)
    assert np.all(np.abs(pairs.values - exact.pairwise(train, valid)) <= 1e-5 * pair_scale)


def test_the_sketched_inner_product_is_unbiased(tmp_path):
    """Raw <G(a) P, G(b)> over 600 sketch seeds: the mean lies within 4 standard errors of the
    exact value (cosine ratios are biased: raw inner products are tested)."""
    model = load_model(tiny_model("untied", seed=84), dtype=torch.float64)
    config = ValuationConfig(precondition="input", batch_tokens=48)
    valuator = Valuator(model, config=config, progress=False)
    a, b = random_samples(2, seed=85, min_len=8)
    exact = float(valuator.pairwise([a], [b])[0, 0])
    states = valuator.label_states([a, b])
    pre = valuator._preconditioner([states[1]], None, own_side=True)
    draws = []
    for seed in range(600):
        sketch = Sketch(model.vocab_size, 8, seed).matrix().double()
        stored = encode([states[0]], valuator.math, sketch)
        target = target_of([states[1]], valuator.math, sketch, pre, "none", "mean")
        draws.append(float(target.values(stored.hidden, stored.errors, stored.gram, stored.sizes)[0, 0]))
    draws = np.array(draws)
    assert abs(draws.mean() - exact) < 4 * draws.std(ddof=1) / np.sqrt(len(draws))
    assert draws.std() > 1e-3 * abs(exact)  # a sketch of 8 rows is noisy: the test can fail


def test_a_killed_build_resumes_and_parts_merge_into_the_whole(pool, tmp_path, monkeypatch):
    model = load_model(tiny_model("untied", seed=86), dtype=torch.float64)
    train, valid = pool
    config = ValuationConfig(batch_tokens=48)
    whole = values(build(model, train, tmp_path / "whole", config, shard_samples=3), valid)
    written = []
    original = writer.ShardWriter._write

    def killed_after_two(self, source, samples, rows):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(rows)
        original(self, source, samples, rows)

    monkeypatch.setattr(writer.ShardWriter, "_write", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(model, train, tmp_path / "resumed", config, shard_samples=3)
    monkeypatch.setattr(writer.ShardWriter, "_write", lambda self, source, samples, rows: (
        written.append(rows), original(self, source, samples, rows)))
    resumed = build(model, train, tmp_path / "resumed", config, shard_samples=3)
    assert [r[0] for r in written] == [0, 3, 6, 9]  # the first two shards were not valued again
    assert values(resumed, valid) == pytest.approx(whole, rel=1e-6)
    parts = [build(model, train, tmp_path / f"part{i}", config, shard=(i, 2)) for i in range(2)]
    assert [p.samples for p in parts] == [5, 6]
    merged = Index.merge([p.folder for p in parts], tmp_path / "merged")
    merged = Index.open(merged.folder, model, config, progress=False)
    assert values(merged, valid) == pytest.approx(whole, rel=1e-6)


def test_append_delete_and_compact_keep_every_value(pool, tmp_path):
    model = load_model(tiny_model("untied", seed=87), dtype=torch.float64)
    train, valid = pool
    more = random_samples(5, seed=88)
    config = ValuationConfig(normalize="cosine", precondition="input", batch_tokens=48)
    whole = values(build(model, train + more, tmp_path / "whole", config), valid)
    index = build(model, train, tmp_path / "grown", config, shard_samples=4)
    assert index.append(more) == 5 and values(index, valid) == pytest.approx(whole, rel=1e-6)
    with pytest.raises(IndexMismatch, match="already in the index"):
        index.append([dict(s, input_ids=s["input_ids"][:-1]) for s in more])
    gone = [train[1]["id"], more[0]["id"], train[8]["id"]]
    assert index.delete(gone) == 3 and index.samples == 13
    kept = {k: v for k, v in whole.items() if k not in gone}
    assert values(index, valid) == pytest.approx(kept, rel=1e-6)
    before = index.info()["bytes"]
    assert index.compact() > 0 and index.info()["bytes"] < before and index.info()["deleted"] == 0
    reopened = Index.open(index.folder, model, config, progress=False)
    assert values(reopened, valid) == pytest.approx(kept, rel=1e-6)
    with pytest.raises(IndexMismatch, match="not in the index"):
        index.delete(["nobody"])


def test_query_takes_p_from_the_pool_less_what_was_deleted(pool, tmp_path):
    model = load_model(tiny_model("untied", seed=89), dtype=torch.float64)
    train, valid = pool
    config = ValuationConfig(normalize="cosine", precondition="input", batch_tokens=48)
    index = build(model, train, tmp_path / "index", config)
    index.delete([train[0]["id"]])
    rest = train[1:]
    exact = Valuator(model, config=config, covariance=rest, progress=False)
    expected = exact.pairwise(rest, valid[:2])
    answers = index.query(valid[:2], top=3)
    for column, answer in enumerate(answers):
        order = np.argsort(-expected[:, column])
        assert [m["id"] for m in answer["most"]] == [rest[i]["id"] for i in order[:3]]
        least = expected[order[::-1][:3], column].tolist()
        assert [m["value"] for m in answer["least"]] == pytest.approx(least, rel=1e-5, abs=1e-7)


def test_what_does_not_match_is_refused_by_name(pool, tmp_path):
    model = load_model(tiny_model("untied", seed=90), dtype=torch.float64)
    other = load_model(tiny_model("untied", seed=91), dtype=torch.float64)
    train, valid = pool
    config = ValuationConfig(batch_tokens=48)
    index = build(model, train, tmp_path / "index", config, sketch_rows=16, storage="bfloat16",
                  shard_samples=6)
    with pytest.raises(IndexMismatch, match="another model"):
        Index.open(index.folder, other, config)
    with pytest.raises(IndexMismatch, match=r"skip_depth: the index has None, asked for 0\.5"):
        Index.open(index.folder, model, config.replace(skip_depth=0.5))
    with pytest.raises(IndexMismatch, match=r"built otherwise .*identity"):
        build(model, train, index.folder, config, sketch_rows=32)
    with pytest.raises(IndexMismatch, match="the training samples"):
        build(model, train[:5], index.folder, config, sketch_rows=16, storage="bfloat16")
    shard = index.folder / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(IndexMismatch, match=r"shard-00001\.safetensors is truncated or corrupt"):
        Index.open(index.folder, model, config, progress=False).values(valid)
    manifest = json.loads((index.folder / MANIFEST).read_text())
    (index.folder / MANIFEST).write_text(json.dumps({**manifest, "format": "forvalue.index/0"}))
    with pytest.raises(IndexMismatch, match="not an index of this version"):
        Index.open(index.folder)
    with pytest.raises(IndexMismatch, match="not a forvalue index"):
        Index.open(tmp_path)


@pytest.mark.parametrize("precondition", [False, True], ids=["plain", "target-P-over-pool-P"])
def test_coarse_vectors_estimate_the_value_without_bias(precondition):
    """<x(a), x(target)> over 400 seeds of the coarse sketch: mean within 4 standard errors of
    the value the stored tokens give (with the identity sketch: the exact raw value), also when
    the stored vectors are whitened with the pool's P and the target's value has its own P."""
    model = load_model(tiny_model("untied", seed=100), dtype=torch.float64)
    valuator = Valuator(model, config=ValuationConfig(batch_tokens=48), progress=False)
    a, b, *pool = valuator.label_states(random_samples(6, seed=101, min_len=8))
    sketch = Sketch(model.vocab_size, EXACT, 0).matrix().double()
    stored = encode([a], valuator.math, sketch)
    pool_pre, target_pre = None, None
    if precondition:  # two different P: the pool's and the target's
        pool_pre = Preconditioner(*moments_of(pool), damping=0.1)
        target_pre = Preconditioner(*moments_of([b, *pool[:1]]), damping=0.3)
    target = target_of([b], valuator.math, sketch, target_pre, "none", "mean")
    exact = float(target.values(stored.hidden, stored.errors, stored.gram, stored.sizes)[0, 0])
    z = stored.hidden if pool_pre is None else pool_pre.whiten(stored.hidden)
    draws = []
    for seed in range(400):
        coarse_sketch = coarse.CoarseSketch(model.vocab_size, model.hidden_size, seed)
        x = coarse_sketch.vectors(z, stored.errors, stored.sizes)[0]
        draws.append(float(x @ coarse_sketch.target_vectors(target, pool_pre)[0]))
    draws = np.array(draws)
    assert abs(draws.mean() - exact) < 4 * draws.std(ddof=1) / np.sqrt(len(draws))


def test_a_shortlisted_query_values_its_candidates_exactly(tmp_path, monkeypatch):
    model = load_model(tiny_model("untied", seed=102), dtype=torch.float64)
    train, queries = random_samples(40, seed=103), random_samples(3, seed=104)
    config = ValuationConfig(normalize="cosine", precondition="input", batch_tokens=64)
    index = build(model, train, tmp_path / "index", config, sketch_rows=32, shard_samples=16)
    monkeypatch.setattr(coarse, "CANDIDATES", 6)  # 40 samples > 2 x 8 candidates per side
    found = index.query(queries, top=2)
    exact = index.query(queries, top=40, exact=True)
    every = [{n["id"]: n["value"] for n in answer["most"]} for answer in exact]
    for column, answer in enumerate(found):
        assert len(answer["most"]) == len(answer["least"]) == 2
        for n in answer["most"] + answer["least"]:
            assert n["value"] == pytest.approx(every[column][n["id"]], rel=1e-6)
    assert Index.open(index.folder, model, config, progress=False).query(queries, top=2) == found  # saved


def test_coarse_vectors_are_kept_per_shard_across_appends_deletes_and_compaction(tmp_path, monkeypatch):
    """An append builds the new shard's vectors only, a delete builds nothing, a compacted
    shard is built again alone (its old file removed); the frozen P stays, and the values
    after each change are the exact ones."""
    model = load_model(tiny_model("untied", seed=112), dtype=torch.float64)
    train, queries = random_samples(32, seed=113), random_samples(2, seed=115)
    more = [dict(s, id=f"more-{i}") for i, s in enumerate(random_samples(8, seed=114))]
    config = ValuationConfig(normalize="cosine", precondition="input", batch_tokens=64)
    index = build(model, train, tmp_path / "index", config, sketch_rows=32, shard_samples=16)
    monkeypatch.setattr(coarse, "CANDIDATES", 4)
    folder = index.folder / coarse.COARSE_FOLDER

    def files():
        return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}

    def check():
        exact = index.query(queries, top=index.samples, exact=True)
        every = [{n["id"]: n["value"] for n in answer["most"]} for answer in exact]
        for column, answer in enumerate(index.query(queries, top=1)):
            for n in answer["most"] + answer["least"]:
                assert n["value"] == pytest.approx(every[column][n["id"]], rel=1e-6)

    check()
    first = files()
    assert index.info()["coarse_bytes"] == sum((folder / name).stat().st_size for name in first)
    assert set(first) == {coarse.WHITENING_FILE, "shard-00000.safetensors", "shard-00001.safetensors"}
    index.append(more, shard_samples=16)
    check()
    after_append = files()
    assert {k: after_append[k] for k in first} == first and len(after_append) == 4
    index.delete([train[0]["id"], more[0]["id"]])
    check()
    assert files() == after_append
    assert all(n["id"] != train[0]["id"] for a in index.query(queries, top=1) for n in a["most"] + a["least"])
    index.compact()
    check()
    compacted = files()
    assert compacted[coarse.WHITENING_FILE] == first[coarse.WHITENING_FILE]
    assert "shard-00000.safetensors" not in compacted and compacted["shard-00001.safetensors"] == first[
        "shard-00001.safetensors"] and len(compacted) == 4


def test_select_with_a_shortlist_chooses_among_exact_values(tmp_path):
    """A shortlist covering the pool gives exact select's choice; ``shortlist=0`` chooses on the
    coarse estimates, which are the stored vectors' estimates under the pool's P."""
    model = load_model(tiny_model("untied", seed=105), dtype=torch.float64)
    train, valid = random_samples(30, seed=106), random_samples(4, seed=107)
    config = ValuationConfig(normalize="cosine", precondition="input", batch_tokens=64)
    index = build(model, train, tmp_path / "index", config, sketch_rows=32, shard_samples=8)
    for strategy in ("top", "round-robin"):
        exact = index.select(valid, 0.2, strategy=strategy)
        assert index.select(valid, 0.2, strategy=strategy, shortlist=20) == exact  # all valued exactly
    found = index.values(valid, shortlist=0.3)
    assert found.estimated.sum() == 30 - 9 and sorted(found.ids) == sorted(s["id"] for s in train)
    exact = index.values(valid)
    rows = found.exact_rows()
    assert found.values[rows, 0] == pytest.approx(exact.values[rows, 0], rel=1e-6)  # float32 sums
    search = index._search
    target, _ = index.prepare_target(valid, "mean", from_pool=False)
    vectors = search.vectors()
    estimates = vectors.estimates(search.sketch().target_vectors(target, index.pool_preconditioner()))
    assert found.values[found.estimated, 0] == pytest.approx(estimates[found.estimated, 0].numpy())
    best = np.argsort(-estimates[:, 0].numpy(), kind="stable")[:6]
    assert index.select(valid, 0.2, shortlist=0) == [found.ids[i] for i in sorted(best)]
    with pytest.raises(ValueError, match="shortlist must be >= 0"):
        index.select(valid, 0.2, shortlist=-1)


def test_inverted_lists_find_what_a_full_read_finds():
    """Every list probed: the candidates of a full read; a few lists of clustered vectors: the
    best and the worst per query are still found (clusters in opposite pairs, so that a
    query's worst samples are a cluster too)."""
    generator = torch.Generator().manual_seed(108)
    half = torch.randn(20, 2048, generator=generator)
    centres = torch.cat([half, -half])
    vectors = (centres.repeat_interleave(100, 0) + 0.3 * torch.randn(4000, 2048, generator=generator))
    found = coarse.CoarseVectors(vectors.to(torch.bfloat16), torch.rand(4000, dtype=torch.float64) + 1,
                                 torch.zeros((4000, 2), dtype=torch.int64))
    queries = centres[:5] + 0.1 * torch.randn(5, 2048, generator=generator)
    full = found.candidates(queries, 20)
    found.lists = lists.build(found.vectors, found.norms, seed=0)
    assert found.lists.count == 63 and int(found.lists.starts[-1]) == 4000
    assert sorted(found.lists.members.tolist()) == list(range(4000))
    original = lists.PROBE_SHARE
    try:
        lists.PROBE_SHARE = 1.0
        assert torch.equal(found.candidates(queries, 20), full)
    finally:
        lists.PROBE_SHARE = original
    probed = found.candidates(queries, 20)
    assert len(set(probed.tolist()) & set(full.tolist())) >= 0.95 * len(full)


def test_a_query_through_lists_values_its_candidates_exactly(tmp_path, monkeypatch):
    model = load_model(tiny_model("untied", seed=109), dtype=torch.float64)
    train, queries = random_samples(48, seed=110), random_samples(2, seed=111)
    config = ValuationConfig(normalize="cosine", precondition="input", batch_tokens=64)
    index = build(model, train, tmp_path / "index", config, sketch_rows=32, shard_samples=16)
    monkeypatch.setattr(coarse, "CANDIDATES", 4)
    monkeypatch.setattr(lists, "LISTS_FROM", 16)
    found = index.query(queries, top=1)
    members = index._search.vectors().lists.members
    assert (index.folder / coarse.COARSE_FOLDER / coarse.LISTS_FILE).exists()
    reopened = Index.open(index.folder, model, config, progress=False)
    assert reopened.query(queries, top=1) == found
    assert torch.equal(reopened._search.vectors().lists.members, members)  # the saved lists
    exact = index.query(queries, top=48, exact=True)
    every = [{n["id"]: n["value"] for n in answer["most"]} for answer in exact]
    for column, answer in enumerate(found):
        for n in answer["most"] + answer["least"]:
            assert n["value"] == pytest.approx(every[column][n["id"]], rel=1e-6)
