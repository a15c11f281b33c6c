"""Multi-task training with Hugging Face accelerate and exact GradVac under DDP.

Launch (CPU, 2 gloo processes on this machine; accelerate 1.x has no --multi_cpu flag: --multi_gpu
plus Accelerator(cpu=True) below gives gloo processes):
    accelerate launch --multi_gpu --num_processes 2 --main_process_ip 127.0.0.1 --main_process_port 29500 \\
        examples/accelerate_train.py
    bash launch/accelerate_cpu.sh                       # the same with launch/accelerate_cpu.yaml
Launch (every GPU of this machine, NCCL):
    accelerate launch --config_file launch/accelerate_gpu.yaml examples/accelerate_train.py
One process (python examples/accelerate_train.py): no DDP, the GradVac aggregator is used instead.

The hook is registered on the model returned by ``accelerator.prepare`` (a DistributedDataParallel
built with find_unused_parameters=True); accelerate's own ``comm_hook=`` option only takes its
built-in hooks. Gradients come from ``gradvac_dist.backward``, not ``accelerator.backward``, so
keep mixed_precision "no" or "bf16" (fp16 loss scaling is not applied).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="batch size per process")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()

    # cpu=True on a machine without CUDA: launched with --multi_gpu, the processes then use gloo.
    # find_unused_parameters=True: each task's backward pass reaches only its own head.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    num_tasks, in_dim = 3, 16
    torch.manual_seed(0)
    teachers = torch.randn(num_tasks, in_dim)
    teachers[1] = -teachers[0] + 0.3 * teachers[1]  # task 1 conflicts with task 0
    model = MultiTaskNet(in_dim, 64, num_tasks)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)

    if isinstance(model, DistributedDataParallel):
        # Several processes: the hook goes on the prepared DDP model, after prepare().
        state = gradvac_dist.GradVacState(num_tasks=num_tasks, beta=0.5, seed=0, shared_params=["encoder"])
        model.register_comm_hook(state, gradvac_dist.gradvac_hook)
        aggregator = None
    else:
        # One process: the single-process aggregator does the same job.
        state, aggregator = None, gradvac_dist.GradVac(beta=0.5, seed=0)
    encoder_params = list(accelerator.unwrap_model(model).encoder.parameters())

    for step in range(args.steps):
        g = torch.Generator().manual_seed(1_000_003 * step + accelerator.process_index)  # this process's data
        x = torch.randn(args.batch, in_dim, generator=g)
        ys = torch.tanh(x @ teachers.T).T + 0.1 * torch.randn(num_tasks, args.batch, generator=g)
        x, ys = x.to(accelerator.device), ys.to(accelerator.device)
        losses = [nn.functional.mse_loss(out, y) for out, y in zip(model(x), ys)]
        if aggregator is None:
            gradvac_dist.backward(model, losses)  # m backward passes; the hook applies GradVac
        else:
            gradvac_dist.backward(model, losses, aggregator, shared_params=encoder_params)
        optimizer.step()
        optimizer.zero_grad()
        if step % args.log_every == 0 or step == args.steps - 1:
            accelerator.print(f"step {step:4d}  losses {' '.join(f'{v.item():.4f}' for v in losses)}")
    accelerator.print(
        f"done: {args.steps} steps on {accelerator.num_processes} process(es), device {accelerator.device}, "
        f"GradVac step {state.step if state is not None else aggregator.step}"
    )
    accelerator.wait_for_everyone()
    # Leave now, all work and output done, without freeing the DDP module or the process group: with
    # gloo, the process group's destructor runs under the GIL while its worker threads may need it,
    # which can deadlock or abort the exit (seen on torch 2.13 under load; pytorch#56297).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
