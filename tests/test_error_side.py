"""The error-side experiment: with unit weights it is the package's preconditioned value."""

import numpy as np
import torch
from error_side import values, weights

from forvalue.engine import Valuator, load_model
from forvalue.engine.valuation.precondition import DAMPING_VALID, Preconditioner

from tiny_models import random_samples, tiny_model


def test_unit_weights_give_the_preconditioned_value_and_others_differ():
    model = load_model(tiny_model("untied", seed=3), dtype=torch.float64)
    train, valid = random_samples(6, seed=8), random_samples(4, seed=9)
    valuator = Valuator(model, loss_on="response", progress=False)
    train_states, valid_states = valuator.label_states(train), valuator.label_states(valid)
    hidden = torch.cat([s.hidden for s in valid_states])
    pre = Preconditioner(hidden.T @ hidden, hidden.shape[0], DAMPING_VALID)
    head = model.head_weight.float()
    plain, cosine = values(train_states, valid_states, head, pre, torch.ones(head.shape[0]))

    # The experiment computes in float32 (dense V-wide errors), the package here in float64.
    for normalize, got in (("none", plain), ("cosine", cosine)):
        package = Valuator(model, loss_on="response", normalize=normalize, progress=False,
                           precondition="input", damping=DAMPING_VALID).pairwise(train, valid)
        np.testing.assert_allclose(got, package, rtol=1e-4, atol=1e-5 * np.abs(package).max())

    found = weights(torch.randn(5, head.shape[0]))
    assert torch.equal(found["none"], torch.ones(head.shape[0])) and len(found) == 7
    weighted, _ = values(train_states, valid_states, head, pre, found["mu0.1-p1.0"])
    assert not np.allclose(weighted, plain)
