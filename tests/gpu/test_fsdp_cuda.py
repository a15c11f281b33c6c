"""FSDP2 + GradVac on CUDA with NCCL: the same checks as on CPU/gloo, on every GPU of the machine.

Exercises what the CPU tests cannot: FSDP's side-stream reduce-scatters (GradVac waits for them
before reading ``.grad`` between passes), DTensor grads on the GPU, and the example under torchrun.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.distributed import fsdp_bodies
from tests.distributed.harness import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def test_fsdp2_with_nccl_matches_core():
    world = torch.cuda.device_count()
    configs = [
        {"grouping": "module", "raf": True, "steps": 3},
        {"grouping": "whole", "raf": False, "prior": True, "steps": 3},
        {"grouping": "parameter", "raf": True, "accum": 2, "shared": ["encoder"], "steps": 3},
        {"grouping": "module", "raf": True, "mp": True, "steps": 3},
    ]
    results = run_distributed(fsdp_bodies.cuda_equivalence_body, world, configs, backend="nccl", timeout=300)
    for c, cfg in enumerate(configs):
        for r in range(world):
            res = results[r][c]
            assert res["max_rel_err"] < (1e-6 if cfg.get("mp") else 1e-10), (cfg, res["max_rel_err"])
            # several ranks: the settings agreed at registration and the first step, the inputs at later steps
            expected = {"gramian_all_reduce": 3}
            if world > 1:
                expected.update(agreement_all_reduce=2, input_all_reduce=2)
            assert res["calls"] == expected, (cfg, res["calls"])
            assert res["placements_ok"], cfg
            assert torch.equal(res["params"], results[0][c]["params"]), cfg
            assert torch.equal(res["targets"], results[0][c]["targets"]), cfg
            for plain, step in zip(res["plain_counts"], res["step_counts"]):
                assert step.get("all_reduce", 0) == (1 if world == 1 else 2), (cfg, step)
                accum = cfg.get("accum", 1)
                assert fsdp_bodies._all_gathers(step) == accum * fsdp_bodies._all_gathers(plain), (cfg, step, plain)


def test_fsdp2_example_with_torchrun_on_gpus(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torch.cuda.device_count()),
           "--master_addr", "127.0.0.1", "--master_port", str(port), "examples/fsdp2_train.py", "--backend", "nccl",
           "--mixed-precision", "bf16", "--steps", "20", "--log-every", "10", "--checkpoint-dir", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(nccl), GradVac step 20" in out.stdout
