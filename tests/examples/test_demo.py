"""The demo end to end (tiny configuration: real processes through torchrun), its option checks, its data,
and its PCGrad being GradVac with beta=0."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.demo import data as demo_data
from examples.demo import options
from examples.demo.train import MultiTaskMLP, block_names
from gradvac_dist import draw_order, gradvac_step

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


METHODS = ("sum", "pcgrad", "gradvac")
GRADVAC_KEYS = {"method", "seed", "step", "losses", "step_time_s", "cosines", "targets", "corrected", "diagnostics"}


def _check_outputs(
    out_dir: Path, stdout: str, tasks: list[str], steps: int, world_size: int, seeds: list[int], blocks: list[str]
) -> None:
    """``blocks``: GradVac's blocks on the trunk when they are recorded per block (grouping not ``whole``)."""
    pairs = {f"{a}/{b}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]}
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(METHODS) * len(seeds) * steps
    runs = {(m, s): [r for r in records if r["method"] == m and r["seed"] == s] for m in METHODS for s in seeds}
    for (method, seed), recs in runs.items():
        assert [r["step"] for r in recs] == list(range(steps)), (method, seed)
        for r in recs:
            assert set(r["losses"]) == set(tasks)
            assert all(math.isfinite(v) and v > 0 for v in r["losses"].values())
            assert r["step_time_s"] > 0
            if method == "sum":
                assert set(r) == {"method", "seed", "step", "losses", "step_time_s"}
                continue
            assert set(r) == GRADVAC_KEYS | ({"block_cosines"} if blocks else set())
            d = r["diagnostics"]
            assert d["step"] == r["step"] + 1 and 0.0 <= d["corrected_fraction"] <= 1.0
            assert -1.0 <= d["target_min"] <= d["target_max"] <= 1.0 and -1.0 <= d["mean_cosine"] <= 1.0
            for key in ("cosines", "targets", "corrected"):
                assert set(r[key]) == pairs, key
                assert all(-1.0 <= v <= 1.0 for v in r[key].values()), key
            if blocks:
                assert list(r["block_cosines"]) == blocks
                for per_pair in r["block_cosines"].values():
                    assert set(per_pair) == pairs and all(-1.0 <= v <= 1.0 for v in per_pair.values())
                # the per-pair cosine is the mean of the per-block ones
                for pair in pairs:
                    mean = sum(r["block_cosines"][b][pair] for b in blocks) / len(blocks)
                    assert abs(mean - r["cosines"][pair]) < 1e-5
        if method == "pcgrad":  # beta = 0: every target stays exactly 0
            assert all(v == 0.0 for r in recs for v in r["targets"].values())
        if method == "gradvac":  # beta > 0: the targets move
            assert any(v != 0.0 for r in recs for v in r["targets"].values())
    # Paired seeds: step 0 starts from the same weights on the same batch for every method of a seed,
    # and another seed starts elsewhere.
    for seed in seeds:
        first = [runs[(m, seed)][0]["losses"] for m in METHODS]
        assert all(abs(first[0][t] - other[t]) < 1e-5 for other in first[1:] for t in tasks), seed
    if len(seeds) > 1:
        a, b = (runs[("sum", s)][0]["losses"] for s in seeds[:2])
        assert any(abs(a[t] - b[t]) > 1e-4 for t in tasks)

    summary = json.loads((out_dir / "summary.json").read_text())
    cfg = summary["config"]
    assert cfg["tasks"] == tasks and cfg["world_size"] == world_size and cfg["seeds"] == seeds
    assert list(summary["methods"]) == list(METHODS)
    sum_means = [s["mean_heldout_accuracy"] for s in summary["methods"]["sum"]["per_seed"]]
    for method in METHODS:
        meth = summary["methods"][method]
        assert [s["seed"] for s in meth["per_seed"]] == seeds
        for s in meth["per_seed"]:
            acc = s["heldout_accuracy"]
            assert set(acc) == set(tasks) and all(0.0 <= a <= 1.0 for a in acc.values())
            assert s["ms_per_step"] > 0
            assert abs(s["mean_heldout_accuracy"] - statistics.fmean(acc.values())) < 1e-12
        for task in tasks:  # the mean and standard deviation over the seeds
            values = [s["heldout_accuracy"][task] for s in meth["per_seed"]]
            assert abs(meth["heldout_accuracy"][task]["mean"] - statistics.fmean(values)) < 1e-12
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            assert abs(meth["heldout_accuracy"][task]["std"] - std) < 1e-12
        if method != "sum":
            diffs = [s["mean_heldout_accuracy"] - b for s, b in zip(meth["per_seed"], sum_means)]
            assert abs(meth["paired_vs_sum"]["mean"] - statistics.fmean(diffs)) < 1e-12

    png = (out_dir / "demo.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000

    out_lines = stdout.splitlines()
    header = next(line for line in out_lines if line.startswith("held-out accuracy"))
    assert header.split()[-3:] == ["sum", "PCGrad", "GradVac"]
    assert f"over {len(seeds)} seed" in header
    for task in demo_data.TASKS[: len(tasks)]:
        assert any(line.startswith(task.description) and line.count("±") == 3 for line in out_lines), task
    paired = next(line for line in out_lines if line.startswith("mean minus sum, same seed"))
    assert paired.count("±") == 2
    assert any(line.startswith("wall time per step (ms)") for line in out_lines)


def test_demo_end_to_end_tiny(tmp_path):
    out_dir = tmp_path / "demo"
    args = ["--tasks", "4", "--grouping", "module", "--steps", "5", "--hidden", "16", "--batch-size", "8",
            "--seeds", "2", "--seed", "3"]  # fmt: skip
    result = _run(["-m", "examples.demo", *args, "--out", str(out_dir)])
    assert result.returncode == 0, result.stderr
    tasks = ["left", "right", "parity", "mod3"]
    _check_outputs(out_dir, result.stdout, tasks, steps=5, world_size=2, seeds=[3, 4], blocks=["trunk.0", "trunk.2"])
    assert "demo finished in" in result.stdout
    assert "GradVac seed 4" in result.stderr and "parity=" in result.stderr  # the progress bar, with per-task losses


def test_demo_under_external_torchrun(tmp_path):
    out_dir = tmp_path / "demo"
    torchrun = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1"]  # fmt: skip
    args = [
        "--steps",
        "3",
        "--hidden",
        "16",
        "--batch-size",
        "8",
        "--seeds",
        "1",
        "--no-progress",
        "--out",
        str(out_dir),
    ]
    result = _run([*torchrun, "-m", "examples.demo.train", *args])
    assert result.returncode == 0, result.stderr
    _check_outputs(out_dir, result.stdout, ["left", "right", "parity"], steps=3, world_size=2, seeds=[0], blocks=[])


def test_block_names_follow_the_grouping():
    model = MultiTaskMLP(128, 8, [10, 10, 2])
    assert block_names(model, "whole") == ["trunk"]
    assert block_names(model, "module") == ["trunk.0", "trunk.2"]
    assert block_names(model, "parameter") == ["trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias"]


def _pcgrad(jacobian: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """PCGrad (Yu et al., 2020) written from the paper: each task's gradient, in its visiting order, loses
    its component along every other task's gradient it conflicts with; the results are summed."""
    out = torch.zeros_like(jacobian[0])
    for i in range(len(jacobian)):
        g = jacobian[i].clone()
        for j in order[i].tolist():
            dot = g @ jacobian[j]
            if dot < 0:
                g = g - dot / (jacobian[j] @ jacobian[j]) * jacobian[j]
        out += g
    return out


def test_pcgrad_is_gradvac_with_beta_zero():
    """The demo's PCGrad: GradVac's step with beta=0 keeps its targets at 0 and equals PCGrad."""
    g = torch.Generator().manual_seed(0)
    m, n = 4, 50
    targets = torch.zeros(1, m, m, dtype=torch.float64)
    corrected = 0
    for _ in range(20):
        jac = torch.randn(m, n, generator=g, dtype=torch.float64)
        jac[1] = -0.8 * jac[0] + 0.6 * jac[1]  # a conflict in every draw
        order = draw_order(m, g)
        result = gradvac_step((jac @ jac.T).unsqueeze(0), targets, order, beta=0.0, eps=0.0)
        assert torch.equal(result.targets, targets)
        expected = _pcgrad(jac, order)
        assert torch.allclose(result.coefficients[0] @ jac, expected, rtol=1e-10, atol=1e-12)
        corrected += int(result.corrected.sum())
        targets = result.targets
    assert corrected > 20  # projections happened: not only the plain sum


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
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--grouping", "layer"], "invalid choice: 'layer'"),
        (["--backend", "mpi"], "invalid choice: 'mpi'"),
        (["--per-task", "--batch-size", "2"], "--batch-size must be at least 3, got 2"),
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


def _per_task_body(rank, world):
    """Two steps of the demo's per-task losses through DDP + gradvac_hook against GradVac on the rank-mean
    per-task Jacobian of a plain copy (each task's gradient from its own slice of each rank's batch)."""
    import copy

    from torch.nn.parallel import DistributedDataParallel

    from examples.demo.train import SHARED, task_losses
    from gradvac_dist import GradVac, GradVacState, backward, gradvac_hook
    from tests.distributed.ddp_bodies import block_columns, loss_jacobian, rank_mean, reference_grad

    data = demo_data.load(3, num_train=120, num_heldout=30)
    torch.manual_seed(0)
    model = MultiTaskMLP(data.num_features, 16, [t.num_classes for t in data.tasks]).double()
    plain = copy.deepcopy(model)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    state = GradVacState(num_tasks=3, beta=0.5, seed=0, grouping="module", shared_params=[SHARED])
    ddp.register_comm_hook(state, gradvac_hook)
    ref = GradVac(beta=0.5, seed=0)
    cols, sizes = block_columns(plain, "module", [SHARED])
    params = list(plain.parameters())
    errors, corrected = [], False
    for step in range(2):
        start = (step * world + rank) * 12
        xb, yb = data.x_train[start : start + 12].double(), data.y_train[start : start + 12]
        local = loss_jacobian(task_losses(plain, xb, yb, per_task=True), params)
        expected = reference_grad(ref, rank_mean(local), cols, sizes)
        corrected = corrected or bool(ref.last_result.corrected.any())
        backward(ddp, task_losses(ddp, xb, yb, per_task=True))
        got = torch.cat([p.grad.flatten() for p in model.parameters()])
        errors.append(float((got - expected).norm() / expected.norm()))
        with torch.no_grad():  # both take the same plain SGD step
            for p, q in zip(model.parameters(), plain.parameters()):
                p -= 0.1 * p.grad
                q.copy_(p)
        for p in model.parameters():
            p.grad = None
    return errors, corrected


def test_per_task_demo_losses_are_exact_under_ddp():
    from tests.distributed.harness import run_distributed

    for errors, corrected in run_distributed(_per_task_body, 2, timeout=90):
        assert max(errors) < 1e-12, errors
        assert corrected, "GradVac never corrected: the plain sum would pass too"


def test_per_task_losses_use_each_slice_for_its_own_task():
    from examples.demo.train import summed_loss, task_losses

    torch.manual_seed(0)
    model = MultiTaskMLP(4, 8, [2, 3, 2]).double()
    xb = torch.randn(7, 4, dtype=torch.float64)
    yb = torch.stack([torch.randint(0, c, (7,)) for c in (2, 3, 2)], 1)
    losses = task_losses(model, xb, yb, per_task=True)
    slices = [slice(0, 3), slice(3, 6), slice(6, 7)]  # torch.chunk's split of 7 rows into 3
    for i, (loss, rows) in enumerate(zip(losses, slices)):
        expected = torch.nn.functional.cross_entropy(model(xb[rows])[i], yb[rows, i])
        assert torch.allclose(loss, expected)
    total, parts = summed_loss(model, xb, yb, per_task=True)
    assert torch.allclose(total, torch.stack(losses).sum()) and len(parts) == 3


def test_demo_per_task_end_to_end(tmp_path):
    out_dir = tmp_path / "demo"
    args = ["--per-task", "--steps", "3", "--hidden", "16", "--batch-size", "9", "--seeds", "1", "--no-progress"]
    result = _run(["-m", "examples.demo", *args, "--out", str(out_dir)])
    assert result.returncode == 0, result.stderr
    _check_outputs(out_dir, result.stdout, ["left", "right", "parity"], steps=3, world_size=2, seeds=[0], blocks=None)
