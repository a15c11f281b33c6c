"""The examples run the way their docstrings say (one process, torchrun, accelerate launch), and each
launch script runs the command it should (its dry run), the CPU ones for real too.

Each run is a subprocess with a few steps (--steps), 2 gloo ranks on 127.0.0.1 where distributed.
No retries and no port races: see tests/distributed/launchers.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.distributed.launchers import ROOT, accelerate, free_port, run, torchrun
from tests.settings import needs_fsdp_on_cpu


def test_single_process_example(tmp_path):
    out = run([sys.executable, "examples/single_process.py", "--steps", "3", "--log-every", "1"], tmp_path)
    assert "done: 3 steps, GradVac step 3" in out
    assert "corrections" in out


@pytest.mark.parametrize(("strategy", "per_task"), [("replicated", False), ("sharded", False), ("sharded", True)])
def test_ddp_example_with_torchrun(tmp_path, strategy, per_task):
    args = [*torchrun(), "examples/ddp_train.py", "--steps", "3", "--strategy", strategy]
    out = run(args + (["--per-task"] if per_task else []), tmp_path)
    assert "done: 3 steps on 2 ranks (gloo), GradVac step 3" in out


def test_upgrad_example_with_torchrun(tmp_path):
    out = run([*torchrun(), "-m", "examples.upgrad_ddp", "--steps", "20"], tmp_path)
    assert "done: 20 UPGrad steps on 2 ranks; held-out accuracy: left" in out


def test_accelerate_example_with_launch_flags(tmp_path):
    args = [*accelerate(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
            "examples/accelerate_train.py", "--steps", "3"]  # fmt: skip
    out = run(args, tmp_path)
    assert "done: 3 steps on 2 process(es)" in out
    assert "GradVac step 3" in out


# What each launch script runs (GRADVAC_DRY_RUN=1 prints it): the environment that selects it, and the
# command it execs, to which the user's arguments are appended. Every script sets up .venv first.
TORCHRUN_1_NODE = ".venv/bin/torchrun --nnodes 1 --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29500"
MULTINODE_ENV = {"MASTER": "10.0.0.1", "NNODES": "2", "NODE_RANK": "1", "NPROC": "2", "BACKEND": "gloo"}
LAUNCH_SCRIPTS = {
    "ddp_cpu.sh": ({}, f"{TORCHRUN_1_NODE} examples/ddp_train.py --backend gloo"),
    "ddp_gpu.sh": ({"NPROC": "2"}, f"{TORCHRUN_1_NODE} examples/ddp_train.py --backend nccl"),
    "fsdp2_cpu.sh": ({}, f"{TORCHRUN_1_NODE} examples/fsdp2_train.py --backend gloo"),
    "fsdp2_gpu.sh": (
        {"NPROC": "2"},
        f"{TORCHRUN_1_NODE} examples/fsdp2_train.py --backend nccl --mixed-precision bf16",
    ),
    "accelerate_cpu.sh": (
        {},
        ".venv/bin/accelerate launch --config_file launch/accelerate_cpu.yaml --main_process_port 29500 "
        "examples/accelerate_train.py",
    ),
    "accelerate_fsdp2_cpu.sh": (
        {},
        ".venv/bin/accelerate launch --config_file launch/accelerate_fsdp2_cpu.yaml --main_process_port 29500 "
        "examples/accelerate_fsdp2.py",
    ),
    "multinode.sh": (
        MULTINODE_ENV,
        ".venv/bin/torchrun --nnodes 2 --node_rank 1 --nproc_per_node 2 --rdzv_backend c10d "
        "--rdzv_endpoint 10.0.0.1:29500 --rdzv_id gradvac examples/ddp_train.py --backend gloo",
    ),
    "demo.sh": ({}, ".venv/bin/python -m examples.demo"),
}
SCRIPT_ENV = (
    *("NPROC", "MASTER_PORT", "SCRIPT", "MASTER", "NNODES", "NODE_RANK", "BACKEND", "RDZV_PORT", "RDZV_ID"),
    *("RDZV_CONF", "LOCAL_ADDR", "MAX_RESTARTS", "GRADVAC_SKIP_SETUP", "ACCELERATE_CONFIG"),
)
# the launchers in .venv, as the running interpreter starts them (a test must not build .venv)
LAUNCHERS = {
    ".venv/bin/torchrun": [sys.executable, "-m", "torch.distributed.run"],
    ".venv/bin/accelerate": [sys.executable, "-m", "accelerate.commands.accelerate_cli"],
    ".venv/bin/python": [sys.executable],
}


def launch_script(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``bash launch/<script> args`` as a dry run, in an environment without the scripts' own variables."""
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    full.update(env, GRADVAC_DRY_RUN="1")
    cmd = ["bash", str(ROOT / "launch" / script), *args]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=30)


def dry_run(script: str, args: list[str], env: dict[str, str]) -> list[list[str]]:
    """The commands the script would run, each as its words."""
    proc = launch_script(script, args, env)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("script", sorted(LAUNCH_SCRIPTS))
def test_launch_script_sets_up_then_execs_its_command(script):
    env, command = LAUNCH_SCRIPTS[script]
    user_args = ["--steps", "7", "--out", "runs/a b"]  # passed through as they are, spaces included
    assert dry_run(script, user_args, env) == [["bash", "launch/setup.sh"], [*shlex.split(command), *user_args]]
    for word in shlex.split(command):  # the files it names exist
        if word.endswith((".py", ".yaml")):
            assert (ROOT / word).is_file(), word


def test_launch_script_environment_overrides():
    env = {"NPROC": "3", "MASTER_PORT": "12345", "SCRIPT": "examples/other.py"}
    *_, command = dry_run("ddp_cpu.sh", [], env)
    expected = ".venv/bin/torchrun --nnodes 1 --nproc_per_node 3 --master_addr 127.0.0.1 --master_port 12345 "
    assert command == shlex.split(expected + "examples/other.py --backend gloo")


def test_multinode_passes_the_rendezvous_options_through():
    env = dict(MULTINODE_ENV, RDZV_CONF="is_host=true", LOCAL_ADDR="198.18.0.1", MAX_RESTARTS="1")
    *_, command = dry_run("multinode.sh", [], env)
    words = " ".join(command)
    assert "--rdzv_conf is_host=true --local_addr 198.18.0.1 --max_restarts 1 examples/ddp_train.py" in words
    commands = dry_run("multinode.sh", [], dict(env, GRADVAC_SKIP_SETUP="1"))
    assert len(commands) == 1 and commands[0][0] == ".venv/bin/torchrun"  # set up outside the nodes


def test_multinode_needs_its_variables_before_anything_runs():
    proc = launch_script("multinode.sh", [], {"NNODES": "2", "NODE_RANK": "0"})
    assert proc.returncode != 0 and proc.stdout == ""
    assert "set MASTER to the address of node 0" in proc.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the message on a machine without GPUs")
@pytest.mark.parametrize(("script", "other"), [("ddp_gpu.sh", "ddp_cpu.sh"), ("fsdp2_gpu.sh", "fsdp2_cpu.sh")])
def test_gpu_script_without_gpus_points_to_the_cpu_one(script, other):
    proc = launch_script(script, [], {})
    assert proc.returncode == 1
    assert f"no GPU found by nvidia-smi; use launch/{other}" in proc.stderr


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("ddp_cpu.sh", ["--steps", "2"], "done: 2 steps on 2 ranks (gloo), GradVac step 2"),
        pytest.param(
            "fsdp2_cpu.sh",
            ["--steps", "2", "--hidden", "32", "--depth", "2"],
            "done: 2 steps on 2 ranks (gloo)",
            marks=needs_fsdp_on_cpu,
        ),
        ("accelerate_cpu.sh", ["--steps", "3"], "done: 3 steps on 2 process(es)"),
        pytest.param(
            "accelerate_fsdp2_cpu.sh",
            ["--steps", "2", "--grad-accum", "2", "--hidden", "16", "--depth", "2"],
            "done: 2 steps on 2 process(es) (DistributedType.FSDP), GradVac step 2",
            marks=needs_fsdp_on_cpu,
        ),
    ],
)
def test_cpu_launch_script_command_trains(tmp_path, script, args, expected):
    """The command the script would exec, run for real with the launcher of this interpreter."""
    *_, command = dry_run(script, args, {"MASTER_PORT": str(free_port())})
    out = run([*LAUNCHERS[command[0]], *command[1:]], tmp_path)
    assert expected in out
