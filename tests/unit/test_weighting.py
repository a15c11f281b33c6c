"""Gramian weightings on one process: GramianWeightedAggregator against TorchJD's own aggregators, seeded
randomness, checkpoints, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as A
from torch import nn

import gradvac_dist
from gradvac_dist import GramianWeightedAggregator
from tests.settings import DTYPE, RTOL

GRAMIAN_METHODS = [
    (A.UPGradWeighting, A.UPGrad),
    (A.MGDAWeighting, A.MGDA),
    (A.DualProjWeighting, A.DualProj),
    (A.IMTLGWeighting, A.IMTLG),
    (A.AlignedMTLWeighting, A.AlignedMTL),
    (A.PCGradWeighting, A.PCGrad),
]


def _jacobian(m=4, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=g, dtype=DTYPE)
    jac[1] = -0.7 * jac[0] + 0.5 * jac[1]  # a conflicting pair
    return jac


def _seeded(seed: int, call):
    """The library's protocol for random weightings: one draw of the aggregator's generator seeds torch's."""
    draw = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(seed)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(draw)
        return call()


@pytest.mark.parametrize(("weighting", "aggregator"), GRAMIAN_METHODS, ids=lambda c: c.__name__)
def test_whole_and_per_block_equal_torchjd(weighting, aggregator):
    jac = _jacobian()
    whole = GramianWeightedAggregator(weighting(), seed=3)(jac)
    expected = _seeded(3, lambda: aggregator()(jac.double()))
    assert (whole.double() - expected).norm() / expected.norm() <= RTOL
    sizes = [100, 50, 150]
    blocks = GramianWeightedAggregator(weighting(), seed=3)(jac, sizes)
    parts = _seeded(3, lambda: [aggregator()(jac.double()[:, a : a + s]) for a, s in ((0, 100), (100, 50), (150, 150))])
    expected = torch.cat(parts)
    assert (blocks.double() - expected).norm() / expected.norm() <= RTOL


def test_a_torchjd_aggregator_gives_its_weighting():
    jac = _jacobian(seed=1)
    assert torch.equal(GramianWeightedAggregator(A.UPGrad())(jac), GramianWeightedAggregator(A.UPGradWeighting())(jac))


def test_random_draws_are_seeded_leave_the_global_generator_alone_and_resume():
    jacs = [_jacobian(seed=s) for s in range(4)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    full = GramianWeightedAggregator(A.PCGradWeighting(), seed=5)
    outs = [full(j) for j in jacs]
    assert torch.equal(torch.get_rng_state(), before), "the weighting's draws must not move the user's generator"
    half = GramianWeightedAggregator(A.PCGradWeighting(), seed=5)
    for j in jacs[:2]:
        half(j)
    resumed = GramianWeightedAggregator(A.PCGradWeighting(), seed=0)
    resumed.load_state_dict(half.state_dict())
    assert resumed.step == 2
    for j, out in zip(jacs[2:], outs[2:]):
        assert torch.equal(resumed(j), out)
    # and another seed gives other orders: the test can fail
    other = GramianWeightedAggregator(A.PCGradWeighting(), seed=6)
    assert any(not torch.equal(other(j), out) for j, out in zip(jacs, outs))


def test_backward_with_a_weighting_on_a_plain_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    x = torch.randn(6, 5, dtype=DTYPE)
    out = model(x)
    losses = [out[:, i].pow(2).mean() for i in range(3)]
    params = list(model.parameters())
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses]
    expected = A.UPGrad()(torch.stack(rows).double())
    gradvac_dist.backward(model, losses, GramianWeightedAggregator(A.UPGradWeighting()))
    got = torch.cat([p.grad.flatten() for p in params]).double()
    assert (got - expected).norm() / expected.norm() <= RTOL


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ema", torch.zeros(3))

    def forward(self, gramian):
        return torch.ones(gramian.shape[0])


def test_a_weighted_aggregator_without_a_weighting_is_refused_at_construction():
    with pytest.raises(ValueError, match="needs a Gramian weighting .* got None; for GradVac itself use"):
        GramianWeightedAggregator(None)


@pytest.mark.parametrize(
    ("weighting", "message"),
    [
        (A.GradVacWeighting(), "keeps state between steps"),
        (A.PCDWeighting(), "keeps state between steps"),
        (_WithBuffer(), "has parameters or buffers"),
        (A.MeanWeighting(), "weighs the Jacobian itself"),
        (A.RandomWeighting(), "weighs the Jacobian itself"),
        (A.Mean(), "an aggregator without a Gramian weighting"),
        (3.0, "must be a callable"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_what_cannot_run_identically_everywhere_is_refused(weighting, message):
    with pytest.raises(ValueError, match=message):
        GramianWeightedAggregator(weighting)
    with pytest.raises(ValueError, match=message):
        gradvac_dist.GradVacState(num_tasks=3, weighting=weighting)


def test_a_weighting_returning_the_wrong_shape_or_non_finite_weights_is_refused():
    jac = _jacobian()
    with pytest.raises(ValueError, match="must return a tensor of m=4 weights"):
        GramianWeightedAggregator(lambda g: torch.ones(2))(jac)
    with pytest.raises(ValueError, match="returned non-finite weights"):
        GramianWeightedAggregator(lambda g: torch.full((g.shape[0],), float("nan")))(jac)
