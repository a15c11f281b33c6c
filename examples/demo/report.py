"""Rank 0's report: metrics.jsonl, summary.json, demo.png and the table on stdout.

``metrics.jsonl``, one JSON object per step and method::

    {"method": "gradvac" | "sum", "step": 0, "losses": {"left": 2.30, ...}, "step_time_s": 0.004,
     # GradVac only, per unordered task pair "a/b", averaged over blocks and both visit directions:
     "cosines": {"left/right": 0.12, ...},    # cosine measured when one task's gradient visits the other's
     "targets": {"left/right": 0.05, ...},    # GradVac's EMA target after this step
     "corrected": {"left/right": 0.5, ...}}   # fraction of those visits that GradVac corrected

``losses`` are the training losses of that step's batches, averaged over the processes.
"""

from __future__ import annotations

import json
import os
import statistics

__all__ = ["format_table", "summarise", "write_report"]


def _mean_step_ms(times: list[float]) -> float:
    """Mean wall time of a step in ms, the first (warm-up) step left out when there are others."""
    kept = times[1:] if len(times) > 1 else times
    return 1000.0 * statistics.fmean(kept)


def summarise(args, data, runs, device) -> dict:
    import torch

    from .train import METHODS

    return {
        "config": {
            "tasks": [t.name for t in data.tasks],
            "world_size": args.world_size,
            "backend": args.backend,
            "device": str(device),
            "grouping": args.grouping,
            "beta": args.beta,
            "steps": args.steps,
            "batch_size_per_process": args.batch_size,
            "lr": args.lr,
            "hidden": args.hidden,
            "seed": args.seed,
            "train_examples": len(data.x_train),
            "heldout_examples": len(data.x_heldout),
            "torch": torch.__version__,
        },
        "methods": {
            key: {
                "label": label,
                "heldout_accuracy": runs[key].heldout_accuracy,
                "mean_heldout_accuracy": statistics.fmean(runs[key].heldout_accuracy.values()),
                "ms_per_step": _mean_step_ms(runs[key].step_times),
                "train_seconds": runs[key].train_seconds,
            }
            for key, label in METHODS
        },
    }


def format_table(summary: dict, descriptions: dict[str, str]) -> str:
    methods = summary["methods"]
    keys = list(methods)
    labels = [methods[k]["label"] for k in keys]
    width = max(24, *(len(d) + 2 for d in descriptions.values()))
    col = max(9, *(len(label) + 2 for label in labels))
    lines = [f"{'held-out accuracy':<{width}}" + "".join(f"{label:>{col}}" for label in labels)]
    for name, desc in descriptions.items():
        row = "".join(f"{100 * methods[k]['heldout_accuracy'][name]:>{col - 1}.1f}%" for k in keys)
        lines.append(f"{desc:<{width}}" + row)
    lines.append(
        f"{'mean':<{width}}" + "".join(f"{100 * methods[k]['mean_heldout_accuracy']:>{col - 1}.1f}%" for k in keys)
    )
    lines.append(
        f"{'wall time per step (ms)':<{width}}" + "".join(f"{methods[k]['ms_per_step']:>{col}.2f}" for k in keys)
    )
    return "\n".join(lines)


def write_report(args, data, runs, device) -> None:
    from .plot import make_figure

    os.makedirs(args.out, exist_ok=True)
    summary = summarise(args, data, runs, device)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    with open(metrics_path, "w") as f:
        for run in runs.values():
            for record in run.records:
                f.write(json.dumps(record) + "\n")
    summary_path = os.path.join(args.out, "summary.json")
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    figure_path = os.path.join(args.out, "demo.png")
    make_figure({k: r.records for k, r in runs.items()}, summary, figure_path)
    cfg = summary["config"]
    print(
        f"\nGradVac vs the summed losses: {len(cfg['tasks'])} tasks, {cfg['world_size']} process(es) "
        f"({cfg['backend']}, {cfg['device']}), {cfg['steps']} steps of {cfg['batch_size_per_process']} examples per "
        f"process, grouping={cfg['grouping']}, beta={cfg['beta']}; held out: {cfg['heldout_examples']} pairs of "
        "unseen digit images"
    )
    print(format_table(summary, {t.name: t.description for t in data.tasks}))
    print("(wall time per step: forward + backward + optimizer step on rank 0, first step left out)")
    print(f"wrote {metrics_path}, {summary_path}, {figure_path}", flush=True)
