"""The GPU check in one go: the CUDA tests, the DDP and FSDP2 benchmarks on NCCL, one markdown table.

    bash launch/gpu_check.sh [--out docs/bench/gpu-check.md]     # on a GPU machine (about 5 minutes)
    python -m benchmarks gpu-check --device cpu --out FILE        # the same steps on CPU and gloo: a rehearsal

Steps, each a subprocess with its own deadline, its output kept in ``--logs``:

1. ``pytest tests/gpu``: DDP and FSDP2 on NCCL against the core, the host-synchronisation count of
   a whole DDP step (exactly one, the coefficient stage's read), fp16 autocast with a GradScaler
   (on a machine without CUDA nothing is collected: the table says so);
2. ``python -m benchmarks ddp`` under ``torchrun --nproc_per_node W`` on NCCL: plain DDP on the
   summed loss (b), the m-pass DDP step (a), GradVac-DDP replicated (d) and sharded (e), for a
   shared batch and for per-task data;
3. ``python -m benchmarks fsdp`` under torchrun: the m-pass FSDP2 step, FSDP2 on the summed loss,
   GradVac-FSDP;
4. one markdown table: the GPU, the torch release, the date, each step's verdict, the medians and
   their ratios to plain and to m-pass training.

A step that fails is reported as failed, its log's tail included, and the others still run; the
exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: seconds per step: the whole check fits in 8 minutes on one GPU
DEADLINES = {"tests": 240, "ddp": 60, "ddp_per_task": 60, "fsdp": 60}


def commands(
    device: str, world: int, logs: Path, quick: bool = False, python: str = sys.executable
) -> dict[str, list[str]]:
    """The command of each step (run from the repository root); ``quick``: the benchmarks' smoke sizes."""
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    ddp = [*torchrun, "-m", "benchmarks", "ddp", "--device", device, "--variants", "abde"]
    ddp += ["--quick"] if quick else ["--steps", "20"]
    fsdp = [*torchrun, "-m", "benchmarks", "fsdp", "--device", device, *(["--quick"] if quick else [])]
    return {
        "tests": [python, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/gpu"],
        "ddp": [*ddp, "--batch", "64", "--json", str(logs / "ddp.json")],
        "ddp_per_task": [*ddp, "--per-task", "--batch", "96", "--json", str(logs / "ddp_per_task.json")],
        "fsdp": [*fsdp, "--json", str(logs / "fsdp.json")],
    }


def _passed(step: dict, device: str) -> bool:
    """Exit 0; for the tests on a machine without CUDA also pytest's 5 (nothing collected, by design)."""
    return step["code"] == 0 or (step["name"] == "tests" and step["code"] == 5 and device == "cpu")


def _run(name: str, cmd: list[str], logs: Path) -> dict:
    log = logs / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=DEADLINES[name])
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    return {"name": name, "code": code, "seconds": time.perf_counter() - start, "log": log}


def _tests_cell(step: dict) -> str:
    text = step["log"].read_text()
    summary = re.findall(r"=+ (.*(?:passed|failed|error|no tests ran).*) in [0-9.]+s", text)
    counts = summary[-1] if summary else "no summary"
    sync = re.search(r"^(PASSED|FAILED|ERROR) \S*test_ddp_step_adds_exactly_one_host_synchronisation", text, re.M)
    sync_text = f"; one host synchronisation per DDP step: {sync.group(1)}" if sync else ""
    return f"{counts}{sync_text}"


def _ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}x" if x and y else "-"


def table(device_name: str, steps: list[dict], logs: Path, device: str) -> str:
    """The markdown report of one check."""
    when = datetime.date.today().isoformat()
    out = [
        f"**GPU check: {device_name}, torch {torch.__version__}, {when}** "
        f"(`python -m benchmarks gpu-check`, {platform.python_version()})",
        "",
        "| step | verdict | seconds | result |",
        "|:---|:---|---:|:---|",
    ]
    for step in steps:
        verdict = "timed out" if step["code"] is None else ("ok" if step["code"] == 0 else f"exit {step['code']}")
        if step["name"] == "tests" and step["code"] == 5:
            verdict = "nothing collected (no CUDA here)" if device == "cpu" else "FAILED: nothing collected"
        result = _tests_cell(step) if step["name"] == "tests" else "see below" if step["code"] == 0 else "-"
        out.append(f"| {step['name']} | {verdict} | {step['seconds']:.0f} | {result} |")
    for name, title in (("ddp", "DDP, shared batch 64"), ("ddp_per_task", "DDP, per-task data, batch 96")):
        path = logs / f"{name}.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())["summary"]
        med, paired = s["median_ms"], s["paired"]
        out += ["", f"**{title}: W={s['world']}, m={s['m']}, n={s['n'] / 1e6:.2f}M, median ms per step**", ""]
        out += ["| variant | median ms | vs plain (b) | vs m-pass (a) | paired vs (a) |", "|:---|---:|---:|---:|---:|"]
        labels = {"a": "(a) m-pass DDP", "b": "(b) plain DDP, summed loss", "d": "(d) GradVac replicated",
                  "e": "(e) GradVac sharded"}  # fmt: skip
        for k in ("b", "a", "d", "e"):
            if k in med:
                pair = f"{paired[k]:.2f}x" if k in paired else "-"
                row = [labels[k], f"{med[k]:.2f}", _ratio(med[k], med.get("b")), _ratio(med[k], med.get("a")), pair]
                out.append("| " + " | ".join(row) + " |")
    path = logs / "fsdp.json"
    if path.is_file():
        f = json.loads(path.read_text())
        med, labels = f["median_ms"], f["labels"]
        out += ["", f"**FSDP2: W={f['world']}, m={f['m']}, n={f['n'] / 1e6:.2f}M ({f['device']}), median ms**", ""]
        out += ["| variant | median ms | vs summed loss (c) | vs m-pass (a) |", "|:---|---:|---:|---:|"]
        for k in ("c", "a", "b", "d"):
            if k in med:
                out.append(
                    f"| {labels[k]} | {med[k]:.2f} | {_ratio(med[k], med.get('c'))} | {_ratio(med[k], med.get('a'))} |"
                )
    failed = [s for s in steps if not _passed(s, device)]
    for step in failed:
        tail = step["log"].read_text()[-1500:]
        out += ["", f"`{step['name']}` failed; the end of its log:", "", "```", tail.rstrip(), "```"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the rehearsal on gloo")
    ap.add_argument("--world", type=int, default=1, help="ranks of the benchmarks (default 1: one GPU)")
    ap.add_argument("--out", default="runs/gpu_check.md", help="the markdown table (default runs/gpu_check.md)")
    ap.add_argument("--logs", default=None, help="each step's log and JSON (default: next to --out)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--quick", action="store_true", help="the benchmarks' smoke sizes (a rehearsal, not a measurement)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        ap.error("--device cuda needs a CUDA GPU here; --device cpu rehearses the same steps on gloo")
    if args.world < 1 or (args.device == "cuda" and not args.dry_run and args.world > torch.cuda.device_count()):
        ap.error(f"--world must be between 1 and the {torch.cuda.device_count()} GPUs here, got {args.world}")
    out = Path(args.out)
    logs = Path(args.logs) if args.logs else out.with_suffix("").with_name(out.stem + "_logs")
    cmds = commands(args.device, args.world, logs, args.quick)
    if args.dry_run:
        for cmd in cmds.values():
            print(" ".join(cmd))
        return 0
    logs.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = []
    for name, cmd in cmds.items():
        print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
        steps.append(_run(name, cmd, logs))
        print(f"gpu-check: {name}: exit {steps[-1]['code']} in {steps[-1]['seconds']:.0f} s", file=sys.stderr)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU rehearsal ({os.cpu_count()} cores, gloo)"
    text = table(name, steps, logs, args.device)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text, flush=True)
    return 0 if all(_passed(s, args.device) for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
