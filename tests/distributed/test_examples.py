"""The examples run the way their docstrings say: one process, torchrun, accelerate launch.

Each run is a subprocess with a few steps (--steps), 2 gloo ranks on 127.0.0.1 where distributed.
No retries and no port races: see tests/distributed/launchers.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.distributed.launchers import ROOT, accelerate, free_port, run, torchrun


def test_single_process_example(tmp_path):
    out = run([sys.executable, "examples/single_process.py", "--steps", "3", "--log-every", "1"], tmp_path)
    assert "done: 3 steps, GradVac step 3" in out
    assert "corrections" in out


@pytest.mark.parametrize("strategy", ["replicated", "sharded"])
def test_ddp_example_with_torchrun(tmp_path, strategy):
    args = [*torchrun(), "examples/ddp_train.py", "--steps", "3", "--strategy", strategy]
    out = run(args, tmp_path)
    assert "done: 3 steps on 2 ranks (gloo), GradVac step 3" in out


def test_accelerate_example_with_launch_flags(tmp_path):
    args = [*accelerate(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
            "examples/accelerate_train.py", "--steps", "3"]  # fmt: skip
    out = run(args, tmp_path)
    assert "done: 3 steps on 2 process(es)" in out
    assert "GradVac step 3" in out


def test_accelerate_example_with_cpu_config_file(tmp_path):
    args = [*accelerate(), "--config_file", "launch/accelerate_cpu.yaml", "--main_process_port", str(free_port()),
            "examples/accelerate_train.py", "--steps", "3"]  # fmt: skip
    out = run(args, tmp_path)
    assert "done: 3 steps on 2 process(es)" in out


LAUNCH_SCRIPTS = {
    "ddp_cpu.sh": None,
    "ddp_gpu.sh": None,
    "multinode.sh": None,
    "accelerate_cpu.sh": None,
    "fsdp2_cpu.sh": "examples/fsdp2_train.py",
    "fsdp2_gpu.sh": "examples/fsdp2_train.py",
}


@pytest.mark.parametrize("script", sorted(LAUNCH_SCRIPTS))
def test_launch_script_parses_and_sets_up_before_launching(script):
    path = ROOT / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    lines = path.read_text().splitlines()
    setup = lines.index("bash launch/setup.sh")
    launch = next(i for i, line in enumerate(lines) if line.startswith("exec "))
    assert setup < launch
    target = LAUNCH_SCRIPTS[script]
    if target is not None:
        assert target in lines[launch + 2]
