"""examples/accelerate_fsdp2.py: accelerate's FSDP2 with GradVac, exact and resumable.

1. In the harness (2 spawned gloo ranks, LOCAL_RANK set, so accelerate finds the process group made):
   the example's own ``build`` and ``train_step`` in float64, with ``accelerator.accumulate`` over
   1 and 2 micro-batches; before every optimizer step, each rank's sharded ``.grad`` (gathered) is
   compared with GradVac on the rank-mean task gradients, computed independently from a plain
   copy of the network (its local Jacobian all-gathered and averaged, then ``GradVac``); the plain
   copy follows the reference gradient with the same optimizer.
2. Under ``accelerate launch --config_file launch/accelerate_fsdp2_cpu.yaml``, as a user starts it:
   a straight run saving with ``accelerator.save_state`` at step 2, and a run resumed from it with
   ``load_state``; the resumed steps repeat the straight ones to the printed 10 decimals, and the
   saved custom checkpoint is the GradVac state at step 2.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

from examples import accelerate_fsdp2 as example
from gradvac_dist import GradVac
from tests.distributed.ddp_bodies import block_columns, loss_jacobian, rank_mean, reference_grad
from tests.distributed.fsdp_bodies import full_grad, full_params
from tests.distributed.harness import run_distributed
from tests.distributed.launchers import accelerate, free_port, run
from tests.settings import needs_fsdp_on_cpu

pytestmark = needs_fsdp_on_cpu

STEPS = 4
SHARED = ["embed", "encoder"]


def _rank_mean_jacobian(plain, args, step: int, rank: int) -> torch.Tensor:
    """Sum over micro-batches of the rank-mean per-task gradients of the plain network."""
    params = list(plain.parameters())
    total = 0
    for micro in range(args.grad_accum):
        x, ys = example.micro_batch(args, step, micro, rank, torch.device("cpu"))
        total = total + rank_mean(loss_jacobian(example.task_losses(plain(x), ys, args.grad_accum), params))
    return total


def _exactness_body(rank, world, grad_accum):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # never used: the process group exists already
    os.environ.setdefault("MASTER_PORT", "1")
    args = example.parser().parse_args(
        ["--float64", "--grad-accum", str(grad_accum), "--hidden", "12", "--depth", "2", "--batch", "4"]
    )
    run_ = example.build(args)
    plain = example.make_model(args)
    ref_opt = torch.optim.AdamW(plain.parameters(), lr=args.lr)
    ref_agg = GradVac(beta=0.5, seed=0)
    cols, sizes = block_columns(plain, "module", SHARED)
    errors, corrected, seen = [], [], []
    for step in range(STEPS):
        expected = reference_grad(ref_agg, _rank_mean_jacobian(plain, args, step, rank), cols, sizes)
        corrected.append(bool(ref_agg.last_result.corrected.any()))

        def check(r, expected=expected):
            got = full_grad(r.model)
            seen.append(r.state.step)
            errors.append(float((got - expected).norm() / expected.norm()))

        example.train_step(run_, args, step, before_update=check)
        off = 0
        for p in plain.parameters():  # the reference network steps along the reference gradient
            p.grad = expected[off : off + p.numel()].view_as(p).clone()
            off += p.numel()
        ref_opt.step()
        ref_opt.zero_grad()
    return {
        "is_fsdp2": run_.accelerator.is_fsdp2,
        "errors": errors,
        "seen_steps": seen,
        "corrected": corrected,
        "param_err": float((full_params(run_.model) - full_params(plain)).abs().max()),
        "gradvac_step": run_.state.step,
    }


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_accelerate_fsdp2_grad_is_gradvac_of_the_rank_mean_gradients(grad_accum):
    results = run_distributed(_exactness_body, 2, grad_accum, timeout=150)
    for res in results:
        assert res["is_fsdp2"]
        assert res["seen_steps"] == list(range(1, STEPS + 1))  # checked once per optimizer step, after GradVac
        assert max(res["errors"]) < 1e-12, res["errors"]
        assert res["param_err"] < 1e-12
        assert res["gradvac_step"] == STEPS
        assert any(res["corrected"]), "GradVac never corrected: the plain sum would pass too"


def _step_lines(out: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^step\s+(\d+)\s.*$", out, re.MULTILINE)}


def test_accelerate_fsdp2_example_resumes_with_the_gradvac_state(tmp_path):
    ckpt = tmp_path / "ckpt"
    launch = [*accelerate(), "--config_file", "launch/accelerate_fsdp2_cpu.yaml", "--main_process_port",
              str(free_port()), "examples/accelerate_fsdp2.py"]  # fmt: skip
    args = ["--steps", str(STEPS), "--log-every", "1", "--grad-accum", "2", "--hidden", "16", "--depth", "2",
            "--checkpoint-dir", str(ckpt)]  # fmt: skip
    straight = run([*launch, *args, "--save-every", "2"], tmp_path=tmp_path)
    assert f"done: {STEPS} steps on 2 process(es) (DistributedType.FSDP), GradVac step {STEPS}" in straight
    assert sorted(os.listdir(ckpt)) == ["step000002", "step000004"]
    saved = torch.load(ckpt / "step000002" / "custom_checkpoint_0.pkl", weights_only=True)
    assert saved["step"] == 2 and any(v != 0 for v in saved["targets"]), saved
    shutil.rmtree(ckpt / "step000004")
    launch[launch.index("--main_process_port") + 1] = str(free_port())
    resumed = run([*launch, *args, "--resume"], tmp_path=tmp_path)
    assert f"resumed from {ckpt / 'step000002'} at GradVac step 2" in resumed
    assert f"GradVac step {STEPS}" in resumed
    lines = _step_lines(resumed)
    assert set(lines) == {2, 3}
    assert all(lines[s] == _step_lines(straight)[s] for s in (2, 3)), (lines, _step_lines(straight))
