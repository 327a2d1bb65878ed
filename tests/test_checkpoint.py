"""The head read from a checkpoint without building the model (engine/model/checkpoint.py), and
the log-probability check of the vLLM backbone's checkpoint route (no vLLM needed here)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from forvalue.engine import ModelError, load_model
from forvalue.engine.model.checkpoint import fingerprint, head_names, read_tensors
from forvalue.engine.model.vllm_backbone import check_logprobs
from forvalue.kernels import LogitTransform

from tiny_models import tiny_model


def _saved(kind: str, folder, seed: int = 0):
    model = tiny_model(kind, seed=seed).float()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["untied", "tied", "softcap", "qwen"])
def test_the_head_read_from_the_checkpoint_is_the_models(kind, tmp_path):
    # (tiny_models' "bias" kind adds a head bias its config does not declare: no family's
    # checkpoint, and transformers' own load would drop it)
    model = _saved(kind, tmp_path)
    weight, bias = head_names(model.config)
    tensors = read_tensors(tmp_path, [n for n in (weight, bias) if n is not None])
    head = model.get_output_embeddings()
    assert torch.equal(tensors[weight], head.weight.detach())
    assert (bias is None) == (head.bias is None)
    if bias is not None:
        assert torch.equal(tensors[bias], head.bias.detach())


def test_a_missing_tensor_is_named(tmp_path):
    _saved("untied", tmp_path)
    with pytest.raises(KeyError, match=r"lm_head\.nothing"):
        read_tensors(tmp_path, ["lm_head.nothing"])


def test_the_fingerprint_follows_the_weights_not_the_save(tmp_path):
    model = _saved("untied", tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert fingerprint(tmp_path / "a", model.config) == fingerprint(tmp_path / "b", model.config)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(1e-3)  # a fine-tune of one matrix
    model.save_pretrained(tmp_path / "c")
    assert fingerprint(tmp_path / "c", model.config) != fingerprint(tmp_path / "a", model.config)


@pytest.mark.parametrize("kind", ["softcap", "scale"])
def test_the_logprob_check_passes_the_right_transform_and_refuses_a_wrong_one(kind, tmp_path):
    _saved(kind, tmp_path)
    model = load_model(str(tmp_path))
    ids = torch.randint(0, model.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    tensor = torch.tensor([ids])
    states = model.hidden_states(tensor, torch.ones_like(tensor))[0]
    logits = model.causal_lm(tensor, use_cache=False).logits[0].double()
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(11), torch.tensor(ids[1:])]
    check_logprobs(model, ids, states, expected)
    wrong = dataclasses.replace(model, transform=LogitTransform(None, 1.7, None))  # scale, no softcap
    with pytest.raises(ModelError, match="log-probabilities"):
        check_logprobs(wrong, ids, states, expected)
