"""Multi-task training under DistributedDataParallel with exact GradVac (``gradvac_dist.gradvac_hook``).

Launch (CPU, gloo, 2 processes on this machine):
    torchrun --nproc_per_node 2 examples/ddp_train.py
    bash launch/ddp_cpu.sh --steps 200                  # the same, after setting up .venv
Launch (every GPU of this machine, NCCL):
    torchrun --nproc_per_node $(nvidia-smi -L | wc -l) examples/ddp_train.py
    bash launch/ddp_gpu.sh
Several nodes: see launch/multinode.sh.

Each rank draws its own share of a synthetic 3-task regression batch (two of the tasks conflict).
Every step does one forward pass, then ``gradvac_dist.backward(ddp, losses)``: one backward pass
per task, after which every rank's ``.grad`` is GradVac applied to the rank-mean task gradients,
bit-identical on all ranks.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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


def synthetic_batch(step: int, rank: int, batch: int, teachers: torch.Tensor, device: torch.device):
    """This rank's share of step ``step``'s batch: inputs and one target per task."""
    g = torch.Generator().manual_seed(1_000_003 * step + rank)  # a different slice of data on every rank
    x = torch.randn(batch, teachers.shape[1], generator=g)
    ys = torch.tanh(x @ teachers.T).T + 0.1 * torch.randn(teachers.shape[0], batch, generator=g)
    return x.to(device), ys.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="batch size per rank")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--grouping", default="whole", choices=gradvac_dist.GROUPINGS)
    ap.add_argument("--strategy", default=None, choices=gradvac_dist.STRATEGIES, help="default: by backend")
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument(
        "--per-task", action="store_true", help="each task trains on its own samples (one forward per task)"
    )
    args = ap.parse_args()

    # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process.
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and args.backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Share the cores between the processes of this machine instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    num_tasks, in_dim = 3, 16
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    teachers = torch.randn(num_tasks, in_dim)
    teachers[1] = -teachers[0] + 0.3 * teachers[1]  # task 1 conflicts with task 0
    model = MultiTaskNet(in_dim, 64, num_tasks).to(device)

    # 1. find_unused_parameters=True: each task's backward pass reaches only its own head. (DDP may
    #    warn once that the forward pass used every parameter: expected, the passes are what matter.)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None, find_unused_parameters=True)
    # 2. The GradVac state (same seed on every rank) and the hook. shared_params: GradVac acts on the
    #    encoder; each head gets the plain sum of its task gradients (LibMTL's convention).
    state = gradvac_dist.GradVacState(
        num_tasks=num_tasks, beta=0.5, seed=0, grouping=args.grouping, strategy=args.strategy, shared_params=["encoder"]
    )
    ddp.register_comm_hook(state, gradvac_dist.gradvac_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)

    for step in range(args.steps):
        x, ys = synthetic_batch(step, rank, args.batch, teachers, device)
        if args.per_task:  # per-task data: task t's loss on its own share of the batch, one forward each
            per = args.batch // num_tasks
            share = [slice(t * per, (t + 1) * per) for t in range(num_tasks)]
            losses = [nn.functional.mse_loss(ddp(x[share[t]])[t], ys[t, share[t]]) for t in range(num_tasks)]
        else:
            losses = [nn.functional.mse_loss(out, y) for out, y in zip(ddp(x), ys)]
        # 3. One backward pass per task; the hook reduces them and applies GradVac.
        gradvac_dist.backward(ddp, losses)
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            cos = state.last_result.cosines[0] if state.last_result is not None else None
            cos01 = "-" if cos is None else f"{float(cos[0, 1]):+.3f}"
            print(f"step {step:4d}  losses {' '.join(f'{v.item():.4f}' for v in losses)}  cos(task0, task1) {cos01}")
    if rank == 0:
        print(
            f"done: {args.steps} steps on {world} ranks ({dist.get_backend()}), GradVac step {state.step}", flush=True
        )
    dist.barrier()
    # Leave now, all work and output done, without freeing the DDP module or the process group: with
    # gloo, the process group's destructor runs under the GIL while its worker threads may need it,
    # which can deadlock or abort the exit (seen on torch 2.13 under load; pytorch#56297).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
