"""The hidden-centring diagnosis against explicit gradients built from the model's own logits."""

import numpy as np
import pytest
import torch
from hidden_centring import centred_values

from forvalue.engine import Valuator, load_model

from tiny_models import random_samples, tiny_model


def _label_tokens(hf, sample, first_only):
    """Hidden states and errors ``onehot(x_k) - softmax(logits_{k-1})`` of the labels, float64."""
    ids = sample["input_ids"]
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    positions = [k for k, m in enumerate(sample["loss_mask"]) if m and k > 0][:1 if first_only else None]
    hidden = out.hidden_states[-1][0, [k - 1 for k in positions]].double()
    errors = -torch.softmax(out.logits[0, [k - 1 for k in positions]].double(), dim=-1)
    errors[torch.arange(len(positions)), [ids[k] for k in positions]] += 1
    return hidden, errors


@pytest.mark.parametrize(("kind", "first_only"), [("untied", False), ("bias", False), ("bias", True)])
def test_centred_values_equal_explicit_centred_gradients(kind, first_only):
    hf = tiny_model(kind, seed=5)
    model = load_model(hf, dtype=torch.float64)
    train, valid = random_samples(7, seed=6), random_samples(4, seed=7, min_len=1)
    got = centred_values(model, train, valid, loss_on="response", first_token_only=first_only)

    valid_tokens = [_label_tokens(hf, s, first_only) for s in valid]
    mean = torch.cat([h for h, _ in valid_tokens]).mean(0)
    centred_mean = sum(e.T @ (h - mean) for h, e in valid_tokens) / len(valid)  # V x d
    expected = [float(((e.T @ (h - mean)) * centred_mean).sum())
                for h, e in (_label_tokens(hf, s, first_only) for s in train)]
    np.testing.assert_allclose(got["centred"], expected, rtol=1e-9)
    assert -1 <= got["cosine_mean"] <= 1
    if not first_only:  # over all label tokens the plain value is the package's number
        valuator = Valuator(model, loss_on="response", progress=False)
        package = valuator.score(train, valuator.reference(valid))
        np.testing.assert_allclose(got["plain"], package, rtol=1e-9)
