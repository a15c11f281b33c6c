"""Starts the demo's processes with torchrun (``torch.distributed.run``), in this process.

The rendezvous is a c10d store on ``127.0.0.1`` port 0: the store picks a free port itself and
the workers read it from there, so two demos (or tests) started at once cannot race for a port.
Gloo is pinned to the loopback interface unless ``GLOO_SOCKET_IFNAME`` is already set.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Sequence

from .options import parse_args

__all__ = ["launch", "torchrun_args"]

TRAIN_MODULE = "examples.demo.train"


def torchrun_args(world_size: int, argv: Sequence[str]) -> list[str]:
    return [
        "--nnodes", "1",
        "--nproc-per-node", str(world_size),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "127.0.0.1:0",
        "--rdzv-id", f"gradvac-demo-{uuid.uuid4().hex[:12]}",
        "--local-addr", "127.0.0.1",
        "--max-restarts", "0",
        "--module", TRAIN_MODULE,
        *argv,
    ]  # fmt: skip


def launch(argv: Sequence[str] | None = None) -> int:
    """Checks the options, then runs ``world_size`` training processes; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)  # impossible options stop here, before any process starts
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # One thread per process: the matrices are tiny, and extra threads only spin (measured on 2 busy
    # cores, world size 1: 2.6 ms per GradVac step with 1 thread, 10 ms with 2). torchrun would set 1
    # and warn about it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # DDP's C++ warning "find_unused_parameters=True ... did not find any unused parameters" is a
    # false positive here: the forward uses every head, each of GradVac's passes only one.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    start = time.perf_counter()
    try:
        run(get_args_parser().parse_args(torchrun_args(args.world_size, argv)))
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        ranks = sorted(e.failures)
        print(
            f"examples.demo: training process(es) {ranks} failed (exit code {codes}); see the error above.",
            file=sys.stderr,
        )
        return next((c for c in codes if c > 0), 1)
    print(f"demo finished in {time.perf_counter() - start:.1f} s ({args.world_size} process(es))", flush=True)
    return 0
