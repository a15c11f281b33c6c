"""The per-step byte formulas of ``benchmarks/scale.py`` (behind docs/scale.md's sizes at W up to
1024) against what ``state.counters`` records at W = 2, 3, 4, both strategies; and docs/scale.md
holds the table those formulas give."""

from __future__ import annotations

import pathlib

import pytest
from torch.nn.parallel import DistributedDataParallel as DDP

import gradvac_dist
from benchmarks.scale import step_payload, table
from tests.distributed.ddp_bodies import M, batch, make_model, task_losses
from tests.distributed.harness import run_distributed

ROOT = pathlib.Path(__file__).resolve().parents[2]


def counted_body(rank, world, strategy, grouping):
    """Payload bytes per collective of the second step (the first also proves the settings)."""
    model = make_model()
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=25)  # one bucket
    state = gradvac_dist.GradVacState(num_tasks=M, grouping=grouping, strategy=strategy)
    ddp.register_comm_hook(state, gradvac_dist.gradvac_hook)
    for step in range(2):
        if step == 1:
            state.counters.reset()
        x, ys = batch(step, rank, world)
        gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
        ddp.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in model.parameters())
    num_blocks = len(state._driver.block_sizes)
    return {"bytes": dict(state.counters.bytes), "n": n, "blocks": num_blocks, "buckets": len(state._driver.plans)}


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize(("strategy", "grouping"), [("sharded", "module"), ("replicated", "whole")])
def test_counted_bytes_follow_the_formulas(world, strategy, grouping):
    for res in run_distributed(counted_body, world, strategy, grouping, timeout=120):
        assert res["buckets"] == 1
        expected = step_payload(res["n"], M, res["blocks"], world, strategy, grad_bytes=8)  # float64 model
        assert res["bytes"] == expected, (world, strategy, res["bytes"], expected)


def test_docs_scale_page_holds_the_table_the_formulas_give():
    page = (ROOT / "docs" / "scale.md").read_text()
    assert table() in page, "docs/scale.md is out of date: regenerate its table with `python -m benchmarks scale`"
