"""Multi-task training with PyTorch Lightning (DDPStrategy, manual optimization) and exact GradVac.

Launch (CPU, 2 gloo processes on this machine; Lightning starts the second one itself):
    python examples/lightning_train.py --devices 2
    python examples/lightning_train.py --devices 2 --steps 64 --save-dir runs/lt   # 2 epochs, a checkpoint after each
    python examples/lightning_train.py --devices 2 --steps 64 --resume "runs/lt/epoch=0-step=32.ckpt"  # the same run
Launch (GPUs, NCCL): python examples/lightning_train.py --accelerator gpu --devices 2
Under torchrun or a cluster launcher Lightning takes the processes it is given (LOCAL_RANK is set).

The recipe, in ``GradVacModule`` below:
- ``automatic_optimization = False``: ``training_step`` calls ``gradvac_dist.backward(ddp, losses)``
  (one backward pass per task) instead of ``manual_backward``, then ``opt.step()``.
- ``on_fit_start``: ``gradvac_dist.register_ddp(self.trainer.strategy.model, state)``: the first hook
  at which the strategy model is the DistributedDataParallel (Lightning registers ``ddp_comm_hook=``
  only on CUDA; ``register_ddp`` is a no-op if it did, with the same state).
- ``DDPStrategy(find_unused_parameters=True)``: each task's pass reaches only its own head.
- ``on_save_checkpoint`` / ``on_load_checkpoint``: the GradVac state travels in Lightning's
  checkpoint. ``on_load_checkpoint`` runs before the DDP wrap and before the first step, so the
  resumed run starts from the saved targets and generator. Resumed from a checkpoint taken at the
  last step of an epoch (``make_trainer(save_dir=...)``), the run continues the same trajectory.

Gradients do not go through ``manual_backward``, so Lightning's fp16 loss scaling is not applied:
keep ``precision`` at 32 or bf16 (or 64-true, with the module built in float64: Lightning loads a
checkpoint's weights into the module before converting it).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gradvac_dist


class MultiTaskNet(nn.Module):
    """A shared encoder and one linear head per task."""

    def __init__(self, in_dim: int, hidden: int, num_tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [head(z).squeeze(-1) for head in self.heads]


class SyntheticTasks(Dataset):
    """A fixed synthetic 3-task regression set (task 1 conflicts with task 0): ``(x, y)``, ``y`` of one value per task."""

    def __init__(self, size: int, in_dim: int = 16, num_tasks: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        teachers = torch.randn(num_tasks, in_dim, generator=g)
        teachers[1] = -teachers[0] + 0.3 * teachers[1]
        self.x = torch.randn(size, in_dim, generator=g)
        self.y = torch.tanh(self.x @ teachers.T) + 0.1 * torch.randn(size, num_tasks, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


STEPS_PER_EPOCH = 32


def task_losses(outputs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    return [nn.functional.mse_loss(out, y[:, i]) for i, out in enumerate(outputs)]


class GradVacModule(LightningModule):
    def __init__(
        self, in_dim: int = 16, hidden: int = 64, num_tasks: int = 3, lr: float = 0.05, grouping: str = "whole"
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lr = lr
        self.net = MultiTaskNet(in_dim, hidden, num_tasks)
        # Same seed on every rank. shared_params names the parameters of the DDP-wrapped module, which
        # is this LightningModule: GradVac acts on the encoder, each head gets its task's gradient.
        self.gradvac = gradvac_dist.GradVacState(
            num_tasks=num_tasks, beta=0.5, seed=0, grouping=grouping, shared_params=["net.encoder"]
        )

    def on_fit_start(self) -> None:
        gradvac_dist.register_ddp(self.trainer.strategy.model, self.gradvac)

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = task_losses(self.net(x), y)
        opt = self.optimizers()
        gradvac_dist.backward(self.trainer.strategy.model, losses)  # m passes; every rank's .grad is GradVac's
        opt.step()
        opt.zero_grad()
        if (self.global_step - 1) % self.trainer.log_every_n_steps == 0:  # opt.step() counted this step
            self.print(f"step {self.global_step - 1:4d}  losses {' '.join(f'{v.item():.4f}' for v in losses)}")
            # GradVac's view of the step as plain floats (one host read, only on logging steps); the
            # same on every rank, so no sync_dist
            diagnostics = self.gradvac.diagnostics.summary()
            self.log_dict({f"gradvac/{k}": v for k, v in diagnostics.items() if k != "step"}, on_step=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gradvac"] = self.gradvac.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.gradvac.load_state_dict(checkpoint["gradvac"])


def make_trainer(
    accelerator: str,
    devices: int,
    steps: int,
    *,
    save_dir: str | None = None,
    save_every: int = STEPS_PER_EPOCH,
    log_every: int = 50,
    callbacks=(),
    **kwargs,
) -> Trainer:
    callbacks = list(callbacks)
    if save_dir is not None:
        # Saved at the end of every save_every-th step. Resume from one taken at an epoch's last step:
        # Lightning then starts the next epoch and the trajectory continues exactly. (Lightning restarts
        # an epoch that a checkpoint interrupted, and a trainer.save_checkpoint() after fit() resumes into
        # a shortened epoch.)
        callbacks.append(ModelCheckpoint(dirpath=save_dir, every_n_train_steps=save_every, save_top_k=-1))
    return Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=DDPStrategy(find_unused_parameters=True),
        max_steps=steps,
        log_every_n_steps=log_every,
        callbacks=callbacks,
        enable_checkpointing=save_dir is not None,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="max_steps: optimizer steps in all, resumed ones included")
    ap.add_argument("--devices", type=int, default=2, help="processes (CPU) or GPUs")
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu", "auto"])
    ap.add_argument("--batch", type=int, default=32, help="batch size per process")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--grouping", default="whole", choices=gradvac_dist.GROUPINGS)
    ap.add_argument("--save-dir", default=None, help="write a Lightning checkpoint here at every epoch's end")
    ap.add_argument("--resume", default=None, help="resume from this Lightning checkpoint (up to --steps in all)")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()

    if args.accelerator == "cpu":  # share the cores between the processes instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = GradVacModule(lr=args.lr, grouping=args.grouping)
    # An epoch is STEPS_PER_EPOCH steps (Lightning gives each process its share of the shuffled set).
    loader = DataLoader(
        SyntheticTasks(STEPS_PER_EPOCH * args.batch * args.devices), batch_size=args.batch, shuffle=True
    )
    trainer = make_trainer(args.accelerator, args.devices, args.steps, save_dir=args.save_dir, log_every=args.log_every)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=args.resume)
    trainer.print(
        f"done: {trainer.global_step} steps on {trainer.world_size} process(es) "
        f"({torch.distributed.get_backend()}), GradVac step {model.gradvac.step}"
    )
    trainer.strategy.barrier()
    # Leave now, all work and output done, without freeing the DDP module or the process group: with
    # gloo, the process group's destructor runs under the GIL while its worker threads may need it,
    # which can deadlock or abort the exit (seen on torch 2.13 under load; pytorch#56297).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
