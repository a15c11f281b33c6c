"""The demo's tasks and model trained with UPGrad (TorchJD's Gramian weighting) under DDP, exactly.

    torchrun --nproc_per_node 2 -m examples.upgrad_ddp    # from the repository root; CPU, gloo; needs torchjd

The same as GradVac under DDP, with one argument more: ``GradVacState(..., weighting=...)`` runs
the weighting on each block's all-reduced Gramian instead of GradVac's coefficient stage, so every
rank's ``.grad`` is TorchJD's ``UPGrad()`` applied to the rank-mean per-task gradients.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchjd.aggregation import UPGradWeighting

import gradvac_dist
from examples.demo.data import load


class MultiTaskMLP(nn.Module):
    """The demo's model: a shared trunk of two ReLU layers and one linear head per task."""

    def __init__(self, in_features: int, hidden: int, num_classes: list[int]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64, help="batch size per rank")
    ap.add_argument("--grouping", default="whole", choices=gradvac_dist.GROUPINGS)
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    data = load(3)  # left digit, right digit, parity of their sum
    torch.manual_seed(0)  # the same initial weights on every rank
    model = MultiTaskMLP(data.num_features, 64, [t.num_classes for t in data.tasks])
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    state = gradvac_dist.GradVacState(num_tasks=len(data.tasks), grouping=args.grouping, weighting=UPGradWeighting())
    gradvac_dist.register_ddp(ddp, state)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        idx = torch.randint(len(data.x_train), (args.batch,), generator=g)
        outs = ddp(data.x_train[idx])
        losses = [F.cross_entropy(out, data.y_train[idx, i]) for i, out in enumerate(outs)]
        gradvac_dist.backward(ddp, losses)  # m backward passes; UPGrad on the all-reduced Gramians
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        outs = ddp.module(data.x_heldout)
    accuracy = [float((out.argmax(1) == data.y_heldout[:, i]).double().mean()) for i, out in enumerate(outs)]
    if rank == 0:
        tasks = ", ".join(f"{t.name} {a:.1%}" for t, a in zip(data.tasks, accuracy))
        print(f"done: {args.steps} UPGrad steps on {world} ranks; held-out accuracy: {tasks}", flush=True)
    dist.barrier()
    # Leave now, all work and output done, without freeing the DDP module or the process group: with
    # gloo, the process group's destructor runs under the GIL while its worker threads may need it,
    # which can deadlock or abort the exit (seen on torch 2.13 under load; pytorch#56297).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
