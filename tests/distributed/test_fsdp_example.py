"""examples/fsdp2_train.py runs under torchrun (2 gloo ranks) and resumes exactly from a DCP checkpoint;
its launch scripts are checked with the others in test_examples.py."""

from __future__ import annotations

import os
import re
import shutil

from tests.distributed.launchers import run, torchrun
from tests.settings import needs_fsdp_on_cpu

pytestmark = needs_fsdp_on_cpu


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
