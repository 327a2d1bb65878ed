"""load_model: paths, objects, the probe check, refusals; identity feeds reference checks."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from forvalue.engine import ModelError, ReferenceMismatch, Valuator, load_model

from tiny_models import SIZES, tiny_model


class DoubledLogits(LlamaForCausalLM):
    """A family whose forward transforms the logits in a way the config does not say."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_unreproduced_logits_are_refused():
    model = DoubledLogits(LlamaConfig(**SIZES))
    with pytest.raises(ModelError, match="not reproduced"):
        load_model(model)


def test_image_text_models_are_refused():
    model = tiny_model("untied")
    model.config.vision_config = {"hidden_size": 8}
    with pytest.raises(ModelError, match="image-text"):
        load_model(model)


def test_local_folder_loads_offline_with_its_tokenizer(tmp_path, tiny_tokenizer):
    hf = tiny_model("untied")
    hf.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="float64")
    assert model.dtype == torch.float64 and model.tokenizer is not None
    assert model.vocab_size == SIZES["vocab_size"] and model.context_length == 64
    torch.testing.assert_close(model.head_weight, hf.lm_head.weight)
    v = Valuator(model, progress=False)
    assert np.isfinite(v.self_value([{"text": "hello there how are you"}])).all()


def test_unknown_model_never_reaches_a_hub():
    with pytest.raises(ModelError, match="never downloads"):
        load_model("no-such-org/no-such-model")


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(tiny_model("tied"), dtype="float8")


def test_reference_from_another_tokenizer_is_refused(tiny_tokenizer, generation_tokenizer):
    hf = tiny_model("untied")
    built = Valuator(load_model(hf, tokenizer=tiny_tokenizer, dtype=torch.float64), progress=False)
    ref = built.reference([{"text": "the cat sat on the mat"}])
    other = Valuator(load_model(hf, tokenizer=generation_tokenizer, dtype=torch.float64), progress=False)
    with pytest.raises(ReferenceMismatch, match="tokenizer_hash"):
        other.score([{"text": "hello there"}], ref)
    assert np.isfinite(built.score([{"text": "hello there"}], ref)).all()
