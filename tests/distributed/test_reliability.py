"""Reliability under DDP: non-finite gradients, GradScaler, desynchronisation guard, dying ranks."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from tests.distributed import reliability_bodies as bodies
from tests.distributed.harness import run_distributed


@pytest.mark.parametrize("strategy", ["replicated", "sharded"])
def test_nonfinite_raises_on_every_rank_and_leaves_state_untouched(strategy):
    results = run_distributed(bodies.nonfinite_body, 2, strategy, "raise", timeout=120)
    for res in results:
        assert res[0] == ("ok", None) and res[2] == ("ok", None), "clean steps must pass"
        kind, (message, task, where) = res[1]
        reached_by_task_1 = ("encoder.", "gain", "heads.1.")
        assert kind == "error" and task == 1 and where is not None and where.startswith(reached_by_task_1), res[1]
        assert "task 1's gradient is not finite" in message and "on at least one rank" in message
        assert res["untouched"] and res["step"] == 2
    assert torch.equal(results[0]["targets"], results[1]["targets"])


@pytest.mark.parametrize("strategy", ["replicated", "sharded"])
def test_nonfinite_skip_gives_nonfinite_grads_and_untouched_state(strategy):
    results = run_distributed(bodies.nonfinite_body, 2, strategy, "skip", timeout=120)
    for res in results:
        assert all(res[s] == ("ok", None) for s in range(3))
        assert res["finite0"] and not res["finite1"] and res["finite2"], "a GradScaler must see inf/NaN at step 1"
        assert res["untouched"] and res["step"] == 2
    assert torch.equal(results[0]["targets"], results[1]["targets"])


@pytest.mark.parametrize("eps, rtol", [(0.0, 1e-10), (1e-8, 1e-4)])
def test_grad_scaler_matches_unscaled(eps, rtol):
    """Cosines and corrections are scale-invariant: only eps breaks the symmetry (slightly)."""
    for res in run_distributed(bodies.scaler_body, 2, 2.0**16, eps, timeout=120):
        (plain_params, plain_targets, plain_steps), (scaled_params, scaled_targets, scaled_steps) = res
        assert plain_steps == scaled_steps == 3
        assert torch.allclose(scaled_params, plain_params, rtol=rtol, atol=rtol * 1e-2)
        assert torch.allclose(scaled_targets, plain_targets, rtol=0, atol=rtol)


@pytest.mark.parametrize(("check_sync_every", "strategy"), [(None, "sharded"), (2, "sharded"), (None, "replicated")])
def test_desync_is_caught_at_the_next_step_naming_what_differs(check_sync_every, strategy):
    results = run_distributed(bodies.desync_body, 2, check_sync_every, strategy, timeout=120)
    for errors in results:
        assert len(errors) == 1
        step, message = errors[0]
        # the per-step fingerprint in the Gramian all-reduce sees the corruption made before step 2 at step 2,
        # with either strategy, with or without the periodic full guard (which would only run after step 3)
        assert step == 2
        assert "out of sync" in message and "EMA targets" in message


@pytest.mark.parametrize("strategy", ["sharded", "replicated"])
def test_a_dying_rank_makes_the_others_fail_not_hang(strategy):
    with tempfile.TemporaryDirectory() as tmp:
        marker = os.path.join(tmp, "victim_started")
        results = run_distributed(
            bodies.dying_rank_body, 3, 2, marker, strategy, timeout=90, grace=60, expect_dead=frozenset({2})
        )
        assert os.path.exists(marker), "the victim must have reached the point where it dies"
    assert results[2] is None
    for outcome, err_type, elapsed in results[:2]:
        assert outcome == "raised", (outcome, err_type)
        assert elapsed < 60, f"survivors took {elapsed:.1f}s to notice"
