"""Command-line options of the demo, and their checks (run before any process is started)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from gradvac_dist import GROUPINGS

from .data import NUM_TRAIN, TASKS

__all__ = ["build_parser", "parse_args", "resolve_backend"]

PROG = "python -m examples.demo"


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(t.name for t in TASKS)
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train a shared-trunk multi-task MLP on pairs of scikit-learn's bundled digits with three methods: the "
            "plain sum of the task losses, PCGrad (GradVac with beta=0) and GradVac (DDP + gradvac_hook), each once "
            "per seed; for one seed all three start from the same weights and see the same batches. Prints per-task "
            "held-out accuracy (mean and standard deviation over the seeds) and wall time per step; writes "
            "metrics.jsonl, summary.json and demo.png."
        ),
    )
    p.add_argument(
        "--tasks", type=int, default=3, help=f"number of tasks, 2..{len(TASKS)}, in order: {names} (default 3)"
    )
    p.add_argument(
        "--world-size", type=int, default=None, help="number of processes (default 2; under torchrun: its nproc)"
    )
    p.add_argument("--grouping", choices=GROUPINGS, default="whole", help="GradVac's blocks (default whole)")
    p.add_argument(
        "--beta",
        type=float,
        default=0.5,
        help="EMA rate of GradVac's targets, in [0, 1] (default 0.5; PCGrad is beta=0)",
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per process per step (default 32)")
    p.add_argument(
        "--per-task",
        action="store_true",
        help="per-task data: each task trains on its own 1/m of every batch (one forward per task), instead of "
        "every sample carrying every task's label",
    )
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, momentum 0.9 (default 0.05)")
    p.add_argument("--hidden", type=int, default=128, help="width of the shared trunk's two layers (default 128)")
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="runs per method, with seeds --seed, --seed+1, ... shared by all (default 3)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="first seed of the initialisation, data order and GradVac (default 0)"
    )
    p.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="auto: nccl when there is a CUDA GPU per process, else gloo on CPU (default auto)",
    )
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder (default runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_backend(requested: str, local_world: int) -> str:
    """``auto``: nccl when every local process can have its own GPU, else gloo."""
    if requested == "auto":
        return "nccl" if _cuda_count() >= local_world else "gloo"
    return requested


def parse_args(
    argv: Sequence[str] | None = None, *, launched_world: int | None = None, local_world: int | None = None
) -> argparse.Namespace:
    """Parses and checks the options; exits with status 2 and a clear message on an impossible one.

    Args:
        launched_world: WORLD_SIZE when already running under a launcher (torchrun, accelerate).
        local_world: processes on this machine under a launcher (LOCAL_WORLD_SIZE).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    err = parser.error
    if not 2 <= args.tasks <= len(TASKS):
        err(
            f"--tasks must be between 2 and {len(TASKS)} (the tasks available: {', '.join(t.name for t in TASKS)}), "
            f"got {args.tasks}"
        )
    if launched_world is not None:
        if args.world_size is not None and args.world_size != launched_world:
            err(
                f"--world-size {args.world_size} differs from the {launched_world} processes the launcher started; "
                "drop --world-size or match it"
            )
        args.world_size = launched_world
    elif args.world_size is None:
        args.world_size = 2
    if args.world_size < 1:
        err(f"--world-size must be at least 1, got {args.world_size}")
    if args.steps < 1:
        err(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        err(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.per_task and args.batch_size < args.tasks:
        err(
            f"--per-task gives each of the {args.tasks} tasks its own slice of the batch: --batch-size must be at "
            f"least {args.tasks}, got {args.batch_size}"
        )
    per_process = NUM_TRAIN // args.world_size
    if args.batch_size > per_process:
        err(
            f"--batch-size {args.batch_size} is larger than the {per_process} training examples each of the "
            f"{args.world_size} processes gets per epoch ({NUM_TRAIN} in all)"
        )
    if not (math.isfinite(args.lr) and args.lr > 0):
        err(f"--lr must be a positive number, got {args.lr}")
    if not 0.0 <= args.beta <= 1.0:
        err(f"--beta must be in [0, 1] (the EMA rate of the targets), got {args.beta}")
    if args.hidden < 1:
        err(f"--hidden must be at least 1, got {args.hidden}")
    if args.seed < 0:
        err(f"--seed must be >= 0, got {args.seed}")
    if args.seeds < 1:
        err(f"--seeds must be at least 1, got {args.seeds}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        err(f"--out {args.out!r} exists and is not a folder")
    local = local_world if local_world is not None else args.world_size
    if args.backend == "nccl":
        gpus = _cuda_count()
        if gpus == 0:
            err(
                "--backend nccl needs CUDA GPUs and this machine has none (or this torch has no CUDA); "
                "use --backend gloo (or auto)"
            )
        if local > gpus:
            err(
                f"--backend nccl needs one GPU per process: {local} processes on this machine but {gpus} GPU(s); "
                f"use --world-size {gpus} or --backend gloo"
            )
    args.backend = resolve_backend(args.backend, local)
    return args
