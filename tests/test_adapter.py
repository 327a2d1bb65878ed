"""LoRA adapters: values of the adapted model equal autograd through the PEFT model itself."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call

from forvalue.engine import ModelError, Valuator, load_model

from tiny_models import random_samples, tiny_model


def peft_gradient(peft_model, sample):
    """d/dW of the label log-likelihood through the unmerged PEFT forward, W = the LM head."""
    key = "base_model.model.lm_head.weight"
    head = dict(peft_model.named_parameters())[key].detach().clone().requires_grad_(True)
    ids = torch.tensor([sample["input_ids"]])
    logits = functional_call(peft_model, {key: head}, args=(), strict=False, tie_weights=False,
                             kwargs={"input_ids": ids, "use_cache": False}).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    positions = [k for k, m in enumerate(sample["loss_mask"]) if m and k > 0]
    (grad,) = torch.autograd.grad(sum(logp[k - 1, sample["input_ids"][k]] for k in positions), head)
    return grad


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("base")
    adapter_dir = tmp_path_factory.mktemp("adapter")
    tiny_model("untied", seed=40).save_pretrained(base_dir)
    torch.manual_seed(41)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # random B: the adapter changes the model
    peft_model = get_peft_model(tiny_model("untied", seed=40), config)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, peft_model.double().eval()


def test_adapter_values_equal_autograd(adapted):
    base_dir, adapter_dir, peft_model = adapted
    model = load_model(str(base_dir), adapter=str(adapter_dir), dtype="float64")
    train, valid = random_samples(3, seed=42), random_samples(2, seed=43)
    Ga = [peft_gradient(peft_model, s) for s in train]
    Gb = [peft_gradient(peft_model, s) for s in valid]
    expected = np.array([[float((a * b).sum()) for b in Gb] for a in Ga])
    np.testing.assert_allclose(Valuator(model, progress=False).pairwise(train, valid), expected,
                               rtol=1e-5)
    plain = load_model(str(base_dir), dtype="float64")
    assert plain.identity["model_hash"] != model.identity["model_hash"]
    assert not np.allclose(Valuator(plain, progress=False).pairwise(train, valid), expected)


def test_missing_adapter_is_a_clear_error(adapted, tmp_path):
    base_dir, _, _ = adapted
    with pytest.raises(ModelError, match="not a local PEFT adapter"):
        load_model(str(base_dir), adapter=str(tmp_path / "nowhere"))


def test_warmup_saves_an_adapter_that_load_model_merges(tmp_path):
    from forvalue.engine.warmup import warmup

    hf = tiny_model("untied", seed=42)
    model = load_model(hf, dtype=torch.float64)
    samples = random_samples(8, seed=43)
    result = warmup(model, samples, tmp_path / "adapter", epochs=2, rank=4, lr=1e-2, batch_size=3,
                    progress=False)
    assert (result.adapter / "adapter_config.json").exists() and result.steps == 6
    assert result.losses[1] < result.losses[0]  # it learned something from the pool
    warmed = load_model(tiny_model("untied", seed=42), dtype=torch.float64, adapter=result.adapter)
    ids = torch.tensor([samples[0]["input_ids"]])
    before = model.hidden_states(ids, torch.ones_like(ids))
    after = warmed.hidden_states(ids, torch.ones_like(ids))
    assert not torch.allclose(before, after)  # the adapter moved the hidden states
    assert warmed.identity["model_hash"] != model.identity["model_hash"]
    with pytest.raises(ValueError, match="positive"):
        warmup(model, samples, tmp_path / "bad", epochs=0)


def test_warmup_command_then_score_with_the_adapter(tmp_path, capsys):
    import json

    from forvalue.bindings.cli import main

    tiny_model("untied", seed=44).save_pretrained(tmp_path / "model")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(s) + "\n" for s in random_samples(6, seed=45)))
    model = ["--model", str(tmp_path / "model"), "--dtype", "float64"]
    assert main(["warmup", *model, "--train", str(train), "--out", str(tmp_path / "adapter"),
                 "--rank", "2", "--batch-size", "2"]) == 0
    assert "steps: 3" in capsys.readouterr().out
    assert main(["score", *model, "--adapter", str(tmp_path / "adapter"), "--train", str(train),
                 "--mode", "self", "--out", str(tmp_path / "values.jsonl")]) == 0
    assert len((tmp_path / "values.jsonl").read_text().splitlines()) == 6
    assert main(["warmup", *model, "--train", str(train), "--out", str(tmp_path / "bad"),
                 "--epochs", "0"]) == 2
