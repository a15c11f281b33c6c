"""Blocks: layouts per grouping, partial Gramians of pieces, combining pieces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradvac_dist._blocks import (
    GRAMIAN_CHUNK,
    combine,
    contiguous_segments,
    layout_of,
    partial_gramians,
    segments_of_range,
)
from tests.settings import DTYPE, RTOL, randn_


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.scale = nn.Parameter(torch.ones(8))  # a parameter owned by a non-leaf module
        self.head = nn.Linear(8, 2)


def test_layout_groupings():
    net = Net()
    params = list(net.parameters())
    whole = layout_of(net, params, "whole")
    assert whole.num_blocks == 1 and whole.block_sizes == (sum(p.numel() for p in params),)
    per_param = layout_of(net, params, "parameter")
    assert per_param.num_blocks == len(params)
    assert per_param.block_sizes == tuple(p.numel() for p in params)
    per_module = layout_of(net, params, "module")
    # root (scale), trunk.0, trunk.2, head
    assert per_module.names == ("<root>", "trunk.0", "trunk.2", "head")
    assert per_module.block_sizes == (8, 4 * 8 + 8, 8 * 8 + 8, 8 * 2 + 2)


def test_layout_shared_params_and_errors():
    net = Net()
    params = list(net.parameters())
    lay = layout_of(net, params, "module", shared_params=net.trunk.parameters())
    assert lay.num_blocks == 2
    assert [b for b in lay.param_blocks] == [-1, 0, 0, 1, 1, -1, -1]
    with pytest.raises(ValueError, match="grouping must be one of"):
        layout_of(net, params, "layer")
    with pytest.raises(ValueError, match="not trainable parameters of the model"):
        layout_of(net, params[:2], "whole", shared_params=[params[3]])
    with pytest.raises(ValueError, match="shared_params is empty"):
        layout_of(net, params, "whole", shared_params=[])
    with pytest.raises(ValueError, match="needs the module"):
        layout_of(None, params, "module")


def test_segments():
    segs = contiguous_segments([3, 4, 5])
    assert segs == [(0, 0, 3), (1, 3, 7), (2, 7, 12)]
    assert segments_of_range(segs, 2, 9) == [(0, 0, 1), (1, 1, 5), (2, 5, 7)]
    assert segments_of_range(segs, 12, 15) == []


@pytest.mark.parametrize("width", [5, GRAMIAN_CHUNK + 17, 3 * GRAMIAN_CHUNK])
def test_partial_gramians_match_plain_products_and_add_across_pieces(width):
    m = 4
    jac = randn_(m, width + 10, generator=torch.Generator().manual_seed(width))
    sizes = [width, 10]
    segs = contiguous_segments(sizes)
    G = partial_gramians(jac, segs, 2)
    assert G.dtype == torch.float64
    ref0 = jac[:, :width].double() @ jac[:, :width].double().T
    assert torch.allclose(G[0], ref0, rtol=RTOL * 100, atol=0)
    # the Gramian of a vector is the sum of the partial Gramians of any split of it
    cut = width // 2 + 1
    acc = partial_gramians(jac[:, :cut], segments_of_range(segs, 0, cut), 2)
    partial_gramians(jac[:, cut:], segments_of_range(segs, cut, width + 10), 2, out=acc)
    assert torch.allclose(acc, G, rtol=RTOL * 100, atol=0)


def test_partial_gramians_skip_unacted_columns_and_half_precision():
    jac = torch.randn(3, 20, dtype=torch.bfloat16)
    G = partial_gramians(jac, [(-1, 0, 5), (0, 5, 20)], 1)
    ref = jac[:, 5:].float() @ jac[:, 5:].float().T
    assert torch.allclose(G[0].float(), ref, rtol=1e-5)


def test_combine():
    m = 3
    jac = randn_(m, 12, generator=torch.Generator().manual_seed(0))
    coef = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]], dtype=torch.float64)
    segs = [(0, 0, 4), (-1, 4, 6), (1, 6, 12)]
    out = combine(jac, coef, segs)
    assert out.dtype == DTYPE
    expected = torch.cat([coef[0].to(DTYPE) @ jac[:, :4], jac[:, 4:6].sum(0), coef[1].to(DTYPE) @ jac[:, 6:]])
    assert torch.allclose(out, expected, rtol=RTOL)
    buf = torch.full((12,), 7.0, dtype=DTYPE)
    assert combine(jac, coef, segs, out=buf) is buf and torch.allclose(buf, expected, rtol=RTOL)
