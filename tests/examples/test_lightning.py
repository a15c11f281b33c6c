"""examples/lightning_train.py under Lightning's own Trainer: 2 CPU ranks, DDPStrategy, manual optimization.

The ranks come from the repository's harness (spawned processes, file rendezvous, LOCAL_RANK set):
Lightning finds the process group already made and launches nothing. One run of the ranks fits
three times:

1. 8 steps (2 epochs) straight, with a callback that checks every step's ``.grad`` (heads included)
   against GradVac on the rank-mean task gradients, computed independently as
   tests/distributed/ddp_bodies.py does: a plain copy of the network, its local Jacobian
   all-gathered and averaged, then ``GradVac``; the example's ModelCheckpoint saves each epoch;
2. a fresh module and Trainer resumed from the first epoch's checkpoint to step 8: bit-identical to (1);
3. the same without restoring the GradVac state (the control): it must differ, or (2) proves nothing.
"""

from __future__ import annotations

import copy
import logging
import os
import sys

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from examples import lightning_train as example
from gradvac_dist import GradVac
from tests.distributed.ddp_bodies import block_columns, reference_grad
from tests.distributed.harness import run_distributed
from tests.distributed.launchers import free_port, run

STEPS, EPOCH_STEPS, BATCH = 8, 4, 8
GROUPING = "module"
PARTS = ("encoder", "heads.0", "heads.1", "heads.2")


def _local_jacobian(net, x, y) -> torch.Tensor:
    params = list(net.parameters())
    losses = example.task_losses(net(x), y)
    rows = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]))
    return torch.stack(rows)


class ReferenceCheck(Callback):
    """Before every optimizer step: this rank's ``.grad`` against GradVac on the rank-mean task gradients."""

    def __init__(self) -> None:
        self.errors: list[dict[str, float]] = []
        self.expected_norms: list[dict[str, float]] = []
        self.corrected: list[bool] = []  # whether GradVac changed anything: else the sum would pass too

    def on_fit_start(self, trainer, pl_module) -> None:
        self.plain = copy.deepcopy(pl_module.net)  # after the precision plugin's conversion: float64
        self.opt = torch.optim.SGD(self.plain.parameters(), lr=pl_module.lr, momentum=0.9)
        self.agg = GradVac(beta=0.5, seed=0)
        self.cols, self.sizes = block_columns(self.plain, GROUPING, ["encoder"])  # the test's own partition
        names = [n for n, _ in self.plain.named_parameters()]
        numels = [p.numel() for p in self.plain.parameters()]
        starts = [sum(numels[:i]) for i in range(len(numels))]
        self.slices = {
            part: torch.cat([torch.arange(s, s + k) for n, s, k in zip(names, starts, numels) if n.startswith(part)])
            for part in PARTS
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch
        local = _local_jacobian(self.plain, x, y)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        self.expected = reference_grad(self.agg, torch.stack(gathered).mean(0), self.cols, self.sizes)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        got = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in pl_module.net.parameters()]
        )
        exp = self.expected
        self.errors.append(
            {part: float((got[ix] - exp[ix]).norm() / exp[ix].norm()) for part, ix in self.slices.items()}
        )
        self.expected_norms.append({part: float(exp[ix].norm()) for part, ix in self.slices.items()})
        self.corrected.append(bool(self.agg.last_result.corrected.any()))
        off = 0  # the reference network steps along the reference gradient
        for p in self.plain.parameters():
            p.grad = exp[off : off + p.numel()].view_as(p).clone()
            off += p.numel()
        self.opt.step()
        self.opt.zero_grad()


class WithoutGradVacRestore(example.GradVacModule):
    """The control: Lightning restores weights, optimizer and loops, but the GradVac state starts afresh."""

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        pass


def _fit(world, module=example.GradVacModule, ckpt_in=None, save_dir=None, callbacks=()):
    torch.manual_seed(0)
    # float64 from the start: Lightning loads a checkpoint's weights before "64-true" converts the module
    model = module(grouping=GROUPING).double()
    loader = DataLoader(example.SyntheticTasks(EPOCH_STEPS * BATCH * world), batch_size=BATCH, shuffle=True)
    trainer = example.make_trainer(
        "cpu", world, STEPS, save_dir=save_dir, save_every=EPOCH_STEPS, log_every=10**6, precision="64-true",
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_in)
    return {
        "params": torch.cat([p.detach().flatten() for p in model.net.parameters()]),
        "targets": model.gradvac.trajectory.targets.clone(),
        "gradvac_step": model.gradvac.step,
        "global_step": trainer.global_step,
        "dtype": str(next(model.parameters()).dtype),
    }


def _lightning_body(rank, world, save_dir):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # never used: the process group exists already
    logging.getLogger("lightning").setLevel(logging.ERROR)
    check = ReferenceCheck()
    straight = _fit(world, save_dir=save_dir, callbacks=[check])
    saved = sorted(os.listdir(save_dir))
    first_epoch = os.path.join(save_dir, f"epoch=0-step={EPOCH_STEPS}.ckpt")
    resumed = _fit(world, ckpt_in=first_epoch)
    control = _fit(world, module=WithoutGradVacRestore, ckpt_in=first_epoch)
    return {
        "errors": check.errors,
        "expected_norms": check.expected_norms,
        "corrected": check.corrected,
        "saved": saved,
        "saved_gradvac_step": torch.load(first_epoch, weights_only=True)["gradvac"]["step"],
        "straight": straight,
        "resumed": resumed,
        "control": control,
    }


def test_lightning_ddp_is_exact_and_resumes_identically(tmp_path):
    results = run_distributed(_lightning_body, 2, str(tmp_path / "checkpoints"), timeout=240)
    for rank, res in enumerate(results):
        assert res["straight"]["dtype"] == "torch.float64"
        assert len(res["errors"]) == STEPS, rank  # the check ran at every step
        assert sum(res["corrected"]) >= STEPS // 2, res["corrected"]  # GradVac corrected most steps
        for step, (errs, norms) in enumerate(zip(res["errors"], res["expected_norms"])):
            assert all(norms[part] > 0 for part in PARTS), (rank, step, norms)  # no part's gradient is trivially 0
            assert all(errs[part] < 1e-10 for part in PARTS), (rank, step, errs)
        assert res["saved"] == [f"epoch=0-step={EPOCH_STEPS}.ckpt", f"epoch=1-step={STEPS}.ckpt"]
        assert res["saved_gradvac_step"] == EPOCH_STEPS  # the state went into the checkpoint (weights_only loads it)
        straight, resumed, control = res["straight"], res["resumed"], res["control"]
        assert straight["global_step"] == resumed["global_step"] == STEPS
        assert resumed["gradvac_step"] == STEPS  # the saved state was loaded: 4 steps + 4 more
        assert torch.equal(resumed["params"], straight["params"]), rank
        assert torch.equal(resumed["targets"], straight["targets"]), rank
        # The control resumes everything but GradVac's state: its trajectory departs from the straight one.
        assert control["gradvac_step"] == STEPS - EPOCH_STEPS
        assert not torch.equal(control["targets"], straight["targets"])
        assert not torch.equal(control["params"], straight["params"])
    for key in ("straight", "resumed"):  # every rank holds the same parameters and targets
        assert torch.equal(results[0][key]["params"], results[1][key]["params"])
        assert torch.equal(results[0][key]["targets"], results[1][key]["targets"])


def test_lightning_example_as_a_script(tmp_path, monkeypatch):
    """As its docstring says: Lightning's own launcher starts rank 1, and a checkpoint per epoch holds GradVac's state.

    (Resuming is the same ``fit(ckpt_path=...)`` as above; one launch keeps the test short.)"""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # Lightning's launcher would pick one: raceable
    save_dir = tmp_path / "checkpoints"
    args = ["--devices", "2", "--batch", "4", "--steps", "34", "--log-every", "16", "--save-dir", str(save_dir)]
    out = run([sys.executable, "examples/lightning_train.py", *args], tmp_path)
    assert "done: 34 steps on 2 process(es) (gloo), GradVac step 34" in out
    assert "step   32  losses" in out
    assert sorted(os.listdir(save_dir)) == ["epoch=0-step=32.ckpt"]
    saved = torch.load(save_dir / "epoch=0-step=32.ckpt", weights_only=True)
    assert saved["global_step"] == 32 and saved["gradvac"]["step"] == 32
