"""Multi-task training under FSDP2 (``fully_shard``) with exact GradVac (``gradvac_dist.register_fsdp``).

Launch (CPU, gloo, 2 processes on this machine):
    torchrun --nproc_per_node 2 examples/fsdp2_train.py
    bash launch/fsdp2_cpu.sh --steps 200                 # the same, after setting up .venv
Launch (every GPU of this machine, NCCL, bf16 compute):
    torchrun --nproc_per_node $(nvidia-smi -L | wc -l) examples/fsdp2_train.py --mixed-precision bf16
    bash launch/fsdp2_gpu.sh
Checkpoints (torch.distributed.checkpoint, one folder per step, any world size can resume):
    bash launch/fsdp2_cpu.sh --steps 100 --checkpoint-dir ckpt             # writes ckpt/step000100
    bash launch/fsdp2_cpu.sh --steps 200 --checkpoint-dir ckpt --resume    # continues from the latest

Each rank draws its own share of a synthetic 3-task regression batch (two of the tasks conflict).
The model is sharded layer by layer and at the root; every rank holds 1/W of every parameter and
of every gradient. Each step is one forward pass, then ``gradvac_dist.backward(model, losses)``: one
backward pass per task (FSDP reduce-scatters each), one small all-reduce of per-block Gramians, and
every rank's sharded ``.grad`` is GradVac applied to the rank-mean task gradients.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import gradvac_dist


class MultiTaskNet(nn.Module):
    """A shared encoder of residual MLP blocks and one small head per task."""

    def __init__(self, in_dim: int, hidden: int, depth: int, num_tasks: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, hidden)
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU()) for _ in range(depth)
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.embed(x)
        for block in self.encoder:
            z = z + block(z)
        return [head(z).sum(-1) for head in self.heads]  # sum(-1), not squeeze: FSDP dislikes view outputs


def synthetic_batch(step: int, rank: int, batch: int, teachers: torch.Tensor, device: torch.device):
    """This rank's share of step ``step``'s batch: inputs and one target per task."""
    g = torch.Generator().manual_seed(1_000_003 * step + rank)  # a different slice of data on every rank
    x = torch.randn(batch, teachers.shape[1], generator=g)
    ys = torch.tanh(x @ teachers.T).T + 0.1 * torch.randn(teachers.shape[0], batch, generator=g)
    return x.to(device), ys.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="train until this many GradVac steps are done")
    ap.add_argument("--batch", type=int, default=32, help="batch size per rank")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--grouping", default="module", choices=gradvac_dist.GROUPINGS)
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"], help="bf16 compute, fp32 reduce")
    ap.add_argument("--no-reshard-after-forward", action="store_true", help="keep layers unsharded after forward")
    ap.add_argument("--checkpoint-dir", default=None, help="save DCP checkpoints there (stepNNNNNN/) at the end")
    ap.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="load the latest checkpoint of --checkpoint-dir first")
    ap.add_argument("--log-every", type=int, default=50)
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
    mesh = init_device_mesh(device.type, (world,))

    num_tasks, in_dim = 3, 16
    torch.manual_seed(0)  # same initial weights on every rank (fully_shard keeps each rank's slice)
    teachers = torch.randn(num_tasks, in_dim)
    teachers[1] = -teachers[0] + 0.3 * teachers[1]  # task 1 conflicts with task 0
    model = MultiTaskNet(in_dim, args.hidden, args.depth, num_tasks).to(device)

    # 1. Shard every encoder block, then the root (embedding and heads go with the root).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "reshard_after_forward": not args.no_reshard_after_forward}
    if args.mixed_precision == "bf16":
        kwargs["mp_policy"] = mp
    for block in model.encoder:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    # 2. GradVac state (same seed on every rank), registered on the root. shared_params: GradVac acts on
    #    the embedding and encoder; each head gets the plain sum of its task gradients (LibMTL's convention).
    state = gradvac_dist.GradVacState(
        num_tasks=num_tasks, beta=0.5, seed=0, grouping=args.grouping, shared_params=["embed", "encoder"]
    )
    handle = gradvac_dist.register_fsdp(model, state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def save() -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        # The handle is a DCP Stateful: GradVac's targets, order generator and step travel with the model.
        folder = os.path.join(args.checkpoint_dir, f"step{state.step:06d}")
        dcp.save({"model": model_sd, "optim": optim_sd, "gradvac": handle}, checkpoint_id=folder)

    if args.resume:
        saved = sorted(d for d in os.listdir(args.checkpoint_dir or ".") if d.startswith("step"))
        if not args.checkpoint_dir or not saved:
            ap.error("--resume needs a --checkpoint-dir holding a stepNNNNNN checkpoint")
        folder = os.path.join(args.checkpoint_dir, saved[-1])
        model_sd, optim_sd = get_state_dict(model, optimizer)
        loaded = {"model": model_sd, "optim": optim_sd, "gradvac": handle}
        dcp.load(loaded, checkpoint_id=folder)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        if rank == 0:
            print(f"resumed from {folder} at GradVac step {state.step}", flush=True)

    for step in range(state.step, args.steps):
        x, ys = synthetic_batch(step, rank, args.batch, teachers, device)
        outs = model(x)
        losses = [nn.functional.mse_loss(out.float(), y) for out, y in zip(outs, ys)]
        # 3. One backward pass per task (FSDP reduce-scatters each), one Gramian all-reduce, sharded .grad.
        gradvac_dist.backward(model, losses)
        optimizer.step()
        optimizer.zero_grad()
        if args.checkpoint_dir and args.save_every and (step + 1) % args.save_every == 0:
            save()
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            cos = state.last_result.cosines[0] if state.last_result is not None else None
            cos01 = "-" if cos is None else f"{float(cos[0, 1]):+.3f}"
            values = torch.stack([loss.detach() for loss in losses]).tolist()  # one device sync per log line
            print(f"step {step:4d}  losses {' '.join(f'{v:.4f}' for v in values)}  cos(task0, task1) {cos01}")
    if args.checkpoint_dir and not (args.save_every and args.steps % args.save_every == 0):
        save()
    if rank == 0:
        print(
            f"done: {args.steps} steps on {world} ranks ({dist.get_backend()}), GradVac step {state.step}, "
            f"stash {handle.stash_bytes / 2**10:.1f} KiB on rank 0",
            flush=True,
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
