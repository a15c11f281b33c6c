"""examples/fsdp2_train.py runs under torchrun (2 gloo ranks) and resumes exactly from a DCP checkpoint;
the FSDP2 launch scripts parse and set up .venv before launching."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.distributed.launchers import ROOT, run, torchrun


def _torchrun(*args: str) -> str:
    return run([*torchrun(), "examples/fsdp2_train.py", "--backend", "gloo", *args])


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
