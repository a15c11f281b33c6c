"""The GPU check (launch/gpu_check.sh, ``python -m benchmarks gpu-check``) rehearsed on CPU: every step but
the CUDA parts. ``--device cpu`` runs the same commands with gloo (tests/gpu collects nothing here)
and writes the table; the launch script's dry run shows the command it would run on a GPU machine."""

from __future__ import annotations

import os
import re
import subprocess

from benchmarks import gpu_check
from tests.distributed.launchers import ROOT


def test_cpu_rehearsal_runs_every_step_and_writes_the_table(tmp_path):
    out = tmp_path / "check.md"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("**GPU check: CPU rehearsal (")
    assert f"torch {__import__('torch').__version__}" in text
    assert "| tests | nothing collected (no CUDA here) |" in text
    for step in ("ddp", "ddp_per_task", "fsdp"):
        assert f"| {step} | ok |" in text, text
    for title in ("DDP, shared batch 64", "DDP, per-task data, batch 96", "FSDP2: W=1"):
        assert title in text, text
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(rows) == 2 * 4 + 4  # (b), (a), (d), (e) twice; FSDP's four
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and all(c == "-" or c.endswith("x") for c in cells[2:]), row
    assert (tmp_path / "check_logs" / "ddp.json").is_file()


def test_a_failing_step_is_reported_with_its_log(tmp_path, monkeypatch):
    real = gpu_check.commands

    def broken(*args, **kwargs):
        cmds = real(*args, **kwargs)
        cmds["fsdp"] = [*cmds["fsdp"][:-2], "--no-such-option"]
        return {"fsdp": cmds["fsdp"]}

    monkeypatch.setattr(gpu_check, "commands", broken)
    out = tmp_path / "check.md"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 1
    text = out.read_text()
    assert re.search(r"^\| fsdp \| exit [1-9]\d* \|", text, re.M), text  # torchrun's status for its failed rank
    assert "`fsdp` failed; the end of its log:" in text
    assert "unrecognized arguments: --no-such-option" in (tmp_path / "check_logs" / "fsdp.log").read_text()


def test_launch_script_dry_run():
    env = dict(os.environ, GRADVAC_DRY_RUN="1", WHEELS=str(ROOT / "no-such-folder"))
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--out", "x.md"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["timeout", "--kill-after=10", "480", "python3", "-m", "benchmarks", "gpu-check",
                                   "--out", "x.md"]  # fmt: skip


def test_cuda_is_refused_without_a_gpu(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", "x.md"])
    assert "--device cpu rehearses the same steps" in capsys.readouterr().err
