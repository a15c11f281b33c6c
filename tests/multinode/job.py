"""One rank of a multi-node test job, started by torchrun through ``launch/multinode.sh``.

``--body ddp`` / ``fsdp`` runs one of the distributed suite's equivalence bodies (DDP or FSDP2
against GradVac on the rank-mean task gradients, written from the formulas) over the real
rendezvous and gloo across the nodes' link, and saves what the body returns to
``--out/rank<R>.pt``. ``--body train`` is a training loop as users write one for elastic jobs:
DDP + GradVac, a checkpoint every ``--ckpt-every`` steps (model, optimizer and GradVac state, written
by rank 0 to a temporary name and renamed, so a checkpoint is there whole or not at all), resumed
from at start when one exists (as after a torchrun restart); each step's number goes to
``--out/progress``, and the final weights and GradVac state to ``--out/final_rank<R>.pt``.

    SCRIPT=tests/multinode/job.py bash launch/two_nodes.sh -- --body ddp --configs '[...]' --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--body", choices=["ddp", "fsdp", "train"], required=True)
    ap.add_argument("--configs", default="[]", help="a JSON list of the body's configurations")
    ap.add_argument("--steps", type=int, default=8, help="--body train: steps in all")
    ap.add_argument("--ckpt-every", type=int, default=2, help="--body train: steps between checkpoints")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="--body train: seconds to wait after a step")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=120.0, help="the process group's timeout, seconds")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    from tests.distributed import ddp_bodies, fsdp_bodies

    if args.body == "train":
        train(args, rank, world)
        _exit()

    body = {"ddp": ddp_bodies.equivalence_body, "fsdp": fsdp_bodies.equivalence_body}[args.body]
    result = body(rank, world, json.loads(args.configs))
    tmp = args.out / f".rank{rank}.pt.tmp"
    node = int(os.environ.get("GROUP_RANK", "-1"))  # torchrun's index of this node
    torch.save({"world": world, "node": node, "result": result}, tmp)
    os.replace(tmp, args.out / f"rank{rank}.pt")
    dist.barrier()
    _exit()


def _exit() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no process-group teardown at exit: gloo's destructor can deadlock (pytorch#56297)


#: checkpoint keys
MODEL_KEY, OPTIMIZER_KEY, GRADVAC_KEY, STEP_KEY = "model", "optimizer", "gradvac", "step"


def train(args: argparse.Namespace, rank: int, world: int) -> None:
    """DDP + GradVac with checkpoints; resumes from the last complete one (see the module docstring)."""
    import time

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradvac_dist
    from tests.distributed.ddp_bodies import batch, make_model, task_losses

    model = make_model()
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.002)
    state = gradvac_dist.GradVacState(num_tasks=3, seed=3, grouping="module")
    ddp.register_comm_hook(state, gradvac_dist.gradvac_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpt = args.out / "checkpoint.pt"
    start = 0
    if ckpt.exists():  # a restarted job: every rank reads the same complete checkpoint
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved[MODEL_KEY])
        opt.load_state_dict(saved[OPTIMIZER_KEY])
        state.load_state_dict(saved[GRADVAC_KEY])
        start = saved[STEP_KEY]
    for step in range(start, args.steps):
        x, ys = batch(step, rank, world)
        gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.ckpt_every == 0 and rank == 0:
            tmp = ckpt.with_name(ckpt.name + ".tmp")
            saved = {MODEL_KEY: model.state_dict(), OPTIMIZER_KEY: opt.state_dict(), GRADVAC_KEY: state.state_dict()}
            torch.save({**saved, STEP_KEY: done}, tmp)
            os.replace(tmp, ckpt)
        dist.barrier()  # a checkpoint is complete before any rank goes on
        if rank == 0:
            with open(args.out / "progress", "a") as f:
                f.write(f"{done} {start}\n")
        time.sleep(args.step_sleep)
    final = {"params": torch.cat([p.detach().flatten() for p in model.parameters()]), "gradvac": state.state_dict()}
    torch.save({**final, "resumed_from": start}, args.out / f"final_rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
