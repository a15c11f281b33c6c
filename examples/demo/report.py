"""Rank 0's report: metrics.jsonl, summary.json, demo.png and the table on stdout.

``metrics.jsonl``, one JSON object per step, method and seed::

    {"method": "sum" | "pcgrad" | "gradvac", "seed": 0, "step": 0, "losses": {"left": 2.30, ...},
     "step_time_s": 0.004,
     # PCGrad and GradVac only, per unordered task pair "a/b", averaged over both visit directions
     # (and, in "cosines", "targets", "corrected", over GradVac's blocks too):
     "cosines": {"left/right": 0.12, ...},    # cosine measured when one task's gradient visits the other's
     "targets": {"left/right": 0.05, ...},    # GradVac's EMA target after this step (PCGrad: always 0)
     "corrected": {"left/right": 0.5, ...},   # fraction of those visits that GradVac corrected
     # with --grouping module or parameter: the same cosines per block (layer or parameter)
     "block_cosines": {"trunk.0": {"left/right": 0.1, ...}, "trunk.2": {...}},
     # gradvac_dist.StepDiagnostics.summary(): over all blocks and visits
     "diagnostics": {"step": 1.0, "mean_cosine": 0.1, "corrected_fraction": 0.5, "target_min": 0.0, "target_max": 0.1}}

``losses`` are the training losses of that step's batches, averaged over the processes. The cosines
are GradVac's visiting cosines (``GradVacStepResult.cosines``): when task ``i`` visits task ``j``, the
cosine of ``i``'s gradient, as corrected by the visits before, with ``j``'s original gradient.
For ``i``'s first visit that is the plain cosine of the two task gradients.

``summary.json``: the configuration; per method, each seed's held-out accuracy and time per step,
and per task the mean and standard deviation over the seeds (the sample standard deviation, 0 for
one seed); ``paired_vs_sum``: per seed, the method's mean accuracy minus the summed losses' on the
same seed, then their mean and standard deviation.
"""

from __future__ import annotations

import json
import os
import statistics

__all__ = ["format_table", "mean_std", "summarise", "write_report"]


def _mean_step_ms(times: list[float]) -> float:
    """Mean wall time of a step in ms, the first (warm-up) step left out when there are others."""
    kept = times[1:] if len(times) > 1 else times
    return 1000.0 * statistics.fmean(kept)


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(args, data, runs, device) -> dict:
    import torch

    from .train import METHODS, seeds_of

    tasks = [t.name for t in data.tasks]

    def per_seed(run) -> dict:
        return {
            "seed": run.seed,
            "heldout_accuracy": run.heldout_accuracy,
            "mean_heldout_accuracy": statistics.fmean(run.heldout_accuracy[t] for t in tasks),
            "ms_per_step": _mean_step_ms(run.step_times),
            "train_seconds": run.train_seconds,
        }

    methods = {}
    for key, label in METHODS:
        seeds = [per_seed(run) for run in runs[key]]
        methods[key] = {
            "label": label,
            "per_seed": seeds,
            "heldout_accuracy": {t: mean_std([s["heldout_accuracy"][t] for s in seeds]) for t in tasks},
            "mean_heldout_accuracy": mean_std([s["mean_heldout_accuracy"] for s in seeds]),
            "ms_per_step": statistics.fmean(s["ms_per_step"] for s in seeds),
            "train_seconds": sum(s["train_seconds"] for s in seeds),
        }
    base = [s["mean_heldout_accuracy"] for s in methods["sum"]["per_seed"]]
    for key, _ in METHODS:
        if key != "sum":
            mine = [s["mean_heldout_accuracy"] for s in methods[key]["per_seed"]]
            methods[key]["paired_vs_sum"] = mean_std([a - b for a, b in zip(mine, base)])
    return {
        "config": {
            "tasks": tasks,
            "world_size": args.world_size,
            "backend": args.backend,
            "device": str(device),
            "grouping": args.grouping,
            "beta": args.beta,
            "steps": args.steps,
            "batch_size_per_process": args.batch_size,
            "lr": args.lr,
            "hidden": args.hidden,
            "seeds": seeds_of(args),
            "train_examples": len(data.x_train),
            "heldout_examples": len(data.x_heldout),
            "torch": torch.__version__,
        },
        "methods": methods,
    }


def _pct(stat: dict[str, float], sign: bool = False) -> str:
    return f"{100 * stat['mean']:{'+' if sign else ''}.1f} ± {100 * stat['std']:.1f}"


def format_table(summary: dict, descriptions: dict[str, str]) -> str:
    methods = summary["methods"]
    keys = list(methods)
    n = len(summary["config"]["seeds"])
    title = f"held-out accuracy, % (mean ± std over {n} seed{'s' if n > 1 else ''})"
    width = max(len(title) + 2, *(len(d) + 2 for d in descriptions.values()))
    col = max(14, *(len(methods[k]["label"]) + 2 for k in keys))
    lines = [f"{title:<{width}}" + "".join(f"{methods[k]['label']:>{col}}" for k in keys)]
    for name, desc in descriptions.items():
        lines.append(f"{desc:<{width}}" + "".join(f"{_pct(methods[k]['heldout_accuracy'][name]):>{col}}" for k in keys))
    lines.append(
        f"{'mean over tasks':<{width}}" + "".join(f"{_pct(methods[k]['mean_heldout_accuracy']):>{col}}" for k in keys)
    )
    paired = "".join(
        f"{_pct(methods[k]['paired_vs_sum'], sign=True) if 'paired_vs_sum' in methods[k] else '-':>{col}}" for k in keys
    )
    lines.append(f"{'mean minus sum, same seed':<{width}}" + paired)
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
        for method_runs in runs.values():
            for run in method_runs:
                for record in run.records:
                    f.write(json.dumps(record) + "\n")
    summary_path = os.path.join(args.out, "summary.json")
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    figure_path = os.path.join(args.out, "demo.png")
    make_figure({k: [r.records for r in rs] for k, rs in runs.items()}, summary, figure_path)
    cfg = summary["config"]
    print(
        f"\nsum vs PCGrad vs GradVac: {len(cfg['tasks'])} tasks, {cfg['world_size']} process(es) "
        f"({cfg['backend']}, {cfg['device']}), {cfg['steps']} steps of {cfg['batch_size_per_process']} examples per "
        f"process, seeds {cfg['seeds']}, grouping={cfg['grouping']}, beta={cfg['beta']} (PCGrad: 0); held out: "
        f"{cfg['heldout_examples']} pairs of unseen digit images"
    )
    print(format_table(summary, {t.name: t.description for t in data.tasks}))
    print(
        "(std: sample standard deviation over the seeds; 'mean minus sum': per seed, the method's mean accuracy "
        "minus the summed losses' on the same initialisation and batches; wall time per step: forward + backward "
        "+ optimizer step on rank 0, first step left out, mean over the seeds)"
    )
    print(f"wrote {metrics_path}, {summary_path}, {figure_path}", flush=True)
