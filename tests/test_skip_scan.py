"""The skip-depth scan's value on the last layer's states is the package's preconditioned
cosine value (so its other layers are that value on other states)."""

import numpy as np
import torch
from skip_scan import scan

from forvalue.engine import Valuator, load_model
from forvalue.engine.valuation.ranking import roc_auc

from tiny_models import random_samples, tiny_model


def test_last_layer_of_the_scan_is_the_packages_value():
    model = load_model(tiny_model("untied", seed=51), dtype=torch.float64)
    train, valid = random_samples(10, seed=52), random_samples(4, seed=53)
    positive = np.arange(10) % 3 != 0
    valuator = Valuator(model, loss_on="response", normalize="cosine", precondition="input", progress=False)
    expected = roc_auc(valuator.score(train, valuator.reference(valid)), positive)
    found = scan(model, train, valid, positive)
    assert found["L2"] == expected
    assert set(found) >= {"L1", "L2", "L2+L1", "all"} and all(0 <= v <= 1 for v in found.values())
