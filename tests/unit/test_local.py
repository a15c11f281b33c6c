"""The single-process path on models a user really has: mixed dtypes, 0-element parameters,
non-contiguous blocks, autocast around the call, an existing .grad. Each against the plain vector
form of GradVac (tests/reference.py) on the Jacobian the test forms itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradvac_dist
from gradvac_dist import GradVac, draw_order
from tests.reference import gradvac_reference
from tests.settings import DTYPE, RTOL


def _jacobian(losses, params) -> torch.Tensor:
    rows = []
    for i, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).flatten().double() for g, p in zip(gs, params)])
        )
    return torch.stack(rows)


def _reference(jac: torch.Tensor, sizes: list[int], columns: torch.Tensor | None = None) -> torch.Tensor:
    """One first step from zero targets, seed 0; columns outside the blocks get the plain sum."""
    m = jac.shape[0]
    cols = torch.arange(jac.shape[1]) if columns is None else columns
    out = jac.sum(0)
    order = draw_order(m, torch.Generator().manual_seed(0))
    out[cols] = gradvac_reference(jac[:, cols], sizes, torch.zeros(len(sizes), m, m, dtype=torch.float64), order)[0]
    return out


class _MixedDtypes(nn.Module):
    """A float32 layer and a bfloat16 gain in one model (e.g. a low-precision adapter)."""

    def __init__(self, gain_first: bool) -> None:
        super().__init__()
        if gain_first:  # the bfloat16 parameter first in the model's order
            self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.bfloat16))
        self.linear = nn.Linear(5, 4)
        if not gain_first:
            self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.bfloat16))

    def forward(self, x):
        h = self.linear(x) * self.gain.float()
        return [h[:, 0].pow(2).mean(), -h[:, 0].mean() + h[:, 1].mean(), h[:, 2:].sum()]


@pytest.mark.parametrize("gain_first", [False, True])
def test_parameters_of_several_dtypes(gain_first):
    torch.manual_seed(0)
    model = _MixedDtypes(gain_first)
    x = torch.randn(8, 5)
    params = list(model.parameters())
    expected = _reference(_jacobian(model(x), params), [sum(p.numel() for p in params)])
    gradvac_dist.backward(model, model(x), GradVac())
    for p in params:
        assert p.grad is not None and p.grad.dtype == p.dtype
    got = torch.cat([p.grad.double().flatten() for p in params])
    # the bfloat16 gain's gradient is rounded to bfloat16 (8 bits of mantissa): 2^-8 relative
    assert (got - expected).norm() / expected.norm() < 2**-7


@pytest.mark.parametrize("grouping", ["parameter", "module"])
def test_zero_element_parameter_is_no_block(grouping):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    model.register_parameter("empty", nn.Parameter(torch.zeros(0, dtype=DTYPE)))
    x = torch.randn(7, 4, dtype=DTYPE)

    def losses():
        out = model(x)
        return [out[:, i].pow(2).mean() for i in range(3)]

    params = [p for p in model.parameters()]
    sizes = [p.numel() for p in params if p.numel()] if grouping == "parameter" else [4 * 6 + 6, 6 * 3 + 3]
    expected = _reference(_jacobian(losses(), params), sizes)
    gradvac_dist.backward(model, losses(), GradVac(), grouping=grouping)
    got = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).double().flatten() for p in params])
    assert (got - expected).norm() / expected.norm() <= RTOL


def test_non_contiguous_blocks_and_shared_params_equal_the_reference():
    """Blocks whose parameters are interleaved with heads (shared_params): no column is gathered, and
    the result equals GradVac on the gathered block columns."""
    torch.manual_seed(2)
    trunk_a, head, trunk_b = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)
    model = nn.ModuleDict({"a": trunk_a, "h": head, "b": trunk_b}).to(DTYPE)
    x = torch.randn(6, 3, dtype=DTYPE)

    def losses():
        z = trunk_b(head(torch.tanh(trunk_a(x))))
        return [z[:, 0].mean(), -z[:, 0].mean() + 0.3 * z[:, 1].mean(), z.pow(2).mean()]

    params = list(model.parameters())
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    shared = [0, 1, 4, 5]  # a.weight, a.bias, b.weight, b.bias: two blocks, around the head's columns
    cols = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in shared])
    sizes = [params[i].numel() for i in shared]
    expected = _reference(_jacobian(losses(), params), sizes, cols)
    gradvac_dist.backward(model, losses(), GradVac(), grouping="parameter", shared_params=[params[i] for i in shared])
    got = torch.cat([p.grad.double().flatten() for p in params])
    assert (got - expected).norm() / expected.norm() <= RTOL


def test_autocast_around_backward_changes_nothing():
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(9, 6)
    grads = []
    for inside in (False, True):
        model = nn.Sequential(*[m for m in base])
        model.load_state_dict(base.state_dict())
        model.zero_grad(set_to_none=True)
        out = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            gradvac_dist.backward(model, [out[:, i].pow(2).mean() for i in range(3)], GradVac())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_an_existing_grad_is_added_to():
    torch.manual_seed(4)
    model = nn.Linear(4, 3).to(DTYPE)
    x = torch.randn(5, 4, dtype=DTYPE)
    gradvac_dist.backward(model, list(model(x).pow(2).mean(0)), GradVac(seed=5))
    once = [p.grad.clone() for p in model.parameters()]
    agg = GradVac(seed=5)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    gradvac_dist.backward(model, list(model(x).pow(2).mean(0)), agg)
    for p, g in zip(model.parameters(), once):
        assert torch.allclose(p.grad, g + 0.25, rtol=RTOL, atol=0)
