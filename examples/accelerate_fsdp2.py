"""Multi-task training with Hugging Face accelerate's FSDP2 and exact GradVac (``gradvac_dist.register_fsdp``).

Launch (CPU, 2 gloo processes on this machine; see "CPU processes" below):
    accelerate launch --config_file launch/accelerate_fsdp2_cpu.yaml examples/accelerate_fsdp2.py
    bash launch/accelerate_fsdp2_cpu.sh --steps 200 --grad-accum 2       # the same, after setting up .venv
Launch (every GPU of this machine, NCCL):
    accelerate launch --config_file launch/accelerate_fsdp2_gpu.yaml examples/accelerate_fsdp2.py
Checkpoints (``accelerator.save_state``: the sharded model and optimizer, and the GradVac state):
    bash launch/accelerate_fsdp2_cpu.sh --steps 100 --checkpoint-dir ckpt              # ckpt/step000100
    bash launch/accelerate_fsdp2_cpu.sh --steps 200 --checkpoint-dir ckpt --resume     # from the latest

What the script does, in the order a user writes it:

1. ``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, ...))`` (the config
   file's ``fsdp_config`` says the same; the script's plugin wins), ``gradient_accumulation_steps``
   from ``--grad-accum``.
2. ``model, optimizer = accelerator.prepare(model, optimizer)``: accelerate calls ``fully_shard`` on
   every ``Block`` and on the root.
3. ``handle = gradvac_dist.register_fsdp(model, state)`` on the prepared root, and
   ``accelerator.register_for_checkpointing(handle)``: ``save_state`` / ``load_state`` then carry
   GradVac's targets, shuffle generator and step with the model and optimizer.
4. Each micro-batch inside ``with accelerator.accumulate(model):`` runs one forward pass and
   ``gradvac_dist.backward(model, losses)`` (not ``accelerator.backward``: one backward pass per
   task). accelerate turns FSDP2's gradient sync off for every micro-batch but the last; GradVac
   then acts once, on the rank-mean task gradients summed over the micro-batches (each loss is
   divided by ``--grad-accum`` here, as ``accelerator.backward`` would).

CPU processes: accelerate 1.x prepares FSDP only on an accelerator. On a CPU it silently falls back
to DistributedDataParallel (``register_fsdp`` then refuses the model). :func:`allow_fsdp_on_cpu`
changes only accelerate's choice of device type and backend (gloo, CPU tensors); the sharding,
``accumulate`` and the checkpoints are accelerate's own code. It is applied only when no CUDA device
is present.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from torch import nn

import gradvac_dist

NUM_TASKS, IN_DIM = 3, 16


class Block(nn.Module):
    """A residual MLP block: accelerate's ``fsdp_transformer_layer_cls_to_wrap`` shards each one."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + nn.functional.gelu(self.linear(self.norm(z)))


class MultiTaskNet(nn.Module):
    """A shared encoder of residual blocks and one small head per task."""

    def __init__(self, hidden: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_DIM, hidden)
        self.encoder = nn.ModuleList(Block(hidden) for _ in range(depth))
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(NUM_TASKS))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.embed(x)
        for block in self.encoder:
            z = block(z)
        return [head(z).sum(-1) for head in self.heads]  # sum(-1), not squeeze: FSDP dislikes view outputs


def make_model(args: argparse.Namespace) -> MultiTaskNet:
    """The same initial weights on every process (and in a test's reference copy)."""
    torch.manual_seed(0)
    model = MultiTaskNet(args.hidden, args.depth)
    return model.double() if args.float64 else model


def teachers() -> torch.Tensor:
    """The synthetic tasks: ``y_i = tanh(x . t_i)``; task 1 conflicts with task 0."""
    t = torch.randn(NUM_TASKS, IN_DIM, generator=torch.Generator().manual_seed(1))
    t[1] = -t[0] + 0.3 * t[1]
    return t


def micro_batch(args: argparse.Namespace, step: int, micro: int, process: int, device: torch.device):
    """Process ``process``'s micro-batch ``micro`` of step ``step``: inputs and one target per task."""
    g = torch.Generator().manual_seed(1_000_003 * step + 1_009 * micro + process)
    dtype = torch.float64 if args.float64 else torch.float32
    x = torch.randn(args.batch, IN_DIM, generator=g, dtype=dtype)
    t = teachers().to(dtype)
    ys = torch.tanh(x @ t.T).T + 0.1 * torch.randn(NUM_TASKS, args.batch, generator=g, dtype=dtype)
    return x.to(device), ys.to(device)


def task_losses(outs: list[torch.Tensor], ys: torch.Tensor, grad_accum: int) -> list[torch.Tensor]:
    """Mean squared error per task, divided by the number of micro-batches (their gradients are summed)."""
    return [nn.functional.mse_loss(out, y) / grad_accum for out, y in zip(outs, ys)]


def allow_fsdp_on_cpu() -> None:
    """Lets accelerate 1.x prepare FSDP on CPU processes (gloo), where it would fall back to DDP.

    accelerate picks the distributed type from the device it finds: with no accelerator it is
    ``MULTI_CPU``, and FSDP is only set up for accelerator types. This reports ``MULTI_GPU`` with the
    gloo backend and CPU tensors instead; nothing else in accelerate is changed.
    """
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    partial = accelerate_state.PartialState
    if getattr(partial, "_gradvac_cpu_fsdp", False):
        return
    prepare_backend, set_device = partial._prepare_backend, partial.set_device

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return backend or "gloo", DistributedType.MULTI_GPU
        return prepare_backend(self, cpu, sagemaker_dp, backend)

    def _set_device(self):
        if self.device is None and self.distributed_type == DistributedType.MULTI_GPU:
            self.device = torch.device("cpu")
            return
        set_device(self)

    partial._prepare_backend, partial.set_device, partial._gradvac_cpu_fsdp = _prepare_backend, _set_device, True


class Run(NamedTuple):
    """What a training loop (this script's or a test's) needs."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    state: gradvac_dist.GradVacState
    handle: gradvac_dist.FSDPGradVac


def build(args: argparse.Namespace) -> Run:
    """Steps 1-3 of the module docstring."""
    if not torch.cuda.is_available():
        allow_fsdp_on_cpu()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],
        reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )
    accelerator = Accelerator(fsdp_plugin=plugin, gradient_accumulation_steps=args.grad_accum)
    if not accelerator.is_fsdp2:
        raise SystemExit(
            f"accelerate set up {accelerator.distributed_type}, not FSDP2: start this script with `accelerate launch "
            "--config_file launch/accelerate_fsdp2_cpu.yaml` (or the _gpu one), not with plain python"
        )
    if accelerator.device.type == "cpu":  # share the cores between this machine's processes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    model = make_model(args).to(accelerator.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    # GradVac acts on the embedding and the encoder; each head gets the plain sum of its task gradients.
    state = gradvac_dist.GradVacState(
        num_tasks=NUM_TASKS, beta=0.5, seed=0, grouping=args.grouping, shared_params=["embed", "encoder"]
    )
    handle = gradvac_dist.register_fsdp(model, state)
    accelerator.register_for_checkpointing(handle)
    return Run(accelerator, model, optimizer, state, handle)


def train_step(run: Run, args: argparse.Namespace, step: int, before_update=None) -> list[float]:
    """One optimizer step of ``args.grad_accum`` micro-batches (step 4); returns the task losses."""
    acc, model = run.accelerator, run.model
    totals = torch.zeros(NUM_TASKS, dtype=torch.float64)
    for micro in range(args.grad_accum):
        x, ys = micro_batch(args, step, micro, acc.process_index, acc.device)
        with acc.accumulate(model):
            losses = task_losses(model(x), ys, args.grad_accum)
            gradvac_dist.backward(model, losses)
            if acc.sync_gradients and before_update is not None:
                before_update(run)  # a test looks at .grad here
            run.optimizer.step()  # accelerate skips it on every micro-batch but the last
            run.optimizer.zero_grad()
        totals += torch.stack([loss.detach() for loss in losses]).double().cpu()
    return totals.tolist()


def checkpoints(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if d.startswith("step")) if os.path.isdir(folder) else []


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="train until this many GradVac steps are done")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch size per process")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--grouping", default="module", choices=gradvac_dist.GROUPINGS)
    ap.add_argument("--float64", action="store_true", help="train in float64 (exactness checks)")
    ap.add_argument("--checkpoint-dir", default=None, help="accelerator.save_state there (stepNNNNNN/) at the end")
    ap.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="accelerator.load_state the latest checkpoint first")
    ap.add_argument("--log-every", type=int, default=50)
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    if args.grad_accum < 1:
        ap.error(f"--grad-accum must be at least 1, got {args.grad_accum}")
    if args.resume and not (args.checkpoint_dir and checkpoints(args.checkpoint_dir)):
        ap.error("--resume needs a --checkpoint-dir holding a stepNNNNNN checkpoint")

    run = build(args)
    acc, state = run.accelerator, run.state

    def save() -> None:
        acc.save_state(os.path.join(args.checkpoint_dir, f"step{state.step:06d}"))

    if args.resume:
        folder = os.path.join(args.checkpoint_dir, checkpoints(args.checkpoint_dir)[-1])
        acc.load_state(folder)
        acc.print(f"resumed from {folder} at GradVac step {state.step}")
    for step in range(state.step, args.steps):
        losses = train_step(run, args, step)
        if args.checkpoint_dir and args.save_every and (step + 1) % args.save_every == 0:
            save()
        if step % args.log_every == 0 or step == args.steps - 1:
            acc.print(f"step {step:4d}  losses {' '.join(f'{v:.10f}' for v in losses)}")
    if args.checkpoint_dir and not (args.save_every and args.steps % args.save_every == 0):
        save()
    acc.print(
        f"done: {args.steps} steps on {acc.num_processes} process(es) ({acc.distributed_type}), "
        f"GradVac step {state.step}"
    )
    acc.wait_for_everyone()
    # Leave now, all work and output done, without freeing the process group: with gloo, its
    # destructor runs under the GIL while its worker threads may need it (pytorch#56297).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
