"""DDP hook: exactness against the core on rank-mean gradients, lockstep state, one Gramian
all-reduce per step, checkpoints across world sizes, and loud failures on misuse."""

from __future__ import annotations

import pickle

import pytest
import torch

from gradvac_dist import GradVacState, gradvac_hook
from gradvac_dist._ddp import check_ddp_configuration
from tests.distributed import ddp_bodies
from tests.distributed.harness import run_distributed

CONFIGS = [
    {"grouping": g, "strategy": s} for g in ("whole", "parameter", "module") for s in ("replicated", "sharded")
] + [
    {"grouping": "module", "strategy": "sharded", "shared": ["encoder"]},
    {"grouping": "parameter", "strategy": "replicated", "shared": ["encoder", "gain"]},
    {"grouping": "module", "strategy": "replicated", "bucket_view": True},
    {"grouping": "whole", "strategy": "sharded", "bucket_view": True},
    # task 0 reaches model.aux on rank 0 only: every rank still gets its aggregated gradient
    {"grouping": "module", "strategy": "sharded", "aux_ranks": (0,)},
    {"grouping": "whole", "strategy": "replicated", "aux_ranks": (0,), "bucket_view": True},
]


@pytest.mark.parametrize("world", [2, 3])
def test_reduce_scatter_in_pieces_is_bit_identical(world):
    """On gloo the sharded strategy's reduce-scatter of a large shard is several pipelined all-to-alls
    (gradvac_dist._comm.start_reduce_scatter_in_pieces): the same sums, so the same bits."""
    configs = [dict(cfg, steps=2) for cfg in CONFIGS if cfg["strategy"] == "sharded"]
    for whole, pieced in run_distributed(ddp_bodies.pieces_body, world, configs, 16, timeout=180):
        for cfg, a, b in zip(configs, whole, pieced):
            assert b["max_rel_err"] < 1e-10, (cfg, b["max_rel_err"])
            assert torch.equal(a["params"], b["params"]) and torch.equal(a["targets"], b["targets"]), cfg
            assert b["calls"]["task_reduce_scatter"] > a["calls"]["task_reduce_scatter"], (cfg, b["calls"])


@pytest.mark.parametrize("world", [2, 3])
def test_equivalence_with_core_and_lockstep(world):
    steps = 3
    configs = [dict(cfg, steps=steps) for cfg in CONFIGS]
    results = run_distributed(ddp_bodies.equivalence_body, world, configs, timeout=180)
    for c, cfg in enumerate(configs):
        per_rank = [results[r][c] for r in range(world)]
        first = per_rank[0]
        assert first["num_buckets"] >= 3, "the model must span several buckets for this test to mean much"
        for res in per_rank:
            assert res["max_rel_err"] < 1e-10, (cfg, res["max_rel_err"])
            assert torch.allclose(res["targets"], res["ref_targets"], atol=1e-10, rtol=0), cfg
            assert res["calls"]["gramian_all_reduce"] == steps, (cfg, res["calls"])
            assert res["calls"]["input_all_reduce"] == steps - 1, (cfg, res["calls"])  # after the first step
            assert res["step"] == steps
            # every rank ends bit-identical
            assert torch.equal(res["params"], first["params"]), cfg
            assert torch.equal(res["targets"], first["targets"]), cfg
            assert torch.equal(res["generator"], first["generator"]), cfg
        calls = first["calls"]
        m, n, buckets, stash = 3, first["numel"], first["num_buckets"], first["buffers"]["stash"]
        if cfg["strategy"] == "sharded":  # m n / W elements, plus at most one padding column per bucket
            assert m * n * 8 / world <= stash <= m * (n / world + buckets) * 8, (cfg, stash)
        else:
            assert stash == m * n * 8 and first["buffers"]["scratch"] == 0, (cfg, first["buffers"])
        if cfg["strategy"] == "sharded":
            assert calls["task_reduce_scatter"] == steps * 3 * first["num_buckets"]
            assert calls["result_all_gather"] == steps * first["num_buckets"]
            assert "task_all_reduce" not in calls
        else:
            assert calls["task_all_reduce"] == steps * 3 * first["num_buckets"]
            assert "task_reduce_scatter" not in calls and "result_all_gather" not in calls


def test_one_rank_is_exact_and_communicates_nothing():
    """W=1: both strategies are a copy into the stash; no collective of GradVac's runs."""
    configs = [dict(cfg, steps=2) for cfg in CONFIGS[:6]]
    for c, res in enumerate(run_distributed(ddp_bodies.equivalence_body, 1, configs, timeout=180)[0]):
        assert res["max_rel_err"] < 1e-10, (configs[c], res["max_rel_err"])
        assert res["calls"] == {}, (configs[c], res["calls"])
        assert res["buffers"]["stash"] == 3 * res["numel"] * 8


def test_checkpoint_resume_on_another_world_size():
    straight = run_distributed(ddp_bodies.checkpoint_body, 2, 4, timeout=120)[0]
    half = run_distributed(ddp_bodies.checkpoint_body, 2, 2, timeout=120)
    assert torch.equal(half[0]["gradvac"]["targets"], half[1]["gradvac"]["targets"])
    resumed = run_distributed(ddp_bodies.checkpoint_body, 3, 2, 2, half[0], timeout=120)[0]
    assert resumed["gradvac"]["step"] == straight["gradvac"]["step"] == 4
    assert torch.equal(resumed["gradvac"]["generator_state"], straight["gradvac"]["generator_state"])
    assert torch.allclose(resumed["gradvac"]["targets"], straight["gradvac"]["targets"], atol=1e-12, rtol=0)
    for key, value in straight["model"].items():
        assert torch.allclose(resumed["model"][key], value, atol=1e-12, rtol=0), key


def test_misuse_fails_loudly():
    results = run_distributed(ddp_bodies.misuse_body, 2, timeout=120)
    for res in results:
        expected = {
            "no_find_unused": ("ValueError", "find_unused_parameters=True"),
            "static_graph": ("ValueError", "static_graph=True"),
            "plain_backward": ("RuntimeError", "outside gradvac_dist.backward"),
            "wrong_count": ("ValueError", "got 2 losses but GradVacState(num_tasks=3)"),
            "not_registered": ("ValueError", "needs gradvac_hook registered"),
            "registered_twice": ("RuntimeError", "can only be called once"),
            "shared_state": ("ValueError", "already used by another DDP module"),
            "aggregator_given": ("ValueError", "drop the aggregator argument"),
        }
        assert set(res) == set(expected)
        for case, (err_type, fragment) in expected.items():
            assert res[case] is not None, f"{case} did not raise"
            assert res[case][0] == err_type and fragment in res[case][1], (case, res[case])


def test_hook_refuses_non_bucket_and_missing_reducer_api():
    with pytest.raises(TypeError, match="DistributedDataParallel comm hook"):
        gradvac_hook(GradVacState(num_tasks=2), torch.zeros(3))

    class FakeDDP:
        find_unused_parameters = True
        static_graph = False
        reducer = object()

    with pytest.raises(RuntimeError, match="lacks DistributedDataParallel.reducer.prepare_for_backward"):
        check_ddp_configuration(FakeDDP())


def test_state_pickles_without_process_group_and_validates():
    state = GradVacState(num_tasks=3, beta=0.3, seed=5, grouping="parameter", process_group=object())
    state.trajectory.advance(torch.eye(3, dtype=torch.float64).repeat(2, 1, 1), (4, 4), state.beta, state.eps)
    clone = pickle.loads(pickle.dumps(state))
    assert clone.process_group is None and clone.grouping == "parameter" and clone.settings.beta == 0.3
    assert clone.step == 1 and torch.equal(clone.trajectory.targets, state.trajectory.targets)
    assert torch.equal(clone.trajectory.generator.get_state(), state.trajectory.generator.get_state())
    for kwargs, match in [
        ({"num_tasks": 0}, "num_tasks must be an int >= 1"),
        ({"num_tasks": 2, "grouping": "layer"}, "grouping must be one of"),
        ({"num_tasks": 2, "strategy": "ring"}, "strategy must be one of"),
        ({"num_tasks": 2, "shared_params": [3]}, "shared_params must be a non-empty list of parameter names"),
        ({"num_tasks": 2, "beta": -1}, "beta must be a number in"),
    ]:
        with pytest.raises(ValueError, match=match):
            GradVacState(**kwargs)
    with pytest.raises(ValueError, match="grouping 'whole' differs"):
        state.load_state_dict(dict(state.state_dict(), grouping="whole"))


@pytest.mark.parametrize(("strategy", "through_module"), [("sharded", True), ("replicated", True), ("sharded", False)])
def test_a_channels_last_parameter_only_the_first_task_reaches_gets_its_gradient_in_its_layout(
    strategy, through_module
):
    results = run_distributed(ddp_bodies.first_task_conv_body, 2, strategy, through_module, timeout=120)
    for res in results:
        assert res["buckets"] >= 2, "the convolution and the last head must sit in different buckets"
        assert max(res["errs"]) < 1e-10, res["errs"]
        assert all(res["layouts"]), "conv.weight.grad must exist and keep the weight's channels_last strides"
        assert torch.equal(res["params"], results[0]["params"]), "the ranks drifted apart"


@pytest.mark.parametrize(("strategy", "conv"), [("replicated", False), ("sharded", False), ("sharded", True)])
def test_gradient_accumulation_runs_gradvac_once_on_accumulated_gradients(strategy, conv):
    for res in run_distributed(ddp_bodies.accumulation_body, 2, strategy, conv=conv, timeout=120):
        assert max(res["errs"]) < 1e-10, res["errs"]
        assert res["comm"] == 0, "micro-batches under no_sync must not communicate"
        assert res["gramian"] == 2, "one GradVac step per optimizer step"
        assert res["misuse"][0] == "ValueError" and "inside `with ddp.no_sync():`" in res["misuse"][1]
