"""The answers-task diagnosis (bench/experiments/readout_variants.py): its last-layer variant is
the package's preconditioned cosine value, and its token aggregates add up to that value."""

import numpy as np
import torch
from readout_variants import grams, token_aggregates, variants

from forvalue.engine import Valuator, load_model

from tiny_models import random_samples, tiny_model


def test_last_layer_variant_is_the_packages_value_and_tokens_add_up():
    model = load_model(tiny_model("untied", seed=61), dtype=torch.float64)
    train, valid = random_samples(9, seed=62), random_samples(4, seed=63)
    valuator = Valuator(model, loss_on="response", normalize="cosine", precondition="input",
                        damping=0.01, progress=False)
    expected = valuator.score(train, valuator.reference(valid))
    g = grams(model, train, valid, "response", [0.01], ["valid"])
    found = variants(g, [0.01], ["valid"])
    # The scan keeps the errors in float32 (memory), hence the tolerance.
    np.testing.assert_allclose(found["last d0.01 valid"], expected, rtol=1e-5, atol=1e-8)

    part = g["last", 0.01, "valid"]
    norms, valid_norms = np.sqrt(np.diagonal(part["pool"].numpy())), np.sqrt(part["valid"].numpy())
    aggregates = token_aggregates([part], norms, valid_norms)
    owner = part["owner"]
    contributions = (part["tokens"] / torch.from_numpy(valid_norms)).mean(1) / torch.from_numpy(norms)[owner]
    per_sample = torch.zeros(len(train), dtype=torch.float64).index_add_(0, owner, contributions)
    np.testing.assert_allclose(per_sample.numpy(), found["last d0.01 valid"], rtol=1e-10)
    assert (aggregates["neg"] <= 0).all()
    for i in range(len(train)):
        own = contributions[owner == i].numpy()
        assert aggregates["min"][i] == own.min()
        np.testing.assert_allclose(aggregates["neg"][i], own[own < 0].sum(), atol=1e-15)
