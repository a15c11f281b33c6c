"""examples/fsdp2_train.py runs under torchrun (2 gloo ranks) and resumes exactly from a DCP checkpoint;
the FSDP2 launch scripts parse and set up .venv before launching."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120  # a run takes a few seconds; the bound only keeps a hung launcher from blocking CI


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "examples/fsdp2_train.py", "--backend", "gloo", *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S} s:\n{out}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{out}"
    return out


def _step_lines(out: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^step\s+(\d+)\s.*$", out, re.MULTILINE)}


def test_fsdp2_example_trains_and_resumes_from_dcp(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = ["--steps", "3", "--log-every", "1", "--hidden", "32", "--depth", "2", "--checkpoint-dir", str(ckpt)]
    straight = _torchrun(*args, "--save-every", "2")
    assert "done: 3 steps on 2 ranks (gloo), GradVac step 3" in straight
    assert sorted(os.listdir(ckpt)) == ["step000002", "step000003"]
    shutil.rmtree(ckpt / "step000003")
    resumed = _torchrun(*args, "--resume")
    assert f"resumed from {ckpt / 'step000002'} at GradVac step 2" in resumed
    assert "done: 3 steps on 2 ranks (gloo), GradVac step 3" in resumed
    # the resumed step 2 (model, optimizer and GradVac trajectory from the checkpoint) repeats the straight one
    assert _step_lines(resumed)[2] == _step_lines(straight)[2]
    assert set(_step_lines(resumed)) == {2}


@pytest.mark.parametrize("script", ["fsdp2_cpu.sh", "fsdp2_gpu.sh"])
def test_fsdp2_launch_script_parses_and_sets_up_before_launching(script):
    path = ROOT / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    lines = path.read_text().splitlines()
    setup = lines.index("bash launch/setup.sh")
    launch = next(i for i, line in enumerate(lines) if line.startswith("exec "))
    assert setup < launch
    assert "examples/fsdp2_train.py" in lines[launch + 2]
