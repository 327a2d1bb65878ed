"""The skip readout (engine/model/skip.py): values equal the Frobenius inner products of autograd
gradients with respect to the head and a zero-initialised readout from the residual stream at
the chosen layer (through the final norm), in float64, on every route, with and without the
preconditioner (P built from the model's own output_hidden_states), in every step form."""

import numpy as np
import pytest
import torch
from torch.func import functional_call

from forvalue.engine import (
    CovarianceMismatch,
    Reference,
    ReferenceMismatch,
    ValuationConfig,
    Valuator,
    load_model,
)
from forvalue.engine.model.skip import skip_layer

from tiny_models import random_samples, tiny_model

KINDS = ["tied", "untied", "bias", "softcap", "scale"]


def label_positions(sample):
    return [k for k, m in enumerate(sample["loss_mask"]) if m and k > 0]


def skip_gradient(hf, sample, layer):
    """``d/d(W, R) sum_k log p_{k-1}[x_k]`` at ``R = 0``, where the logits gain
    ``R norm(r)``, ``r`` the output of decoder layer ``layer``; ``(V, 2d)``."""
    backbone = hf.model
    head = hf.get_output_embeddings()
    W = head.weight.detach().clone().requires_grad_(True)
    R = torch.zeros_like(W, requires_grad=True)
    kept = []
    hooks = [backbone.layers[layer - 1].register_forward_hook(
                 lambda _m, _i, out: kept.append(out[0] if isinstance(out, tuple) else out)),
             head.register_forward_hook(lambda _m, _i, out: out + backbone.norm(kept[-1]) @ R.T)]
    try:
        logits = functional_call(hf, {"lm_head.weight": W}, args=(), strict=False, tie_weights=False,
                                 kwargs={"input_ids": torch.tensor([sample["input_ids"]]),
                                         "use_cache": False}).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    logp = torch.log_softmax(logits.double(), dim=-1)
    objective = sum(logp[k - 1, sample["input_ids"][k]] for k in label_positions(sample))
    return torch.cat(torch.autograd.grad(objective, (W, R)), dim=1)


@torch.no_grad()
def skip_preconditioner(hf, samples, layer, damping):
    """``(A + lambda I)^-1`` of the states ``[h, norm(r)]`` of the label positions."""
    rows = []
    for s in samples:
        out = hf(input_ids=torch.tensor([s["input_ids"]]), output_hidden_states=True, use_cache=False)
        states = torch.cat([out.hidden_states[-1][0], hf.model.norm(out.hidden_states[layer])[0]], dim=1)
        rows.append(states[[k - 1 for k in label_positions(s)]].double())
    h = torch.cat(rows)
    A = h.T @ h / h.shape[0]
    return torch.linalg.inv(A + damping * torch.trace(A) / A.shape[0] * torch.eye(A.shape[0], dtype=A.dtype))


def values(Ga, Gb, P=None, cosine=False):
    P = torch.eye(Ga[0].shape[1], dtype=Ga[0].dtype) if P is None else P

    def norm(g):
        return float((g @ P * g).sum()) ** 0.5 if cosine else 1.0

    return np.array([[float((a @ P * b).sum()) / (norm(a) * norm(b)) for b in Gb] for a in Ga])


@pytest.fixture(scope="module", params=KINDS)
def family(request):
    hf = tiny_model(request.param, seed=41)
    # Gemma2's RMSNorm computes in float32 whatever the model's dtype: the skip states of one
    # sample run alone and in a packed step can then differ by a float32 rounding.
    precision = 1e-6 if request.param == "softcap" else 1e-9
    return hf, load_model(hf, dtype=torch.float64), precision


@pytest.mark.parametrize("options", [{}, {"precondition": "input", "normalize": "cosine"}])
def test_skip_values_equal_autograd_with_a_zero_readout(family, options):
    hf, model, precision = family
    train, valid = random_samples(5, seed=42), random_samples(4, seed=43)
    layer = skip_layer(0.75, hf.config.num_hidden_layers)
    Ga = [skip_gradient(hf, s, layer) for s in train]
    Gb = [skip_gradient(hf, s, layer) for s in valid]
    P = skip_preconditioner(hf, valid, layer, 0.01) if options else None
    expected = values(Ga, Gb, P, cosine=bool(options))
    tolerance = {"rtol": precision, "atol": precision * np.abs(expected).max()}
    v = Valuator(model, skip_depth=0.75, batch_tokens=32, progress=False, **options)
    for route in ("gram", "outer"):
        np.testing.assert_allclose(v.pairwise(train, valid, route=route), expected, **tolerance)
    np.testing.assert_allclose(v.score(train, v.reference(valid)), expected.mean(axis=1), **tolerance)


def test_chunked_and_packed_steps_agree():
    model = load_model(tiny_model("untied", seed=44), dtype=torch.float64)
    train, valid = random_samples(6, seed=45, min_len=12, max_len=30), random_samples(3, seed=46)
    whole = Valuator(model, skip_depth=0.5, batch_tokens=256, progress=False)
    chunked = Valuator(model, skip_depth=0.5, batch_tokens=8, progress=False)  # KV-cache chunks
    reference = whole.reference(valid)
    np.testing.assert_allclose(chunked.score(train, reference), whole.score(train, reference), rtol=1e-9)


def test_layer_choice_and_refusals():
    assert skip_layer(0.75, 30) == 22 and skip_layer(0.5, 24) == 12
    assert skip_layer(0.99, 4) == 3  # never the last layer: its normed output is the final state
    assert skip_layer(0.01, 4) == 1
    with pytest.raises(ValueError, match="two layers or more"):
        skip_layer(0.5, 1)
    for bad in (0.0, 1.0, -0.5, 2):
        with pytest.raises(ValueError, match="between 0 and 1"):
            ValuationConfig(skip_depth=bad)


def test_a_reference_keeps_its_readout(tmp_path):
    model = load_model(tiny_model("untied", seed=47), dtype=torch.float64)
    valid = random_samples(3, seed=48)
    skip = Valuator(model, skip_depth=0.75, progress=False)
    assert skip.model.hidden_size == 2 * model.hidden_size and skip.model.identity["skip_layer"] == "1/2"
    assert Valuator(model, skip_depth=0.75, progress=False).model is skip.model  # built once
    path = tmp_path / "ref.safetensors"
    skip.reference(valid).save(path)
    with pytest.raises(ReferenceMismatch, match="hidden_size"):
        Valuator(model, progress=False).score(valid, Reference.load(path))


def test_image_text_models_read_their_language_model():
    from tiny_vlms import FAMILIES, tiny_vlm

    for family in FAMILIES:
        vlm = tiny_vlm(family)
        model = load_model(vlm.model, processor=vlm.processor, dtype=torch.float64)
        skip = Valuator(model, skip_depth=0.5, progress=False).model.skip
        name = next(n for n, module in model.backbone.named_modules() if module is skip.block)
        assert name.endswith("_model.layers.0"), (family, name)  # not the vision tower's


def test_a_covariance_keeps_its_readout():
    model = load_model(tiny_model("untied", seed=49), dtype=torch.float64)
    plain = Valuator(model, precondition="input", progress=False).covariance(random_samples(3, seed=50))
    with pytest.raises(CovarianceMismatch, match="same skip_depth"):
        Valuator(model, precondition="input", skip_depth=0.75, covariance=plain, progress=False)


def test_the_serving_engine_values_with_the_readout():
    import asyncio

    from forvalue.engine.serving.async_engine import AsyncEngine

    model = load_model(tiny_model("untied", seed=54), dtype=torch.float64)
    train, valid = random_samples(5, seed=55, max_len=40), random_samples(3, seed=56)
    v = Valuator(model, skip_depth=0.5, progress=False)
    expected = v.score(train, v.reference(valid))

    async def main():
        async with AsyncEngine(model, skip_depth=0.5, batch_tokens=16) as engine:  # chunks too
            await engine.build_reference("valid", valid)
            return await asyncio.gather(*[engine.score(s, "valid") for s in train])

    np.testing.assert_allclose([r.value for r in asyncio.run(main())], expected, rtol=1e-10)
