"""Every bad input we know of on the single-process public API, one test per row of the table in
docs/reliability.md.

`python -m tests.unit.test_bad_inputs` prints the markdown rows; `test_docs_list_every_case`
keeps docs/reliability.md in step with this table. Distributed misuse (DDP/FSDP) is tested in the
distributed suite and listed in docs/reliability.md under its own rows.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn

import gradvac_dist
from gradvac_dist import (
    GradVac,
    GradVacState,
    GramianWeightedAggregator,
    draw_order,
    gradvac_step,
)
from gradvac_dist._checkpoint import load_checkpoint, save_checkpoint


class Case(NamedTuple):
    api: str
    bad_input: str
    call: Callable[[], object]
    error: type[BaseException]
    message: str  # a fragment of the message


def _G(m=3, k=1):
    x = torch.randn(m, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (x @ x.T).repeat(k, 1, 1)


def _T(m=3, k=1):
    return torch.zeros(k, m, m, dtype=torch.float64)


def _O(m=3):
    return draw_order(m, torch.Generator().manual_seed(0))


def _sparse_backward():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    out = model(torch.tensor([1, 2, 3])).squeeze(-1)
    gradvac_dist.backward(model, [out[0], out[1:].sum()], GradVac())


def _asym():
    g = _G()
    g[0, 0, 1] += 10.0
    return g


def _nan_g():
    g = _G()
    g[0, 1, 1] = math.nan
    return g


def _bad_order():
    o = _O()
    o[0, 0] = 0
    return o


def _agg_then(call):
    agg = GradVac()
    agg(torch.randn(3, 10, dtype=torch.float64))
    return lambda: call(agg)


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()


def _losses(model):
    out = model(torch.randn(5, 3, dtype=torch.float64))
    return [out[:, 0].mean(), out[:, 1].mean()]


def _nonfinite_jac():
    j = torch.randn(3, 10, dtype=torch.float64)
    j[1, 2] = math.inf
    return j


class _StatefulWeighting:
    """Shaped like TorchJD's stateful weightings (which have reset()), without importing TorchJD."""

    def __call__(self, gramian):
        return torch.ones(gramian.shape[0])

    def reset(self):
        pass


class _MatrixWeighting:
    """Named like TorchJD's matrix-weighting base class: a weighting of the Jacobian, not of the Gramian."""

    def __call__(self, matrix):
        return torch.ones(matrix.shape[0])


def _corrupt(tmp: pathlib.Path) -> pathlib.Path:
    p = tmp / "corrupt.pt"
    p.write_bytes(b"not a checkpoint")
    return p


CASES = [
    Case(
        "gradvac_step",
        "gramians not [K, m, m]",
        lambda: gradvac_step(_G()[0], _T(), _O()),
        ValueError,
        "gramians must be a tensor of shape [K, m, m]",
    ),
    Case(
        "gradvac_step",
        "targets of another shape",
        lambda: gradvac_step(_G(), _T(4), _O()),
        ValueError,
        "targets must have the shape of gramians",
    ),
    Case(
        "gradvac_step",
        "order not LongTensor [m, m-1]",
        lambda: gradvac_step(_G(), _T(), _O().float()),
        ValueError,
        "order must be a LongTensor of shape [m, m-1]",
    ),
    Case(
        "gradvac_step",
        "order row not a permutation of the other tasks",
        lambda: gradvac_step(_G(), _T(), _bad_order()),
        ValueError,
        "must be a permutation of the tasks other than i",
    ),
    Case(
        "gradvac_step",
        "asymmetric Gramian",
        lambda: gradvac_step(_asym(), _T(), _O()),
        ValueError,
        "every Gramian must be symmetric",
    ),
    Case(
        "gradvac_step",
        "inf/NaN in a Gramian",
        lambda: gradvac_step(_nan_g(), _T(), _O()),
        ValueError,
        "gramians contain inf or NaN",
    ),
    Case(
        "gradvac_step",
        "beta outside [0, 1]",
        lambda: gradvac_step(_G(), _T(), _O(), beta=1.5),
        ValueError,
        "beta must be a number in [0, 1]",
    ),
    Case(
        "gradvac_step",
        "eps < 0",
        lambda: gradvac_step(_G(), _T(), _O(), eps=-1.0),
        ValueError,
        "eps must be a number >= 0",
    ),
    Case(
        "gradvac_step",
        "no task (m < 1)",
        lambda: gradvac_step(torch.zeros(1, 0, 0), torch.zeros(1, 0, 0), torch.zeros(0, 0, dtype=torch.long)),
        ValueError,
        "need at least one block and one task",
    ),
    Case("draw_order", "m < 1", lambda: draw_order(0, torch.Generator()), ValueError, "m must be an int >= 1"),
    Case(
        "draw_order",
        "not a CPU generator",
        lambda: draw_order(3, None),
        ValueError,
        "generator must be a CPU torch.Generator",
    ),
    Case(
        "GradVac",
        "beta / eps / seed out of range",
        lambda: GradVac(beta=-0.5),
        ValueError,
        "beta must be a number in [0, 1]",
    ),
    Case(
        "GradVac",
        "unknown on_nonfinite",
        lambda: GradVac(on_nonfinite="warn"),
        ValueError,
        "on_nonfinite must be one of",
    ),
    Case(
        "GradVac()(J)",
        "J not a floating [m, n] matrix",
        lambda: GradVac()(torch.zeros(3, dtype=torch.float64)),
        ValueError,
        "expects a floating-point Jacobian of shape [m, n]",
    ),
    Case(
        "GradVac()(J, block_sizes)",
        "block sizes not positive or not summing to n",
        lambda: GradVac()(torch.zeros(2, 10), [4, 4]),
        ValueError,
        "block_sizes must be positive integers summing",
    ),
    Case(
        "GradVac()(J)",
        "another number of tasks than the state's",
        _agg_then(lambda a: a(torch.zeros(4, 10, dtype=torch.float64))),
        ValueError,
        "call reset() to start a new trajectory",
    ),
    Case(
        "GradVac()(J, block_sizes)",
        "other blocks than the state's",
        _agg_then(lambda a: a(torch.zeros(3, 10, dtype=torch.float64), [5, 5])),
        ValueError,
        "blocks changed between steps",
    ),
    Case(
        "GradVac()(J)",
        "inf/NaN task gradient (on_nonfinite='raise')",
        lambda: GradVac()(_nonfinite_jac()),
        gradvac_dist.NonFiniteGradientError,
        "task 1's gradient is not finite",
    ),
    Case(
        "GradVac.load_state_dict",
        "not a GradVac state_dict",
        lambda: GradVac().load_state_dict({"a": 1}),
        ValueError,
        "not a GradVac state_dict",
    ),
    Case(
        "backward",
        "plain module without aggregator",
        lambda: gradvac_dist.backward(_model(), _losses(_model())),
        ValueError,
        "a plain module needs aggregator=gradvac_dist.GradVac",
    ),
    Case(
        "backward", "no losses", lambda: gradvac_dist.backward(_model(), [], GradVac()), ValueError, "losses is empty"
    ),
    Case(
        "backward",
        "a loss that is not a scalar",
        lambda: gradvac_dist.backward(_model(), [torch.ones(2, requires_grad=True)], GradVac()),
        ValueError,
        "must be a scalar tensor",
    ),
    Case(
        "backward",
        "a loss not connected to the graph",
        lambda: gradvac_dist.backward(_model(), [torch.tensor(1.0)], GradVac()),
        ValueError,
        "does not require grad",
    ),
    Case(
        "backward",
        "a Python float as a loss",
        lambda: gradvac_dist.backward(_model(), [_losses(_model())[0], 0.0], GradVac()),
        ValueError,
        "losses[1] is a Python float",
    ),
    Case(
        "backward",
        "losses not a list (a float)",
        lambda: gradvac_dist.backward(_model(), 2.0, GradVac()),
        ValueError,
        "losses must be a list of scalar loss tensors",
    ),
    Case(
        "backward",
        "a parameter with sparse gradients (nn.Embedding(sparse=True))",
        lambda: _sparse_backward(),
        ValueError,
        "gets sparse gradients (Embedding(sparse=True))",
    ),
    Case(
        "backward",
        "unknown grouping",
        lambda: (lambda m: gradvac_dist.backward(m, _losses(m), GradVac(), grouping="layer"))(_model()),
        ValueError,
        "grouping must be one of",
    ),
    Case(
        "backward",
        "shared_params that are not the model's",
        lambda: (
            lambda m: gradvac_dist.backward(m, _losses(m), GradVac(), shared_params=[nn.Parameter(torch.ones(1))])
        )(_model()),
        ValueError,
        "not trainable parameters of the model",
    ),
    Case(
        "GradVacState", "num_tasks < 1", lambda: GradVacState(num_tasks=0), ValueError, "num_tasks must be an int >= 1"
    ),
    Case(
        "GradVacState",
        "unknown strategy",
        lambda: GradVacState(num_tasks=2, strategy="ring"),
        ValueError,
        "strategy must be one of",
    ),
    Case(
        "GradVacState",
        "shared_params not names",
        lambda: GradVacState(num_tasks=2, shared_params=[1]),
        ValueError,
        "shared_params must be a non-empty list of parameter names",
    ),
    Case(
        "GradVacState",
        "check_sync_every < 1",
        lambda: GradVacState(num_tasks=2, check_sync_every=0),
        ValueError,
        "check_sync_every must be None or an int >= 1",
    ),
    Case(
        "GramianWeightedAggregator, GradVacState(weighting=)",
        "a weighting with state of its own (TorchJD's Stateful ones, a module with buffers)",
        lambda: GramianWeightedAggregator(_StatefulWeighting()),
        ValueError,
        "keeps state between steps",
    ),
    Case(
        "GramianWeightedAggregator, GradVacState(weighting=)",
        "a weighting that needs the Jacobian (TorchJD's matrix weightings)",
        lambda: GramianWeightedAggregator(_MatrixWeighting()),
        ValueError,
        "weighs the Jacobian itself",
    ),
    Case(
        "GramianWeightedAggregator()(J)",
        "a weighting returning other than m weights",
        lambda: GramianWeightedAggregator(lambda g: torch.ones(1))(torch.randn(3, 10, dtype=torch.float64)),
        ValueError,
        "must return a tensor of m=3 weights",
    ),
    Case(
        "GradVacState.load_state_dict",
        "checkpoint of another grouping",
        lambda: GradVacState(num_tasks=2).load_state_dict({"grouping": "module"}),
        ValueError,
        "refusing to load it",
    ),
    Case(
        "save_checkpoint",
        "not a dict",
        lambda: save_checkpoint([1], "unused.pt"),
        ValueError,
        "save_checkpoint expects a dict",
    ),
    Case(
        "load_checkpoint",
        "missing file",
        lambda: load_checkpoint("/nonexistent/gradvac.pt"),
        FileNotFoundError,
        "no checkpoint at",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.api}: {c.bad_input}" for c in CASES])
def test_bad_input_gets_a_clear_error(case):
    with pytest.raises(case.error) as info:
        case.call()
    assert case.message in str(info.value), str(info.value)


def test_corrupt_checkpoint_file(tmp_path):
    with pytest.raises(ValueError, match="truncated, corrupt"):
        load_checkpoint(_corrupt(tmp_path))


def markdown_rows() -> list[str]:
    return [f"| `{c.api}` | {c.bad_input} | `{c.error.__name__}`: {c.message} |" for c in CASES]


def test_docs_list_every_case():
    page = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    missing = [row for row in markdown_rows() if row not in page]
    assert not missing, (
        "The bad-input table in docs/reliability.md is out of date; regenerate it with "
        "`python -m tests.unit.test_bad_inputs --write`:\n" + "\n".join(missing)
    )


def write_table(page: pathlib.Path) -> None:
    """Replaces the generated table's rows in ``page`` (the rows after the first table header that
    follows the "Bad inputs" heading) with :func:`markdown_rows`."""
    lines = page.read_text().split("\n")
    heading = next(i for i, line in enumerate(lines) if line.startswith("## Bad inputs"))
    start = next(i for i in range(heading, len(lines)) if lines[i].startswith("|---")) + 1
    stop = start
    while stop < len(lines) and lines[stop].startswith("| `"):
        stop += 1
    lines[start:stop] = markdown_rows()
    page.write_text("\n".join(lines))


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:  # python -m tests.unit.test_bad_inputs --write
        write_table(pathlib.Path(__file__).resolve().parents[2] / "docs" / "reliability.md")
    else:
        print("\n".join(markdown_rows()))
