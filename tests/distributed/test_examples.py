"""The examples run the way their docstrings say: one process, torchrun, accelerate launch.

Each run is a subprocess with a few steps (--steps), 2 gloo ranks on 127.0.0.1 where distributed.
No retries: the rendezvous port is found by binding port 0 right before the launch, and each run
sits in its own process group, killed whole if it overruns.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 90  # a run takes a few seconds; the bound only keeps a hung launcher from blocking CI


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], tmp_path: Path) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HOME"] = str(tmp_path / "hf_home")  # no user-level accelerate config file
    env["PYTHONWARNINGS"] = "ignore"
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish in {TIMEOUT_S} s:\n{out}")
    assert proc.returncode == 0, f"{' '.join(args)} exited with {proc.returncode}:\n{out}"
    return out


def _torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port)]  # fmt: skip


def _accelerate() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch"]


def test_single_process_example(tmp_path):
    out = _run([sys.executable, "examples/single_process.py", "--steps", "3", "--log-every", "1"], tmp_path)
    assert "done: 3 steps, GradVac step 3" in out
    assert "corrections" in out


@pytest.mark.parametrize("strategy", ["replicated", "sharded"])
def test_ddp_example_with_torchrun(tmp_path, strategy):
    args = [*_torchrun(_free_port()), "examples/ddp_train.py", "--steps", "3", "--strategy", strategy]
    out = _run(args, tmp_path)
    assert "done: 3 steps on 2 ranks (gloo), GradVac step 3" in out


def test_accelerate_example_with_launch_flags(tmp_path):
    args = [*_accelerate(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
            "examples/accelerate_train.py", "--steps", "3"]  # fmt: skip
    out = _run(args, tmp_path)
    assert "done: 3 steps on 2 process(es)" in out
    assert "GradVac step 3" in out


def test_accelerate_example_with_cpu_config_file(tmp_path):
    args = [*_accelerate(), "--config_file", "launch/accelerate_cpu.yaml", "--main_process_port", str(_free_port()),
            "examples/accelerate_train.py", "--steps", "3"]  # fmt: skip
    out = _run(args, tmp_path)
    assert "done: 3 steps on 2 process(es)" in out


@pytest.mark.parametrize("script", ["ddp_cpu.sh", "ddp_gpu.sh", "multinode.sh", "accelerate_cpu.sh"])
def test_launch_script_parses_and_sets_up_before_launching(script):
    path = ROOT / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    lines = path.read_text().splitlines()
    setup = lines.index("bash launch/setup.sh")
    launch = next(i for i, line in enumerate(lines) if line.startswith("exec "))
    assert setup < launch
