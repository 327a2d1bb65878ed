"""ModelRunner: packed and chunked forwards equal per-sample ones (float64, several families)."""

import functools
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from forvalue.engine import load_model
from forvalue.engine.config import ValuationConfig
from forvalue.engine.core import runner as runner_module
from forvalue.engine.core.request import Request
from forvalue.engine.core.runner import ModelRunner, PackingUnsupported
from forvalue.engine.core.scheduler import Scheduler
from forvalue.engine.inputs.samples import EncodedSample, SampleError
from forvalue.engine.model import attention as attention_module
from forvalue.engine.outputs import LabelStates
from forvalue.engine.valuation.label_math import LabelMath

from tiny_models import SIZES, VOCAB, tiny_model

FAMILIES = ["tied", "untied", "bias", "softcap", "scale", "mistral-window", "gemma2-window"]
# Gemma2's own (eager) attention takes its softmax in float32, even for a float64 model.
TOLERANCE = {"gemma2-window": 1e-6, "softcap": 1e-6}


@functools.cache
def family_model(kind: str, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    if kind == "mistral-window":
        hf = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4))
    elif kind == "gemma2-window":
        hf = Gemma2ForCausalLM(Gemma2Config(**SIZES, head_dim=8, sliding_window=5,
                                            attn_logit_softcapping=None, final_logit_softcapping=None))
    else:
        return load_model(tiny_model(kind), dtype=dtype)
    return load_model(hf.double().eval(), dtype=dtype)


def encoded(ids, mask=None, name="s"):
    mask = mask or [k > 0 for k in range(len(ids))]
    return EncodedSample(name, "test", tuple(ids), tuple(mask), truncated=False)


def random_encoded(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
        mask = [k > 0 and bool(torch.rand(1, generator=gen) < 0.7) for k in range(n)]
        mask[-1] = True
        out.append(encoded(ids, mask, name=f"s{i}"))
    return out


@torch.inference_mode()
def per_sample_states(model, sample):
    """The label states from a forward of the sample alone, with the family's own attention."""
    ids = torch.tensor([sample.input_ids], device=model.device)
    hidden = model.backbone(input_ids=ids, use_cache=False).last_hidden_state[0]
    positions = sample.label_positions()
    return hidden[[k - 1 for k in positions]]


def run(runner, samples, budget, max_seqs=64):
    """Every sample through a scheduler and the runner; label states in sample order."""
    scheduler = Scheduler(ValuationConfig(batch_tokens=budget, max_seqs=max_seqs))
    for index, sample in enumerate(samples):
        scheduler.add(Request(sample, index=index))
    results = {}
    while scheduler.has_unfinished():
        output = scheduler.schedule()
        result = runner.execute(output)
        for request, states in result.finished + result.failed:
            results[request.index] = states
        scheduler.update_from_output(output, result)
    return [results[i] for i in range(len(samples))]


def assert_states_match(model, samples, states, tolerance):
    for sample, got in zip(samples, states, strict=True):
        assert isinstance(got, LabelStates) and got.sample is sample
        # Labels never cross boundaries: the sample's own label positions and tokens.
        assert got.positions == sample.label_positions()
        assert got.labels.tolist() == [sample.input_ids[k] for k in got.positions]
        torch.testing.assert_close(got.hidden, per_sample_states(model, sample), rtol=tolerance,
                                   atol=tolerance)


def test_capability_check_picks_varlen_or_buckets_per_family():
    modes = {kind: ModelRunner(family_model(kind)).attention for kind in FAMILIES}
    assert modes == {kind: "buckets" if kind == "softcap" else "varlen" for kind in FAMILIES}
    assert "softcapping" in ModelRunner(family_model("softcap")).why_not_packed
    for mode in ("varlen", "flex"):
        with pytest.raises(PackingUnsupported, match="softcapping"):
            ModelRunner(family_model("softcap"), attention=mode)


@pytest.mark.parametrize("kind", FAMILIES)
def test_packed_and_chunked_equal_per_sample(kind):
    model = family_model(kind)
    samples = random_encoded([2, 17, 5, 40, 9, 31, 3], seed=len(kind))
    tolerance = TOLERANCE.get(kind, 1e-10)
    for attention in ("auto", "buckets"):
        runner = ModelRunner(model, attention=attention, batch_tokens=48)
        assert_states_match(model, samples, run(runner, samples, budget=48), tolerance)
        # A budget of 12 chunks the longer samples, with a KV cache carried between chunks.
        assert_states_match(model, samples, run(runner, samples, budget=12), tolerance)


@pytest.mark.parametrize("kind", ["untied", "softcap", "gemma2-window"])
def test_packed_values_equal_per_sample_values(kind):
    model = family_model(kind)
    runner = ModelRunner(model)
    samples = random_encoded([12, 4, 25, 7], seed=3)
    packed = run(runner, samples, budget=64)
    alone = [run(runner, [sample], budget=64)[0] for sample in samples]
    math = LabelMath(model)
    gradient = math.gradient_sum(alone[:2], [1.0, 0.5])
    tolerance = TOLERANCE.get(kind, 1e-9)
    for a, b in zip(math.token_scores(packed, gradient), math.token_scores(alone, gradient), strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * float(b.abs().max()))
    for a, b in zip(packed, alone, strict=True):
        assert math.squared_norm(a) == pytest.approx(math.squared_norm(b), rel=tolerance)


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["tied", "mistral-window", "softcap"]),
       lengths=st.lists(st.integers(2, 60), min_size=1, max_size=6),
       budget=st.integers(1, 64), seed=st.integers(0, 100))
def test_any_packing_and_chunking_equals_per_sample(kind, lengths, budget, seed):
    model = family_model(kind)
    samples = random_encoded(lengths, seed)
    states = run(ModelRunner(model), samples, budget=budget, max_seqs=3)
    assert_states_match(model, samples, states, TOLERANCE.get(kind, 1e-10))


def reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa):
    """The documented semantics of torch's flash ``varlen_attn`` (token-major, causal window
    (left, 0): query i sees keys i - left .. i), per segment in plain torch."""
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        i = torch.arange(end - start)
        left = window_size[0] if window_size[0] >= 0 else end - start
        mask = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - left)
        segment = [x[start:end].transpose(0, 1) for x in (q, k, v)]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            *segment, attn_mask=mask, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
    return out


@pytest.mark.parametrize("kind", ["untied", "mistral-window"])
def test_the_flash_varlen_path_equals_per_sample(kind, monkeypatch):
    # The CUDA kernel's plumbing (layout, window, GQA) checked on the CPU with its semantics.
    monkeypatch.setattr(attention_module, "_flash_varlen", lambda query: reference_varlen_attn)
    model = family_model(kind)
    samples = random_encoded([2, 17, 5, 40, 9], seed=8)
    runner = ModelRunner(model, attention="varlen")
    assert_states_match(model, samples, run(runner, samples, budget=64), 1e-10)


def test_a_wrong_packed_attention_is_caught_by_the_probe(monkeypatch):
    # An off-by-one sliding window changes the states of the probe's long segment: the check
    # must see it and fall back to buckets, which stay exact.
    model = load_model(MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4)).double().eval(),
                       dtype=torch.float64)
    correct = attention_module._window_mask
    monkeypatch.setattr(attention_module, "_window_mask", lambda n, w, d: correct(n, w and w + 1, d))
    runner = ModelRunner(model)
    assert runner.attention == "buckets" and "differ" in runner.why_not_packed
    samples = random_encoded([20, 6], seed=1)
    assert_states_match(model, samples, run(runner, samples, budget=64), 1e-10)


# ---------------------------------------------------------------- flex

PACKED_FAMILIES = [kind for kind in FAMILIES if kind != "softcap"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", PACKED_FAMILIES)
def test_flex_equals_per_sample(kind, dtype):
    model = family_model(kind, dtype)
    tolerance = TOLERANCE.get(kind, 1e-10) if dtype == torch.float64 else 1e-4
    samples = random_encoded([2, 17, 5, 40, 9, 31, 3], seed=len(kind) + 1)
    ids = [sample.input_ids for sample in samples]
    packed = runner_module._forward_row(model, ids, "flex")
    alone = torch.cat([runner_module._forward_single(model, list(sample)) for sample in ids])
    torch.testing.assert_close(packed, alone, rtol=tolerance, atol=tolerance)
    runner = ModelRunner(model, attention="flex", batch_tokens=48)
    assert_states_match(model, samples, run(runner, samples, budget=48), tolerance)


@pytest.mark.parametrize("min_row", [1, 108, 300])
def test_flex_pads_short_rows_without_changing_states(monkeypatch, min_row):
    # A row shorter than FLEX_MIN_ROW is padded for the attention (compiled flex finds no kernel
    # for short rows at some head layouts): the pads must not reach the 107 real tokens.
    monkeypatch.setattr(attention_module, "FLEX_MIN_ROW", min_row)
    model = family_model("mistral-window")
    ids = [sample.input_ids for sample in random_encoded([2, 17, 5, 40, 9, 31, 3], seed=3)]
    packed = runner_module._forward_row(model, ids, "flex")
    alone = torch.cat([runner_module._forward_single(model, list(sample)) for sample in ids])
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)


def test_flex_refuses_what_it_cannot_honour():
    q, kv = torch.randn(1, 2, 6, 8, dtype=torch.float64), torch.randn(1, 1, 6, 8, dtype=torch.float64)
    segments = runner_module._packed_inputs([[1, 2, 3], [4, 5, 6]], torch.device("cpu"))[2]
    call = functools.partial(attention_module.flex_packed_attention, torch.nn.Module(), q, kv, kv,
                             None, forvalue_segments=segments)
    assert call()[0].shape == (1, 6, 2, 8)
    refusals = [({"softcap": 50.0}, "softcapping"), ({"dropout": 0.1}, "dropout"),
                ({"is_causal": False}, "non-causal"), ({"s_aux": torch.zeros(2)}, "unknown .*s_aux"),
                ({"forvalue_segments": None}, "segment ids")]
    for kwargs, match in refusals:
        with pytest.raises(PackingUnsupported, match=match):
            call(**kwargs)
    with pytest.raises(PackingUnsupported, match="mask of its own"):
        attention_module.flex_packed_attention(torch.nn.Module(), q, kv, kv, torch.ones(6, 6),
                                               forvalue_segments=segments)


def test_a_wrong_flex_mask_is_caught_by_the_probe(monkeypatch):
    model = load_model(MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4)).double().eval(),
                       dtype=torch.float64)
    correct = attention_module._document_mask
    monkeypatch.setattr(attention_module, "_document_mask", lambda ids, w: correct(ids, w and w + 1))
    with pytest.raises(PackingUnsupported, match="differ"):
        ModelRunner(model, attention="flex")


@pytest.mark.parametrize(("device", "flash", "expected"), [
    ("cpu", False, ("varlen",)), ("cuda", True, ("varlen", "flex")), ("cuda", False, ("flex",))])
def test_auto_tries_the_packed_modes_of_its_device(monkeypatch, device, flash, expected):
    monkeypatch.setattr(runner_module, "has_flash_varlen", lambda tensor: flash)
    model = SimpleNamespace(device=torch.device(device), head_weight=None)
    assert runner_module._auto_modes(model) == expected


def test_auto_falls_back_to_buckets_with_every_reason(monkeypatch):
    monkeypatch.setattr(runner_module, "_auto_modes", lambda model: ("varlen", "flex"))
    monkeypatch.setattr(runner_module, "packing_unsupported_reason", lambda model, mode: f"no {mode}")
    assert runner_module._choose_attention(None, "auto") == ("buckets", "varlen: no varlen; flex: no flex")


# ---------------------------------------------------------------- restoring, errors, CUDA


@pytest.mark.parametrize("attention", ["varlen", "flex"])
def test_the_family_attention_is_restored_after_a_packed_step(attention):
    model = family_model("untied")
    before = model.backbone.config._attn_implementation
    run(ModelRunner(model, attention=attention), random_encoded([5, 6], seed=2), budget=64)
    assert model.backbone.config._attn_implementation == before


def test_unknown_ids_and_non_finite_states_are_sample_errors():
    hf = tiny_model("untied", seed=4)
    with torch.no_grad():
        hf.model.embed_tokens.weight[7] = float("nan")
    model = load_model(hf, dtype=torch.float64)
    runner = ModelRunner(model)
    with pytest.raises(SampleError, match="outside the model's vocabulary"):
        runner.check_sample(encoded([1, VOCAB + 3], name="oov"))
    runner.check_sample(encoded([1, 2]))  # in range: no error
    poisoned, clean = encoded([3, 7, 5, 1], name="bad"), encoded([3, 4, 5], name="good")
    for budget in (64, 2):  # packed, then chunked (the NaN is in the first chunk)
        packed = run(runner, [poisoned, clean], budget=budget)
        assert isinstance(packed[0], SampleError) and "non-finite" in str(packed[0])
        assert isinstance(packed[1], LabelStates)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["untied", "mistral-window"])
@pytest.mark.parametrize("attention", ["varlen", "flex"])
def test_cuda_packed_and_chunked_equal_per_sample(attention, kind, dtype):
    # varlen: bfloat16 takes torch's flash varlen kernel where this torch has it, float32 sdpa
    # per segment; flex: compiled FlexAttention in both.
    torch.manual_seed(0)
    sizes = {**SIZES, "head_dim": 16}  # compiled FlexAttention takes head_dim >= 16
    hf = MistralForCausalLM(MistralConfig(**sizes, sliding_window=4)) if kind == "mistral-window" \
        else LlamaForCausalLM(LlamaConfig(**sizes))
    model = load_model(hf, device="cuda", dtype=dtype)
    runner = ModelRunner(model, attention=attention)  # forced: auto may prefer another mode
    samples = random_encoded([2, 17, 5, 40, 9, 31, 3], seed=5)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for budget in (64, 12):
        for sample, got in zip(samples, run(runner, samples, budget=budget), strict=True):
            expected = per_sample_states(model, sample).float()
            error = float((got.hidden.float() - expected).abs().max()) / max(1.0, float(expected.abs().max()))
            assert error <= tolerance, (budget, sample.id, error)
