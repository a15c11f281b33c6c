"""examples/hf_trainer.py under the Hugging Face Trainer: 2 CPU ranks, DDP built by the Trainer.

The ranks come from the repository's harness (spawned processes, file rendezvous, LOCAL_RANK and
WORLD_SIZE set): the Trainer finds the process group made. One run of the ranks trains three times:

1. 4 optimizer steps of 2 micro-batches straight, saving at step 2, with a Trainer subclass that
   checks, after the last micro-batch of every step, each rank's ``.grad`` (heads included) against
   GradVac on the rank-mean task gradients summed over the micro-batches, computed independently
   from a plain float64 copy of the network (its local Jacobian all-gathered and averaged, then
   ``GradVac``); the copy then follows the reference gradient through the same clipping,
   optimizer and learning-rate schedule;
2. a fresh model and Trainer resumed from the step-2 checkpoint to step 4: identical to (1);
3. the same without loading ``gradvac.pt`` (the control): it must differ, or (2) proves nothing.

And the script itself under torchrun: a straight run and a resumed one print the same ``done:`` line.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

example = pytest.importorskip("examples.hf_trainer", reason="transformers is not installed (the [transformers] extra)")

from gradvac_dist import GradVac  # noqa: E402
from tests.distributed.ddp_bodies import block_columns, loss_jacobian, rank_mean, reference_grad  # noqa: E402
from tests.distributed.harness import run_distributed  # noqa: E402
from tests.distributed.launchers import run, torchrun  # noqa: E402

STEPS, SAVE_AT, BATCH, ACCUM = 4, 2, 4, 2


def _flat_grad(module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()])


class CheckedTrainer(example.GradVacTrainer):
    """Compares every optimizer step's ``.grad`` with the reference computed from ``plain``."""

    def __init__(self, *args, plain, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plain = plain
        self.ref_agg = GradVac(beta=0.5, seed=0)
        self.cols, self.sizes = block_columns(plain, "module", ["encoder"])
        self.ref_sum = 0
        self.ref_opt = None
        self.errors: list[float] = []
        self.corrected: list[bool] = []

    def _rank_mean_jacobian(self, inputs) -> torch.Tensor:
        losses = example.task_losses(self.plain(inputs["input_ids"]), inputs["labels"])
        local = loss_jacobian(losses, list(self.plain.parameters())) / self.current_gradient_accumulation_steps
        return rank_mean(local)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.ref_sum = self.ref_sum + self._rank_mean_jacobian(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            expected = reference_grad(self.ref_agg, self.ref_sum, self.cols, self.sizes)
            self.ref_sum = 0
            self.corrected.append(bool(self.ref_agg.last_result.corrected.any()))
            got = _flat_grad(self.accelerator.unwrap_model(model))
            self.errors.append(float((got - expected).norm() / expected.norm()))
            # the reference network follows the reference gradient: the same clipping, optimizer and lr
            if self.ref_opt is None:
                inner = self.optimizer.optimizer  # the Trainer's optimizer, its hyperparameters copied
                self.ref_opt = type(inner)(self.plain.parameters())
                self.ref_opt.param_groups[0].update({k: v for k, v in inner.param_groups[0].items() if k != "params"})
            off = 0
            for p in self.plain.parameters():
                p.grad = expected[off : off + p.numel()].view_as(p).clone()
                off += p.numel()
            torch.nn.utils.clip_grad_norm_(self.plain.parameters(), self.args.max_grad_norm)
            for group in self.ref_opt.param_groups:
                group["lr"] = self.lr_scheduler.get_last_lr()[0]
            self.ref_opt.step()
            self.ref_opt.zero_grad()
        return loss


class WithoutGradVacRestore(example.GradVacTrainer):
    """The control: the Trainer restores weights, optimizer, schedule and data position, not GradVac."""

    def train(self, resume_from_checkpoint=None, **kwargs):
        return example.Trainer.train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def _fit(trainer_cls, out_dir, resume=None, **extra):
    model = example.make_model(float64=True)
    args = example.training_arguments(
        out_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, max_steps=STEPS,
        save_steps=SAVE_AT, logging_steps=10**6,
    )  # fmt: skip
    trainer = trainer_cls(model=model, args=args, train_dataset=example.SyntheticTasks(64), **extra)
    trainer.train(resume_from_checkpoint=resume)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return trainer, params


def _trainer_body(rank, world, out_dir):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # never used: the process group exists already
    os.environ.setdefault("MASTER_PORT", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    plain = example.make_model(float64=True)
    checked, straight = _fit(CheckedTrainer, out_dir, plain=plain)
    ckpt = os.path.join(out_dir, f"checkpoint-{SAVE_AT}")
    resumed_trainer, resumed = _fit(example.GradVacTrainer, out_dir, resume=ckpt)
    control_trainer, control = _fit(WithoutGradVacRestore, out_dir, resume=ckpt)
    return {
        "is_ddp": type(checked.model_wrapped).__name__,
        "errors": checked.errors,
        "corrected": checked.corrected,
        "ref_param_err": float((straight - torch.cat([p.detach().flatten() for p in plain.parameters()])).abs().max()),
        "steps": (checked.state.global_step, checked.gradvac.step),
        "saved_step": torch.load(os.path.join(ckpt, example.GRADVAC_FILE), weights_only=True)["step"],
        "resumed_steps": (resumed_trainer.state.global_step, resumed_trainer.gradvac.step),
        "resumed_diff": float((resumed - straight).abs().max()),
        "control_diff": float((control - straight).abs().max()),
        "control_gradvac_step": control_trainer.gradvac.step,
    }


def test_trainer_grad_is_gradvac_of_the_rank_mean_gradients_and_resumes(tmp_path):
    results = run_distributed(_trainer_body, 2, str(tmp_path / "out"), timeout=240)
    for res in results:
        assert res["is_ddp"] == "DistributedDataParallel"
        assert len(res["errors"]) == STEPS
        assert max(res["errors"]) < 1e-10, res["errors"]
        assert any(res["corrected"]), "GradVac never corrected: the plain sum would pass too"
        assert res["ref_param_err"] < 1e-10
        assert res["steps"] == (STEPS, STEPS)
        assert res["saved_step"] == SAVE_AT
        assert res["resumed_steps"] == (STEPS, STEPS)
        assert res["resumed_diff"] == 0.0, res["resumed_diff"]
        assert res["control_gradvac_step"] == STEPS - SAVE_AT  # its GradVac started afresh
        assert res["control_diff"] > 1e-9, "the control resumed identically: the test proves nothing"


def test_hf_trainer_example_with_torchrun(tmp_path):
    out = tmp_path / "out"
    args = ["examples/hf_trainer.py", "--output-dir", str(out), "--steps", "3", "--save-steps", "2", "--batch", "4"]
    straight = run([*torchrun(), *args], tmp_path)
    assert "done: 3 steps on 2 process(es), GradVac step 3" in straight
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3"]
    assert os.path.isfile(out / "checkpoint-2" / example.GRADVAC_FILE)
    resumed = run([*torchrun(), *args[:-4], "--steps", "4", "--save-steps", "2", "--batch", "4", "--resume"], tmp_path)
    assert "done: 4 steps on 2 process(es), GradVac step 4" in resumed


def test_hf_trainer_example_on_one_process(tmp_path):
    out = run([sys.executable, "examples/hf_trainer.py", "--output-dir", str(tmp_path / "o"), "--steps", "2"], tmp_path)
    assert "done: 2 steps on 1 process(es), GradVac step 2" in out
