"""Elastic multi-task training with exact GradVac: checkpoints that survive a lost node.

Launch (CPU, gloo; ``--max_restarts`` lets torchrun restart the workers after a failure):
    torchrun --nproc_per_node 2 --max_restarts 1 examples/elastic_train.py --checkpoint runs/elastic
Several nodes (the same command on every node): ``MAX_RESTARTS=1 SCRIPT=examples/elastic_train.py
bash launch/multinode.sh --checkpoint runs/elastic``; on one machine, ``launch/two_nodes.sh``.
Across nodes set ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (multinode.sh does when MAX_RESTARTS is
given): with torch's shared rendezvous store a restart can hang (pytorch#135712, docs/usage.md).

The pattern, for any training loop:

1. At start, load the last complete checkpoint if there is one (a restart after a failure, or a
   resume on another number of ranks: the GradVac state does not depend on the world size).
2. Every ``--ckpt-every`` steps, rank 0 saves the model, the optimizer and the GradVac state
   (``state.state_dict()``: EMA targets, order generator, step) to a temporary file and renames
   it over the checkpoint, so a checkpoint is there whole or not at all, and every rank waits at a
   barrier until it is.
3. Each step's data follows from the step number alone (a global batch split across ranks), so a
   resumed run sees what an uninterrupted one would: with the same number of ranks it ends bit for
   bit where the uninterrupted run ends (``tests/multinode/test_two_nodes.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradvac_dist

#: checkpoint keys
MODEL_KEY, OPTIMIZER_KEY, GRADVAC_KEY, STEP_KEY = "model", "optimizer", "gradvac", "step"
NUM_TASKS, IN_DIM = 3, 12


class Net(nn.Module):
    """A shared trunk and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(IN_DIM, 32), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(NUM_TASKS))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]


def global_batch_share(step: int, rank: int, world: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s share of step ``step``'s global batch (the same batch whatever the world size)."""
    g = torch.Generator().manual_seed(7919 * step + 1)
    x = torch.randn(size, IN_DIM, generator=g, dtype=torch.float64)
    ys = torch.stack([x[:, 0] - x[:, 1], -x[:, 0] + 0.3 * x[:, 2], x[:, 3].sin()])
    per = size // world
    return x[rank * per : (rank + 1) * per], ys[:, rank * per : (rank + 1) * per]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--checkpoint", type=Path, required=True, help="folder of the checkpoint (and the final weights)")
    ap.add_argument("--global-batch", type=int, default=48, help="divisible by every world size you resume on")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds to wait after each step (demos, tests)")
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the world size {world}")
    args.checkpoint.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Net().double()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    state = gradvac_dist.GradVacState(num_tasks=NUM_TASKS, seed=0, grouping="module", shared_params=["trunk"])
    ddp.register_comm_hook(state, gradvac_dist.gradvac_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    ckpt = args.checkpoint / "checkpoint.pt"
    start = 0
    if ckpt.exists():  # 1. a restarted (or resized) job resumes from the last complete checkpoint
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved[MODEL_KEY])
        optimizer.load_state_dict(saved[OPTIMIZER_KEY])
        state.load_state_dict(saved[GRADVAC_KEY])
        start = saved[STEP_KEY]
        if rank == 0:
            print(f"resumed from step {start} on {world} ranks", flush=True)
    for step in range(start, args.steps):
        x, ys = global_batch_share(step, rank, world, args.global_batch)
        losses = [nn.functional.mse_loss(out, y) for out, y in zip(ddp(x), ys)]
        gradvac_dist.backward(ddp, losses)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.ckpt_every == 0:  # 2. whole or not at all, then every rank waits for it
            if rank == 0:
                tmp = ckpt.with_name(ckpt.name + ".tmp")
                saved = {MODEL_KEY: model.state_dict(), OPTIMIZER_KEY: optimizer.state_dict()}
                torch.save({**saved, GRADVAC_KEY: state.state_dict(), STEP_KEY: done}, tmp)
                os.replace(tmp, ckpt)
            dist.barrier()
        if rank == 0:
            with open(args.checkpoint / "progress", "a") as f:
                f.write(f"{done} {start}\n")
        time.sleep(args.step_sleep)
    final = {"params": torch.cat([p.detach().flatten() for p in model.parameters()]), "gradvac": state.state_dict()}
    torch.save({**final, "resumed_from": start, "world": world}, args.checkpoint / f"final_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        print(f"done: {args.steps} steps on {world} ranks, GradVac step {state.step}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no process-group teardown at exit: gloo's destructor can deadlock (pytorch#56297)


if __name__ == "__main__":
    main()
