"""One rank of a multi-node test job, started by torchrun through ``launch/multinode.sh``.

``--body ddp`` / ``fsdp`` runs one of the distributed suite's equivalence bodies (DDP or FSDP2
against GradVac on the rank-mean task gradients, written from the formulas) over the real
rendezvous and gloo across the nodes' link, and saves what the body returns to
``--out/rank<R>.pt`` (a temporary name first, then renamed). The elastic tests run
``examples/elastic_train.py`` instead, as users would.

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
    ap.add_argument("--body", choices=["ddp", "fsdp"], required=True)
    ap.add_argument("--configs", default="[]", help="a JSON list of the body's configurations")
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

    body = {"ddp": ddp_bodies.equivalence_body, "fsdp": fsdp_bodies.equivalence_body}[args.body]
    result = body(rank, world, json.loads(args.configs))
    tmp = args.out / f".rank{rank}.pt.tmp"
    node = int(os.environ.get("GROUP_RANK", "-1"))  # torchrun's index of this node
    torch.save({"world": world, "node": node, "result": result}, tmp)
    os.replace(tmp, args.out / f"rank{rank}.pt")
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no process-group teardown at exit: gloo's destructor can deadlock (pytorch#56297)


if __name__ == "__main__":
    main()
