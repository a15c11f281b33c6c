"""The DDP benchmark's 2 ranks on a rate-limited link: one rank in each of two network namespaces.

``launch/two_nodes.sh --rate RATE --nproc 1`` makes the namespaces, the veth pair between them
(198.18.0.1 <-> 198.18.0.2, tc's tbf limiting each end's egress to RATE) and starts torchrun on each,
the way users start several nodes (``launch/multinode.sh``, c10d rendezvous over the link). Each
node runs this module as its script: it joins the process group torchrun set up, runs the
benchmark's rank body, and writes that rank's result as JSON into a folder both namespaces see (the
file system is shared; only the network is not). The parent reads the two files back.

Needs root (namespaces) and iproute2's ``ip`` and ``tc``; ``launch_on_link`` says so and stops
otherwise. Everything it creates is removed by two_nodes.sh on exit, a failure or a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NO_NAMESPACES = 77  # two_nodes.sh's exit status without root or ip: nothing was created


class LinkUnavailable(RuntimeError):
    """The machine cannot make the namespaces (not root, or no ip/tc)."""


def launch_on_link(cfg: Any, timeout: float | None = None) -> list[dict[str, Any]]:
    """Runs ``cfg`` (a ``benchmarks.ddp.Config`` with ``link`` set) on two namespaces; each rank's result."""
    with tempfile.TemporaryDirectory(prefix="gradvac_bench_link_") as folder:
        work = Path(folder)
        (work / "config.json").write_text(json.dumps(asdict(cfg)))
        env = dict(os.environ, SCRIPT=str(Path(__file__).resolve()), OMP_NUM_THREADS="1", RDZV_ID="gradvac_bench")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        limit = int(timeout or cfg.timeout)
        cmd = ["bash", str(ROOT / "launch" / "two_nodes.sh"), "--rate", cfg.link, "--nproc", "1",
               "--timeout", str(limit), "--logs", str(work / "logs"), "--", "--work", str(work)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit + 60)
        if proc.returncode == NO_NAMESPACES:
            raise LinkUnavailable(f"--link needs root and iproute2 (ip, tc): {proc.stderr.strip()}")
        results = []
        for rank in range(2):
            path = work / f"rank{rank}.json"
            if proc.returncode != 0 or not path.is_file():
                logs = "\n".join(
                    f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in sorted((work / "logs").glob("*.log"))
                )
                raise RuntimeError(f"the link benchmark failed (exit {proc.returncode}):\n{proc.stdout}\n{logs}")
            results.append(json.loads(path.read_text()))
        return results


def _node_main() -> None:
    """One rank, started by torchrun inside a namespace (``SCRIPT`` of launch/multinode.sh)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="gloo")  # multinode.sh passes it; the benchmark is gloo only
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    import torch
    import torch.distributed as dist

    from benchmarks.ddp import Config, _rank_result

    torch.set_num_threads(1)
    raw = json.loads(Path(args.work, "config.json").read_text())
    names = {f.name for f in fields(Config)}
    cfg = Config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names})
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = _rank_result(rank, cfg)
    tmp = Path(args.work, f"rank{rank}.json.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(Path(args.work, f"rank{rank}.json"))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no process-group destructor under the GIL (pytorch#56297)


if __name__ == "__main__":
    _node_main()
