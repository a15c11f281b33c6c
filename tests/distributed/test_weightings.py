"""TorchJD's Gramian weightings through the same engine as GradVac: exact under DDP and FSDP2 against
TorchJD's own aggregators on the rank-mean Jacobian, whole model and per block, 2 and 3 ranks."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import weighting_bodies as bodies
from tests.distributed.harness import run_distributed
from tests.settings import needs_fsdp_on_cpu

NAMES = ["UPGrad", "MGDA", "PCGrad", "DualProj", "IMTL-G", "Aligned-MTL"]
LAYOUTS = [("whole", None), ("parameter", ["encoder"])]  # the whole model; per block (the encoder's tensors)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("grouping", "shared"), LAYOUTS)
def test_ddp_equals_torchjd_on_the_rank_mean_jacobian(world, grouping, shared):
    results = run_distributed(bodies.ddp_body, world, NAMES, grouping, shared, timeout=240)
    for name in NAMES:
        first = results[0][name]
        for res in (r[name] for r in results):
            assert res["err"] < 1e-10, (name, grouping, res["err"])
            assert res["step"] == 2 and res["calls"]["gramian_all_reduce"] == 2, (name, res["calls"])
            # identical on every rank, bit for bit
            assert torch.equal(res["params"], first["params"]) and torch.equal(res["generator"], first["generator"])


@needs_fsdp_on_cpu
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("grouping", "shared"), LAYOUTS)
def test_fsdp_equals_torchjd_on_the_rank_mean_jacobian(world, grouping, shared):
    for res in run_distributed(bodies.fsdp_body, world, NAMES, grouping, shared, timeout=240):
        for name in NAMES:
            assert res[name]["err"] < 1e-10 and res[name]["step"] == 2, (name, grouping, res[name])


def test_stateful_and_matrix_weightings_are_refused():
    for res in run_distributed(bodies.refused_body, 2, timeout=60):
        assert res["stateful"] is not None and "keeps state between steps" in res["stateful"]
        assert res["matrix"] is not None and "weighs the Jacobian itself" in res["matrix"]


def test_any_callable_is_a_weighting_and_every_rank_combines_with_the_same_weights():
    results = run_distributed(bodies.any_callable_body, 2, timeout=120)
    for name in ("function", "lambda", "rank_dependent", "python_random"):
        for res in results:
            assert res[name]["step"] == 2, name
            if res[name]["err"] is not None:  # the first rank's weights on the rank-mean Jacobian
                assert res[name]["err"] < 1e-12, (name, res[name]["err"])
            assert torch.equal(res[name]["grads"], results[0][name]["grads"]), name  # bit-identical
    assert results[1]["failing"] == ("ValueError", "this weighting fails on rank 1")
    kind, message = results[0]["failing"]
    assert kind == "RuntimeError" and "raised on rank(s) [1]" in message, results[0]["failing"]
    for res in results:  # nothing advanced on any rank
        assert res["failing_state"][0] == 0
        assert torch.equal(res["failing_state"][1], results[0]["failing_state"][1])
