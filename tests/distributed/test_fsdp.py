"""FSDP2 path: exactness against the core on rank-mean gradients (and against the DDP path),
lockstep state, one Gramian all-reduce per step, the all-gathers of one plain backward, a DCP
round trip that resumes the same trajectory, and loud failures on misuse (FSDP1 among them).

All configurations share one spawned 2-rank run (spawning costs seconds on 2 cores).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import fsdp_bodies
from tests.distributed.harness import run_distributed
from tests.settings import FSDP_ON_CPU, needs_fsdp_on_cpu

WORLD = 2
STEPS = 3
M = fsdp_bodies.M
CONFIGS = [
    {"grouping": "whole", "raf": True, "ddp": True},
    {"grouping": "parameter", "raf": True, "ddp": True},
    {"grouping": "module", "raf": True, "ddp": True},
    {"grouping": "module", "raf": False, "prior": True},  # existing .grad: accumulated onto
    {"grouping": "whole", "raf": False, "shared": ["encoder"]},
    {"grouping": "parameter", "raf": True, "shared": ["encoder", "gain"], "ddp": True},
    {"grouping": "module", "raf": True, "mp": True},  # MixedPrecisionPolicy(float32 compute, float64 reduce)
    {"grouping": "module", "raf": True, "accum": 2},  # a micro-batch with gradient sync off, then one with it on
    {"grouping": "parameter", "raf": False, "accum": 3, "mp": True},  # accumulated in float64, computed in float32
    {"grouping": "whole", "raf": True, "between": True},  # reshard_between_passes=True
]


@pytest.fixture(scope="module")
def run():
    configs = [dict(cfg, steps=STEPS) for cfg in CONFIGS]
    return run_distributed(fsdp_bodies.equivalence_body, WORLD, configs, timeout=150)


def _per_rank(run, c):
    return [run[r]["configs"][c] for r in range(WORLD)]


@needs_fsdp_on_cpu
@pytest.mark.parametrize("c", range(len(CONFIGS)), ids=[str(cfg) for cfg in CONFIGS])
def test_equivalence_with_core_and_ddp(run, c):
    cfg = CONFIGS[c]
    for res in _per_rank(run, c):
        assert res["max_rel_err"] < 1e-10, (cfg, res["max_rel_err"])
        if cfg.get("ddp"):
            assert res["max_rel_err_ddp"] < 1e-10, (cfg, res["max_rel_err_ddp"])
        assert torch.allclose(res["targets"], res["ref_targets"], atol=1e-10, rtol=0), cfg
        assert torch.allclose(res["params"], res["ref_params"], atol=1e-10, rtol=0), cfg
        assert res["placements_ok"], "every .grad must be a DTensor placed like its parameter, same local shape"


@needs_fsdp_on_cpu
@pytest.mark.parametrize("c", range(len(CONFIGS)), ids=[str(cfg) for cfg in CONFIGS])
def test_lockstep_and_communication(run, c):
    cfg = CONFIGS[c]
    per_rank = _per_rank(run, c)
    first = per_rank[0]
    accum = cfg.get("accum", 1)
    for res in per_rank:
        # every rank ends bit-identical
        assert torch.equal(res["params"], first["params"]), cfg
        assert torch.equal(res["targets"], first["targets"]), cfg
        assert torch.equal(res["generator"], first["generator"]), cfg
        assert res["step"] == STEPS
        # registration and the first step prove the settings; every later step, the inputs (W flags)
        expected = {"gramian_all_reduce": STEPS, "agreement_all_reduce": 2, "input_all_reduce": STEPS - 1}
        assert res["calls"] == expected, (cfg, res["calls"])
        for plain, step in zip(res["plain_counts"], res["step_counts"]):
            # two all-reduces a step: the Gramians, and the settings (first step) or the input checks (later)
            assert step["all_reduce"] == 2, (cfg, step)
            # FSDP reduce-scatters each task's gradient: m passes, each as many groups as in a plain backward;
            # micro-batches with gradient sync off reduce nothing (their sums ride in the last one's passes)
            rs, plain_rs = fsdp_bodies._reduce_scatters(step), fsdp_bodies._reduce_scatters(plain)
            assert rs == M * plain_rs - _unreached(cfg), (
                cfg,
                step,
                plain,
            )
            # no gradient all-gather; parameter all-gathers exactly those of one plain forward + backward
            ag, plain_ag = fsdp_bodies._all_gathers(step), fsdp_bodies._all_gathers(plain)
            if cfg.get("between"):
                assert ag > plain_ag, "reshard_between_passes=True re-all-gathers in later passes (the control)"
            else:
                assert ag == accum * plain_ag, (cfg, step, plain)
    # the stash is m x (this rank's shard): summed over ranks, exactly m*n elements (no padding)
    assert sum(res["stash_bytes"] for res in per_rank) == M * first["n"] * 8
    assert max(res["stash_bytes"] for res in per_rank) <= 1.25 * first["formula_bytes"]


def _unreached(cfg) -> int:
    # Each head is its own FSDP group, reached by one task only: in the other m-1 passes FSDP has
    # no gradient for it and skips its reduce-scatter (a plain backward reduces every head once).
    return M * (M - 1)


@needs_fsdp_on_cpu
def test_misuse_fails_loudly(run):
    expected = {
        "fsdp1": ("ValueError", "FSDP1 (FullyShardedDataParallel) is not supported"),
        "fsdp1_backward": ("ValueError", "FSDP1 (FullyShardedDataParallel) is not supported"),
        "not_sharded": ("ValueError", "needs a module sharded with FSDP2"),
        "not_registered": ("ValueError", "needs GradVac registered on this FSDP2 model first"),
        "registered_twice": ("ValueError", "already registered on this model"),
        "shared_state": ("ValueError", "already used by another DDP module or FSDP2 model"),
        "wrong_count": ("ValueError", "got 2 losses but GradVacState(num_tasks=3)"),
        "aggregator_given": ("ValueError", "drop the aggregator argument"),
        "sync_contradicts_switch": ("ValueError", "contradicts the model's set_requires_gradient_sync(False)"),
        "not_root": ("ValueError", "not the root of its forward"),
        "replicated_strategy": ("ValueError", "is a DDP setting"),
        "nonfinite_raise": ("NonFiniteGradientError", "task 1's gradient is not finite"),
    }
    for rank in range(WORLD):
        res = run[rank]["misuse"]
        for case, (err_type, fragment) in expected.items():
            assert res[case] is not None, f"{case} did not raise"
            assert res[case][0] == err_type and fragment in res[case][1], (case, res[case])
        step, skipped, grads_finite, no_targets = res["skip"]
        assert (step, skipped, grads_finite, no_targets) == (0, 1, False, True), res["skip"]
        assert res["after_skip_step"] == 1
        assert res["plain_backward_grads"] == 11  # every parameter but the unreached spare head's two


@needs_fsdp_on_cpu
def test_dcp_checkpoint_round_trip_and_resume(tmp_path):
    results = run_distributed(fsdp_bodies.checkpoint_body, WORLD, str(tmp_path), timeout=120)
    for res in results:
        saved, loaded = res["saved"], res["loaded"]
        assert loaded["step"] == saved["step"] == 2
        assert torch.equal(loaded["targets"], saved["targets"])
        assert torch.equal(loaded["generator"], saved["generator"])
        straight, resumed = res["straight"], res["resumed"]
        assert resumed["step"] == straight["step"] == 4
        assert torch.equal(resumed["generator"], straight["generator"])
        assert torch.equal(resumed["targets"], straight["targets"])
        assert torch.equal(resumed["params"], straight["params"])
        assert res["fresh_loaded"] == (0, True)
        assert res["wrong_grouping"][0] == "ValueError" and "grouping 'module' differs" in res["wrong_grouping"][1]
        assert res["wrong_grouping_step"] == 0
    assert torch.equal(results[0]["resumed"]["targets"], results[1]["resumed"]["targets"])


@needs_fsdp_on_cpu
def test_dcp_resume_on_another_world_size(tmp_path):
    """2 ranks save after 2 steps; 1 rank resumes: the same trajectory as 4 steps on 2 ranks."""
    ckpt = str(tmp_path / "step2")
    straight = run_distributed(fsdp_bodies.resume_body, 2, 0, 4, timeout=120)[0]
    run_distributed(fsdp_bodies.resume_body, 2, 0, 2, None, ckpt, timeout=120)
    resumed = run_distributed(fsdp_bodies.resume_body, 1, 2, 4, ckpt, timeout=120)[0]
    assert resumed["step"] == straight["step"] == 4
    assert torch.equal(resumed["generator"], straight["generator"])
    assert torch.allclose(resumed["targets"], straight["targets"], atol=1e-12, rtol=0)
    assert torch.allclose(resumed["params"], straight["params"], atol=1e-12, rtol=0)


def test_fsdp2_on_cpu_refused_without_cpu_streams():
    """On a torch whose CPU streams lack record_event (2.6), FSDP2 cannot run on a CPU mesh: register_fsdp
    says so. Checked on every release, by hiding the method where torch has it."""
    for res in run_distributed(fsdp_bodies.refused_without_cpu_streams_body, WORLD, FSDP_ON_CPU, timeout=120):
        kind, message = res
        assert kind == "RuntimeError" and "torch.cpu.Stream.record_event" in message and "2.7" in message, res


HSDP = [2, 2]  # 2 replicas x 2 shards: 4 ranks
HSDP_CONFIGS = [
    {"grouping": "whole", "raf": True, "hsdp": HSDP},
    {"grouping": "parameter", "raf": False, "hsdp": HSDP, "shared": ["encoder"]},
    {"grouping": "module", "raf": True, "hsdp": HSDP, "accum": 2},
    {"grouping": "module", "raf": True, "hsdp": HSDP, "prior": True},
]


@needs_fsdp_on_cpu
def test_hsdp_on_a_2x2_mesh_is_exact_and_in_lockstep():
    """HSDP (replicate across 2, shard within 2): each task's rank-mean gradient arrives sharded and
    averaged across replicas; the replicas divide their shard's Gramian columns, the one all-reduce
    spans all 4 ranks, and every rank runs the identical step."""
    configs = [dict(cfg, steps=2) for cfg in HSDP_CONFIGS]
    results = run_distributed(fsdp_bodies.equivalence_body, 4, configs, timeout=240)
    for c, cfg in enumerate(configs):
        first = results[0]["configs"][c]
        for res in (r["configs"][c] for r in results):
            assert res["max_rel_err"] < 1e-10, (cfg, res["max_rel_err"])
            assert torch.allclose(res["targets"], res["ref_targets"], atol=1e-10, rtol=0), cfg
            assert torch.allclose(res["params"], res["ref_params"], atol=1e-10, rtol=0), cfg
            assert res["placements_ok"], cfg
            assert torch.equal(res["params"], first["params"]) and torch.equal(res["targets"], first["targets"])
            assert res["calls"]["gramian_all_reduce"] == 2, res["calls"]


@needs_fsdp_on_cpu
def test_hsdp_dcp_round_trip_and_resume(tmp_path):
    results = run_distributed(fsdp_bodies.checkpoint_body, 4, str(tmp_path), HSDP, timeout=240)
    for res in results:
        straight, resumed = res["straight"], res["resumed"]
        assert resumed["step"] == straight["step"] == 4
        assert torch.equal(resumed["targets"], straight["targets"])
        assert torch.equal(resumed["params"], straight["params"])
        assert res["wrong_grouping"][0] == "ValueError"


@needs_fsdp_on_cpu
def test_hsdp_counts_every_element_once_in_the_gramians():
    for err in run_distributed(fsdp_bodies.hsdp_gramian_body, 4, HSDP, timeout=120):
        assert err < 1e-10, err
