"""LabelMath's squared norms, grouped several samples to one token gram, against each sample's
``G(x)`` from autograd (float64, logit transforms, with and without a preconditioner)."""

import pytest
import torch

from forvalue.engine import load_model
from forvalue.engine.outputs import LabelStates
from forvalue.engine.valuation.label_math import LabelMath, token_groups
from forvalue.engine.valuation.precondition import Preconditioner

from tiny_models import SIZES, VOCAB, tiny_model

D = SIZES["hidden_size"]
# One label, groups of short samples, a sample over the group budget (D / 2) and one long
# enough (>= 3 D labels) that building G(x) costs less than its token gram.
LABEL_COUNTS = [1, 3, 2, 12, 5, 60, 1, 7]


def random_states(seed: int) -> list[LabelStates]:
    gen = torch.Generator().manual_seed(seed)
    return [LabelStates(i, None, torch.randn(n, D, generator=gen, dtype=torch.float64),
                        torch.randint(0, VOCAB, (n,), generator=gen), list(range(n)))
            for i, n in enumerate(LABEL_COUNTS)]


def gradient(model, states: LabelStates) -> torch.Tensor:
    """``G(x) = sum_t e_t h_t^T``: the gradient of the labels' log-likelihood in the head."""
    weight = model.head_weight.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(model.logits(states.hidden, weight), dim=-1)
    (grad,) = torch.autograd.grad(logp.gather(1, states.labels[:, None]).sum(), weight)
    return grad


@pytest.mark.parametrize("kind", ["tied", "bias", "softcap", "scale"])
@pytest.mark.parametrize("preconditioned", [False, True])
def test_grouped_squared_norms_equal_each_samples_gradient_norm(kind, preconditioned):
    model = load_model(tiny_model(kind), dtype=torch.float64)
    batch = random_states(seed=len(kind) + preconditioned)
    pre = None
    if preconditioned:
        moments = torch.randn(50, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        pre = Preconditioner(moments.T @ moments, 50, damping=0.1)
    got = LabelMath(model).squared_norms(batch, pre)
    for states, value in zip(batch, got, strict=True):
        G = gradient(model, states)
        if pre is not None:  # ||G||_P^2 = tr(G M^-1 G^T) = ||C^-1 G^T||^2 with M = C C^T
            G = torch.linalg.solve_triangular(pre.factor, G.T, upper=False)
        assert value == pytest.approx(float(G.square().sum()), rel=1e-9)
        assert states.squared_norm == value  # kept for the next use


def test_token_groups_stay_within_budget_and_keep_order():
    batch = random_states(seed=0)
    groups = token_groups(batch, budget=D // 2)
    assert [s.index for group in groups for s in group] == list(range(len(batch)))
    for group in groups:
        assert len(group) == 1 or sum(len(s.positions) for s in group) <= D // 2
    assert [[len(s.positions) for s in g] for g in groups] == [[1, 3, 2], [12], [5], [60], [1, 7]]


def test_cached_and_new_norms_mix():
    model = load_model(tiny_model("untied"), dtype=torch.float64)
    math, batch = LabelMath(model), random_states(seed=3)
    first = math.squared_norms(batch[:4])
    assert math.squared_norms(batch)[:4] == first
    assert math.squared_norms(batch[4:]) == [math.squared_norm(s) for s in batch[4:]]
