"""One process of the demo's distributed training; every rank runs this, rank 0 reports.

Started by the demo's own launcher (``python -m examples.demo``), or directly by::

    torchrun --nproc_per_node 2 -m examples.demo.train [options]
    accelerate launch --multi_gpu --num_processes 2 --main_process_ip 127.0.0.1 \\
        --main_process_port 29500 -m examples.demo.train [options]

(``accelerate launch`` on a CPU machine starts the processes with ``--multi_gpu``; the demo uses
plain ``torch.distributed`` with the launcher's environment, so no Accelerator object is needed.)
Run without a launcher, it starts one itself, as ``python -m examples.demo`` does.

Three methods, each trained once per seed (``--seeds N``: seeds ``--seed``, ``--seed + 1``, ...).
For one seed every method starts from the same weights and sees the same batches (a
``DistributedSampler`` with that seed, epoch by epoch), so the seeds pair the runs:

- ``sum``: plain ``DistributedDataParallel`` on ``sum(losses).backward()``;
- ``pcgrad``: GradVac with ``beta=0``: every target stays 0, so a task gradient is corrected only
  when its cosine with another is negative, by projecting out the conflicting component: PCGrad
  (up to the eps=1e-8 in the denominators; tests/examples/test_demo.py checks it against PCGrad);
- ``gradvac``: GradVac with ``--beta`` (EMA targets).

The last two wrap the model in ``DistributedDataParallel(find_unused_parameters=True)`` with
:func:`gradvac_dist.gradvac_hook` registered and step with ``gradvac_dist.backward(ddp, losses)``;
GradVac acts on the shared trunk (``shared_params=["trunk"]``) and each head gets the plain sum of
its task gradients (its own).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset

from gradvac_dist import GradVacState, backward, gradvac_hook

from .data import TaskData, load
from .options import parse_args

__all__ = ["GRADVAC_METHODS", "METHODS", "MultiTaskMLP", "block_names", "launcher_env", "main"]

#: (key in the outputs, label in the table and figure), in the order they are trained and shown
METHODS: tuple[tuple[str, str], ...] = (("sum", "sum"), ("pcgrad", "PCGrad"), ("gradvac", "GradVac"))
#: the methods that run through GradVac's hook; PCGrad is GradVac with beta=0
GRADVAC_METHODS = ("pcgrad", "gradvac")
SHARED = "trunk"


class MultiTaskMLP(nn.Module):
    """A shared trunk (two ReLU layers) and one linear head per task."""

    def __init__(self, in_features: int, hidden: int, num_classes: list[int]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


@dataclass
class MethodRun:
    """What one method's run with one seed produced (per-step records are kept on rank 0 only)."""

    seed: int
    records: list[dict] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    heldout_accuracy: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0


def launcher_env() -> tuple[int, int, int, int] | None:
    """(rank, world size, local rank, local world size) set by torchrun / accelerate, or None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return (
        int(os.environ["RANK"]),
        world,
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def pair_names(names: list[str]) -> list[tuple[int, int, str]]:
    return [(i, j, f"{names[i]}/{names[j]}") for i in range(len(names)) for j in range(i + 1, len(names))]


def _pair_means(matrix: Tensor, pairs) -> dict[str, float]:
    """Unordered pair (i, j): mean of the (i, j) and (j, i) entries of an ``[m, m]`` matrix."""
    return {name: round(0.5 * float(matrix[i, j] + matrix[j, i]), 6) for i, j, name in pairs}


def block_names(model: nn.Module, grouping: str) -> list[str]:
    """The names of GradVac's blocks on the shared trunk, in the library's order (the parameters'):
    ``["trunk"]`` for ``whole``, the parameter names for ``parameter``, the layers for ``module``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(SHARED + ".")]
    if grouping == "whole":
        return [SHARED]
    if grouping == "parameter":
        return names
    return list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))


def task_losses(model: nn.Module, xb: Tensor, yb: Tensor, per_task: bool) -> list[Tensor]:
    """The m task losses (cross-entropy of each head) of one process's batch ``xb``, labels ``yb`` ``[B, m]``.

    Shared batch (default): every sample has every task's label; one forward serves all tasks.
    Per-task data (``--per-task``): each sample belongs to one task, as in the GradVac paper's
    multilingual setting: task ``i`` trains on its own ``B/m`` samples (slice ``i`` of the batch),
    with one forward per task (docs/usage.md, "Per-task data").
    """
    if not per_task:
        return [F.cross_entropy(out, yb[:, i]) for i, out in enumerate(model(xb))]
    m = yb.shape[1]
    return [F.cross_entropy(model(x)[i], y[:, i]) for i, (x, y) in enumerate(zip(xb.chunk(m), yb.chunk(m)))]


def summed_loss(model: nn.Module, xb: Tensor, yb: Tensor, per_task: bool) -> tuple[Tensor, list[Tensor]]:
    """The plain method's loss in one forward (per-task data: each sample's loss for its own task only)."""
    outputs = model(xb)
    m = yb.shape[1]
    if not per_task:
        losses = [F.cross_entropy(out, yb[:, i]) for i, out in enumerate(outputs)]
    else:
        rows = torch.arange(xb.shape[0], device=xb.device).chunk(m)
        losses = [F.cross_entropy(out[r], yb[r, i]) for i, (out, r) in enumerate(zip(outputs, rows))]
    return torch.stack(losses).sum(), losses


def seeds_of(args) -> list[int]:
    return [args.seed + k for k in range(args.seeds)]


def _batches(sampler: DistributedSampler, batch_size: int):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


def train_method(
    method: str, label: str, seed: int, args, data: TaskData, device: torch.device, rank: int, world: int
) -> MethodRun:
    names = [t.name for t in data.tasks]
    m = len(names)
    pairs = pair_names(names)
    torch.manual_seed(seed)  # the same initial weights for every method of this seed
    model = MultiTaskMLP(data.num_features, args.hidden, [t.num_classes for t in data.tasks]).to(device)
    device_ids = [device.index] if device.type == "cuda" else None
    state: GradVacState | None = None
    blocks = block_names(model, args.grouping)
    if method in GRADVAC_METHODS:
        ddp = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
        beta = 0.0 if method == "pcgrad" else args.beta
        state = GradVacState(
            num_tasks=m, beta=beta, eps=1e-8, seed=seed, grouping=args.grouping, shared_params=[SHARED]
        )
        ddp.register_comm_hook(state, gradvac_hook)
    else:
        ddp = DistributedDataParallel(model, device_ids=device_ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    sampler = DistributedSampler(
        TensorDataset(data.x_train), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    batches = _batches(sampler, args.batch_size)
    run = MethodRun(seed)
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        desc = f"{label:>7} seed {seed}"
        bar = tqdm(total=args.steps, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.2)
    start = time.perf_counter()
    for step in range(args.steps):
        index = next(batches).to(device)
        xb, yb = x_train[index], y_train[index]
        t0 = time.perf_counter()
        if state is not None:
            losses = task_losses(ddp, xb, yb, args.per_task)
            backward(ddp, losses)
        else:
            total, losses = summed_loss(ddp, xb, yb, args.per_task)
            total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_time = time.perf_counter() - t0
        # Logging, outside the timed region: the task losses averaged over the processes.
        mean_losses = torch.stack([loss.detach() for loss in losses])
        dist.all_reduce(mean_losses)
        mean_losses = (mean_losses / world).tolist()
        if rank == 0:
            run.step_times.append(step_time)
            record = {
                "method": method,
                "seed": seed,
                "step": step,
                "losses": {n: round(v, 6) for n, v in zip(names, mean_losses)},
                "step_time_s": round(step_time, 6),
            }
            if state is not None:
                result = state.last_result
                assert result.cosines.shape[0] == len(blocks), (result.cosines.shape, blocks)
                record["cosines"] = _pair_means(result.cosines.mean(0), pairs)
                record["targets"] = _pair_means(result.targets.mean(0), pairs)
                record["corrected"] = _pair_means(result.corrected.double().mean(0), pairs)
                record["diagnostics"] = state.diagnostics.summary()  # plain floats: one host read
                if args.grouping != "whole":  # per block: the per-layer view of the GradVac paper
                    record["block_cosines"] = {
                        block: _pair_means(result.cosines[k], pairs) for k, block in enumerate(blocks)
                    }
            run.records.append(record)
            if bar is not None:
                postfix = [f"{n}={v:.3f}" for n, v in zip(names, mean_losses)]
                if "diagnostics" in record:
                    d = record["diagnostics"]
                    postfix += [f"cos={d['mean_cosine']:+.2f}", f"corrected={d['corrected_fraction']:.2f}"]
                bar.set_postfix_str(" ".join(postfix), refresh=False)
                bar.update(1)
    run.train_seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if rank == 0:
        model.eval()
        with torch.no_grad():
            outputs = model(data.x_heldout.to(device))
        y = data.y_heldout.to(device)
        run.heldout_accuracy = {
            n: float((out.argmax(1) == y[:, i]).double().mean()) for i, (n, out) in enumerate(zip(names, outputs))
        }
    return run


def main(argv: list[str] | None = None) -> int:
    env = launcher_env()
    if env is None:  # not under a launcher: start one, as `python -m examples.demo` does
        from .launch import launch

        return launch(argv)
    rank, world, local_rank, local_world = env
    args = parse_args(argv, launched_world=world, local_world=local_world)
    if args.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend)
    data = load(args.tasks)
    runs: dict[str, list[MethodRun]] = {method: [] for method, _ in METHODS}
    for seed in seeds_of(args):
        for method, label in METHODS:
            runs[method].append(train_method(method, label, seed, args, data, device, rank, world))
    if rank == 0:
        from .report import write_report

        write_report(args, data, runs, device)
    dist.barrier()
    # No destroy_process_group(): run_as_script leaves with os._exit, and with gloo the process
    # group's destructor runs under the GIL while its worker threads may need it, which can
    # deadlock or abort the exit (seen on torch 2.13 under load; pytorch#56297).
    return 0


def run_as_script(argv: list[str] | None = None) -> None:
    """Runs :func:`main` and leaves with ``os._exit`` under a launcher: it sidesteps the rare deadlock or
    SIGABRT of a gloo process group's teardown at exit (torch-distributed-facts.md, pytorch#56297)."""
    under_launcher = launcher_env() is not None
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    if not under_launcher:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_as_script()
