"""The demo end to end (tiny configuration: real processes through torchrun), its option checks and its data."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.demo import data as demo_data
from examples.demo import options

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Runs ``python args...`` from the repository root; kills its whole process group on timeout."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _check_outputs(out_dir: Path, stdout: str, tasks: list[str], steps: int, world_size: int) -> None:
    pairs = {f"{a}/{b}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]}
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    by_method = {m: [r for r in records if r["method"] == m] for m in ("gradvac", "sum")}
    assert len(records) == 2 * steps
    for method, recs in by_method.items():
        assert [r["step"] for r in recs] == list(range(steps)), method
        for r in recs:
            assert set(r["losses"]) == set(tasks)
            assert all(math.isfinite(v) and v > 0 for v in r["losses"].values())
            assert r["step_time_s"] > 0
            if method == "gradvac":
                assert set(r) == {"method", "step", "losses", "step_time_s", "cosines", "targets", "corrected"}
                for key in ("cosines", "targets", "corrected"):
                    assert set(r[key]) == pairs, key
                    assert all(-1.0 <= v <= 1.0 for v in r[key].values()), key
            else:
                assert set(r) == {"method", "step", "losses", "step_time_s"}
    # Step 0 starts from the same weights on the same batch: the same losses for both methods.
    first = [by_method[m][0]["losses"] for m in ("gradvac", "sum")]
    assert all(abs(first[0][t] - first[1][t]) < 1e-5 for t in tasks)

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["config"]["tasks"] == tasks and summary["config"]["world_size"] == world_size
    for method in ("gradvac", "sum"):
        acc = summary["methods"][method]["heldout_accuracy"]
        assert set(acc) == set(tasks) and all(0.0 <= a <= 1.0 for a in acc.values())
        assert summary["methods"][method]["ms_per_step"] > 0

    png = (out_dir / "demo.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000

    header = next(line for line in stdout.splitlines() if line.startswith("held-out accuracy"))
    assert header.split()[-2:] == ["GradVac", "sum"]
    for task in demo_data.TASKS[: len(tasks)]:
        assert any(line.startswith(task.description) and line.count("%") == 2 for line in stdout.splitlines()), task
    assert any(line.startswith("wall time per step (ms)") for line in stdout.splitlines())


def test_demo_end_to_end_tiny(tmp_path):
    out_dir = tmp_path / "demo"
    args = ["--tasks", "4", "--grouping", "module", "--steps", "6", "--hidden", "16", "--batch-size", "8"]
    result = _run(["-m", "examples.demo", *args, "--out", str(out_dir)])
    assert result.returncode == 0, result.stderr
    _check_outputs(out_dir, result.stdout, ["left", "right", "parity", "mod3"], steps=6, world_size=2)
    assert "demo finished in" in result.stdout
    assert "GradVac" in result.stderr and "parity=" in result.stderr  # the progress bar, with per-task losses


def test_demo_under_external_torchrun(tmp_path):
    out_dir = tmp_path / "demo"
    torchrun = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1"]  # fmt: skip
    args = ["--steps", "3", "--hidden", "16", "--batch-size", "8", "--no-progress", "--out", str(out_dir)]
    result = _run([*torchrun, "-m", "examples.demo.train", *args])
    assert result.returncode == 0, result.stderr
    _check_outputs(out_dir, result.stdout, ["left", "right", "parity"], steps=3, world_size=2)


def test_impossible_option_stops_before_any_process_starts(tmp_path):
    result = _run(["-m", "examples.demo", "--tasks", "1", "--out", str(tmp_path / "x")], timeout=60)
    assert result.returncode == 2
    assert "--tasks must be between 2 and 6" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "1"], "--tasks must be between 2 and 6"),
        (["--tasks", "7"], "--tasks must be between 2 and 6"),
        (["--world-size", "0"], "--world-size must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--batch-size", "4000"], "is larger than the 3000 training examples each of the 2 processes"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--beta", "1.5"], "--beta must be in [0, 1]"),
        (["--hidden", "0"], "--hidden must be at least 1"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--grouping", "layer"], "invalid choice: 'layer'"),
        (["--backend", "mpi"], "invalid choice: 'mpi'"),
    ],
)
def test_option_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        options.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(SystemExit):
        options.parse_args(["--out", str(file)])
    assert "exists and is not a folder" in capsys.readouterr().err


def test_world_size_must_match_the_launcher(capsys):
    assert options.parse_args([], launched_world=3, local_world=3).world_size == 3
    with pytest.raises(SystemExit):
        options.parse_args(["--world-size", "2"], launched_world=3, local_world=3)
    assert "differs from the 3 processes the launcher started" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_nccl_without_gpu(capsys):
    with pytest.raises(SystemExit):
        options.parse_args(["--backend", "nccl"])
    assert "--backend nccl needs CUDA GPUs" in capsys.readouterr().err
    assert options.parse_args([]).backend == "gloo"  # auto


def test_nccl_needs_a_gpu_per_process(monkeypatch, capsys):
    monkeypatch.setattr(options, "_cuda_count", lambda: 1)
    with pytest.raises(SystemExit):
        options.parse_args(["--backend", "nccl", "--world-size", "2"])
    assert "needs one GPU per process: 2 processes on this machine but 1 GPU(s)" in capsys.readouterr().err
    assert options.parse_args(["--world-size", "2"]).backend == "gloo"  # auto falls back to gloo
    assert options.parse_args(["--world-size", "1"]).backend == "nccl"


def test_data_labels_split_and_determinism():
    a = demo_data.load(6)
    b = demo_data.load(6)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_heldout, b.y_heldout)
    assert a.x_train.shape == (demo_data.NUM_TRAIN, 128) and a.x_heldout.shape == (demo_data.NUM_HELDOUT, 128)
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
    for y in (a.y_train, a.y_heldout):
        left, right = y[:, 0], y[:, 1]
        assert torch.equal(y[:, 2], (left + right) % 2)
        assert torch.equal(y[:, 3], (left + right) % 3)
        assert torch.equal(y[:, 4], (left > right).long())
        assert torch.equal(y[:, 5], (left + right >= 10).long())
        for t, task in enumerate(demo_data.TASKS):
            assert int(y[:, t].max()) < task.num_classes
    # held-out pairs are made of images never used in training
    train_images = {bytes(row.numpy()) for row in a.x_train.view(-1, 8, 16)[:, :, :8].reshape(-1, 64)}
    held_images = {bytes(row.numpy()) for row in a.x_heldout.view(-1, 8, 16)[:, :, :8].reshape(-1, 64)}
    assert not train_images & held_images
    assert demo_data.load(3).y_train.shape == (demo_data.NUM_TRAIN, 3)
