"""The FLOP count of bench/perf/method_cost.py: its weights are a real model's, and the methods
add what their definitions say."""

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from forvalue.bench.perf.gpu_e2e import Shape
from forvalue.bench.perf.method_cost import LESS_HERE, LESS_PAPER, adapter_size, forward, less, table

SHAPE = Shape("tiny", "llama", 64, 3, 4, 2, 96, 211, True)


def test_forward_counts_the_decoder_weights_of_the_real_model():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=96, vocab_size=211))
    linear = type(model.lm_head)
    weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, linear))
    tokens, labels = 10, 4
    attention = 2 * tokens**2 * 64 * 3
    assert forward(SHAPE, tokens, labels) == 2 * weights * tokens + attention + 2 * 211 * 64 * labels


def test_less_is_warm_up_gradients_and_projection():
    parts = less(SHAPE, LESS_PAPER, 10, 4)
    assert parts["projection"] == 4 * 2 * adapter_size(SHAPE, LESS_PAPER) * 8192
    assert parts["gradients"] == pytest.approx(parts["warm-up"] * 4 / (0.05 * 4))
    assert less(SHAPE, LESS_HERE, 10, 4)["projection"] == 0
    costs = table(SHAPE, 10, 4)
    assert costs["select's default"]["total"] > costs["paper's value"]["total"]
    both = costs["select's default, cold + warm"]
    assert both["warm-up"] == costs["LESS (as bench/evals runs it)"]["warm-up"]
    assert both["two values"] == pytest.approx(2 * costs["select's default"]["total"])
    assert all(parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
               for parts in costs.values())
