"""Usage slips of a hostile user (issue: no silent wrong numbers): each is exact, or refused on every rank."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import usage_bodies as bodies
from tests.distributed.harness import run_distributed
from tests.settings import needs_fsdp_on_cpu


def test_ranks_set_up_differently_are_refused_on_every_rank_naming_the_setting():
    results = run_distributed(bodies.settings_differ_body, 2, timeout=180)
    named = {
        "seed": "seed: 0 on some ranks, 1 on others",
        "beta": "beta: 0.25 on some ranks, 0.5 on others",
        "eps": "eps: 1e-08 on some ranks, 1e-06 on others",
        "shared_params": "parameters GradVac acts on (shared_params)",
        "grouping": "grouping: 'whole' on some ranks, 'module' on others",
        "strategy": "strategy: 'sharded' on some ranks, 'replicated' on others",
        "on_nonfinite": "on_nonfinite: 'raise' on some ranks, 'skip' on others",
        "check_sync_every": "check_sync_every: 0 on some ranks, 5 on others",
        "num_tasks": "num_tasks: 2 on some ranks, 3 on others",
    }
    for res in results:
        for case, fragment in named.items():
            assert res[case] is not None, f"{case}: no error"
            kind, message = res[case]
            assert kind == "ValueError" and "set up differently across ranks" in message, (case, res[case])
            assert fragment in message, (case, message)
        for case in named:
            assert res[case + "/moved"] == 0, f"{case}: a collective ran before the refusal"
        # a load on one rank only is caught by the per-step fingerprint at the next step, named in full
        kind, message = res["loaded_on_one_rank"]
        assert kind == "RuntimeError" and "out of sync" in message and "step count" in message, message
    # the rank whose own set-up failed raises its own error; the other says why it stops too
    assert results[1]["setup_fails_on_one_rank"][0] == "ValueError"
    assert "match no parameter" in results[1]["setup_fails_on_one_rank"][1]
    assert results[0]["setup_fails_on_one_rank"][0] == "RuntimeError"
    assert "could not be set up on another rank" in results[0]["setup_fails_on_one_rank"][1]


@needs_fsdp_on_cpu
def test_fsdp_ranks_set_up_differently_are_refused_at_registration():
    results = run_distributed(bodies.fsdp_settings_differ_body, 2, timeout=180)
    for res in results:
        assert res["seed"][0] == "ValueError" and "seed: 0 on some ranks, 3 on others" in res["seed"][1]
        assert res["beta"][0] == "ValueError" and "beta: 0.1 on some ranks, 0.5 on others" in res["beta"][1]
    assert results[1]["setup_fails_on_one_rank"][0] == "ValueError"
    assert "could not be set up on another rank" in results[0]["setup_fails_on_one_rank"][1]


def test_backward_inside_autocast_equals_outside():
    for res in run_distributed(bodies.autocast_body, 2, timeout=120):
        assert res == {"ddp": 0.0}, res


def test_no_sync_alone_accumulates_exactly_and_contradictions_raise():
    for res in run_distributed(bodies.accumulation_body, 2, timeout=120):
        assert res["err"] < 1e-10 and res["steps"] == 1, res
        kind, message = res["sync_true_inside_no_sync"]
        assert kind == "ValueError" and "contradicts no_sync" in message
        kind, message = res["sync_false_outside"]
        assert kind == "ValueError" and "inside `with ddp.no_sync():`" in message


@pytest.mark.parametrize(("strategy", "bucket_view"), [("sharded", False), ("replicated", False), ("sharded", True)])
def test_forgotten_zero_grad_adds_like_plain_backward(strategy, bucket_view):
    for err in run_distributed(bodies.forgotten_zero_grad_body, 2, strategy, bucket_view, timeout=120):
        assert err < 1e-10, err


@pytest.mark.parametrize(("strategy", "grouping"), [("sharded", "whole"), ("replicated", "module")])
def test_forward_through_the_wrapped_module_is_exact_heads_included(strategy, grouping):
    results = run_distributed(bodies.module_forward_body, 2, strategy, grouping, timeout=120)
    for res in results:
        # before the fix head 0 (reached only by task 0) got exactly zero: relative error 1.0
        assert max(res["head_errs"]) < 1e-10 and max(res["errs"]) < 1e-10, res
        for missing in res["missing"]:  # every step: aux has a .grad on rank 1 too
            assert missing == ["spare.weight", "spare.bias"], missing
        assert torch.equal(res["params"], results[0]["params"]), "the ranks drifted apart"


def test_single_process_path_on_a_ddp_wrapped_module_is_refused():
    for res in run_distributed(bodies.wrapped_module_body, 2, timeout=120):
        for case in ("forward_through_ddp", "after_a_step"):
            assert res[case] is not None, f"{case}: no error (the ranks would drift apart)"
            kind, message = res[case]
            assert kind == "ValueError" and "a DistributedDataParallel wraps" in message, (case, message)
        # the forward around DDP before any DDP step: the job has 2 ranks, which is enough to know
        assert res["module_forward_first"] is not None, "module_forward_first: no error (the ranks would drift)"
        kind, message = res["module_forward_first"]
        assert kind == "ValueError" and "in a job of 2 ranks runs GradVac on this rank's" in message, message


def test_parameter_frozen_after_wrapping_is_exact_and_unfreezing_later_is_refused():
    for res in run_distributed(bodies.frozen_after_wrap_body, 2, timeout=120):
        assert res["err"] < 1e-10 and res["frozen_grad_is_none"], res
        kind, message = res["unfrozen"]
        assert kind == "ValueError" and "frozen or unfrozen after the first GradVac step" in message


def test_join_is_refused_on_every_rank():
    for res in run_distributed(bodies.join_body, 2, timeout=120):
        kind, message = res["join"]
        assert kind == "ValueError" and "does not support ddp.join()" in message and res["moved"] == 0


@pytest.mark.parametrize("first_hooked", [False, True])
def test_chained_ddp_modules_are_refused(first_hooked):
    for res in run_distributed(bodies.chained_body, 2, first_hooked, timeout=120):
        kind, message = res
        assert kind == "ValueError" and "chained DDP models" in message, res


def test_compiled_ddp_module_is_exact():
    for errs in run_distributed(bodies.compiled_body, 2, timeout=300):
        assert max(errs) < 1e-10, errs


def test_register_ddp_is_idempotent_and_refuses_conflicts():
    for res in run_distributed(bodies.register_ddp_body, 2, timeout=120):
        assert res["first"] and res["again"] and res["step"] == 1
        assert res["other_state"][0] == "ValueError" and "with another GradVacState" in res["other_state"][1]
        assert res["other_hook"][0] == "ValueError" and "another comm hook" in res["other_hook"][1]
        assert res["not_ddp"][0] == "ValueError" and "needs the DistributedDataParallel module" in res["not_ddp"][1]


def test_sparse_gradients_are_refused_on_every_rank_naming_the_parameter():
    for res in run_distributed(bodies.sparse_body, 2, timeout=60):
        assert res is not None, "sparse gradients were not refused"
        kind, message = res
        assert kind == "ValueError" and "'embed.weight' gets sparse gradients" in message, res


@pytest.mark.parametrize("first_step", [True, False])
def test_inputs_refused_on_one_rank_raise_promptly_on_every_rank_ddp(first_step):
    _check_one_rank_refuses(run_distributed(bodies.one_rank_refuses_body, 2, first_step, timeout=90), first_step)


@needs_fsdp_on_cpu
@pytest.mark.parametrize("first_step", [True, False])
def test_inputs_refused_on_one_rank_raise_promptly_on_every_rank_fsdp(first_step):
    results = run_distributed(bodies.one_rank_refuses_body, 2, first_step, True, timeout=90)
    _check_one_rank_refuses(results, first_step)


def _check_one_rank_refuses(results, first_step):
    own = {"constant": "does not require grad", "float": "is a Python float", "too_few": "got 2 losses but"}
    for bad, fragment in own.items():
        (kind1, message1), seconds1 = results[1][bad]
        assert kind1 == "ValueError" and fragment in message1, (bad, message1)
        assert results[0][bad][0] is not None, f"{bad}: rank 0 ran on (it would wait in the passes)"
        kind0, message0 = results[0][bad][0]
        assert kind0 == "RuntimeError" and ("on another rank" in message0 or "on rank(s) [1]" in message0), message0
        assert results[0][bad][1] < 10 and seconds1 < 10, (bad, results[0][bad][1], seconds1)  # promptly
        for res in results:  # nothing changed on any rank
            assert res[bad + "/step"] == (0 if first_step else 1) and res[bad + "/grads"] == [], (bad, res)
    (step0, grads0, gen0), (step1, grads1, gen1) = results[0]["after"], results[1]["after"]
    assert step0 == step1 == (1 if first_step else 2)
    assert torch.equal(grads0, grads1) and torch.equal(gen0, gen1)


@pytest.mark.parametrize("grouping", ["whole", "module"])
def test_per_task_data_with_one_forward_per_task_is_exact(grouping):
    for errs in run_distributed(bodies.per_task_data_body, 2, grouping, timeout=120):
        assert max(errs) < 1e-10, errs
