"""Run an example or launch command as users do (torchrun, accelerate launch) from a test.

- torchrun runs with ``--standalone``: its rendezvous store binds ``localhost:0`` itself, so there
  is no port to choose and none to race for.
- accelerate needs a port: :func:`free_port` picks one below the kernel's ephemeral range
  (32768+), so the ephemeral ports that gloo and other tests bind can never take it between the
  check and the launch; a random pick from 12,000 ports keeps parallel tests apart.
- Each run sits in its own process session and is killed whole if it overruns the bound.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120  # a run takes a few seconds; the bound only keeps a hung launcher from blocking CI


def free_port() -> int:
    """A free TCP port on 127.0.0.1 in 20000-31999 (outside the kernel's ephemeral range)."""
    ports = random.sample(range(20000, 32000), 200)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999 on 127.0.0.1")


def torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def accelerate() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch"]


def run(args: list[str], tmp_path: Path | None = None, timeout: float = TIMEOUT_S) -> str:
    """Runs ``args`` from the repository root with 1 thread, gloo on loopback; returns its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if tmp_path is not None:
        env["HF_HOME"] = str(tmp_path / "hf_home")  # no user-level accelerate config file
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish in {timeout} s:\n{out}")
    assert proc.returncode == 0, f"{' '.join(args)} exited with {proc.returncode}:\n{out}"
    return out
