"""Run an example or launch command as users do (torchrun, accelerate launch) from a test.

- torchrun runs with ``--standalone``: its rendezvous store binds ``localhost:0`` itself, so there
  is no port to choose and none to race for.
- accelerate needs a port: :func:`free_port` picks one below the kernel's ephemeral range
  (32768+), so the ephemeral ports that gloo and other tests bind can never take it between the
  check and the launch; a random pick from 12,000 ports keeps parallel tests apart.
- Each run sits in its own process session and, if it overruns the bound, is killed with every
  process it started: torchrun puts its workers in sessions of their own, so killing the
  launcher's process group alone would leave them running (and holding the output open).
  The output goes to a file, never a pipe that a leftover worker could keep open.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
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
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            log.seek(0)
            pytest.fail(f"{' '.join(args)} did not finish in {timeout} s:\n{log.read()}")
        log.seek(0)
        out = log.read()
    assert proc.returncode == 0, f"{' '.join(args)} exited with {proc.returncode}:\n{out}"
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process descended from it (read from /proc), children first found."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
