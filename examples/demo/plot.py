"""demo.png: per-task loss curves of both methods, held-out accuracy, and the gradient conflict GradVac acts on."""

from __future__ import annotations

import numpy as np

__all__ = ["make_figure", "smooth"]


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is so far)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def make_figure(records: dict[str, list[dict]], summary: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    methods = summary["methods"]
    cfg = summary["config"]
    tasks = cfg["tasks"]
    steps = cfg["steps"]
    window = max(1, steps // 30)
    styles = {"gradvac": "-", "sum": "--"}
    task_colors = {n: f"C{i}" for i, n in enumerate(tasks)}

    fig = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_loss, ax_acc), (ax_cos, ax_tgt) = fig.subplots(2, 2)

    for method, recs in records.items():
        x = [r["step"] for r in recs]
        for n in tasks:
            ax_loss.plot(
                x, smooth([r["losses"][n] for r in recs], window), styles[method], color=task_colors[n], lw=1.6
            )
    ax_loss.set_yscale("log")
    ax_loss.set(title=f"Training loss per task ({window}-step average)", xlabel="step", ylabel="cross-entropy (log)")
    handles = [Line2D([], [], color=task_colors[n], lw=2, label=n) for n in tasks]
    handles += [Line2D([], [], color="k", ls=styles[k], label=methods[k]["label"]) for k in records]
    ax_loss.legend(handles=handles, fontsize=8, ncol=2)

    width = 0.8 / len(methods)
    pos = np.arange(len(tasks))
    for k, key in enumerate(methods):
        acc = [100 * methods[key]["heldout_accuracy"][n] for n in tasks]
        label = f"{methods[key]['label']} (mean {100 * methods[key]['mean_heldout_accuracy']:.1f}%)"
        bars = ax_acc.bar(
            pos + (k - (len(methods) - 1) / 2) * width,
            acc,
            width,
            label=label,
            color="C0" if key == "gradvac" else "0.6",
        )
        ax_acc.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax_acc.set_xticks(pos, tasks)
    lowest = min(100 * a for m in methods.values() for a in m["heldout_accuracy"].values())
    ax_acc.set_ylim(max(0.0, 10 * np.floor(lowest / 10) - 10), 102)
    ax_acc.set(title=f"Held-out accuracy, {cfg['heldout_examples']} pairs of unseen images", ylabel="% (axis cut)")
    ax_acc.legend(fontsize=8, loc="lower right")

    gv = records.get("gradvac", [])
    pairs = list(gv[0]["cosines"]) if gv else []
    x = [r["step"] for r in gv]
    for p, pair in enumerate(pairs):
        color = f"C{p % 10}" if len(pairs) <= 10 else _tab20(p)
        cos = [r["cosines"][pair] for r in gv]
        ax_cos.plot(x, cos, color=color, lw=0.5, alpha=0.25)
        ax_cos.plot(x, smooth(cos, window), color=color, lw=1.6, label=pair)
        ax_tgt.plot(x, [r["targets"][pair] for r in gv], color=color, lw=1.6, label=pair)
    for ax in (ax_cos, ax_tgt):
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xlabel("step")
        if pairs:
            ax.legend(fontsize=7, ncol=2 if len(pairs) > 6 else 1)
    ax_cos.set(title=f"GradVac: cosine of task gradients on the trunk ({window}-step avg.)", ylabel="cosine")
    ax_tgt.set(
        title=f"GradVac: EMA target per pair (beta={cfg['beta']})", ylabel="target (cosines below it are raised)"
    )

    fig.suptitle(
        f"GradVac vs summed losses: {len(tasks)} tasks, {cfg['world_size']} process(es) ({cfg['backend']}), "
        f"{steps} steps, grouping={cfg['grouping']}.  Wall time per step: "
        + ", ".join(f"{m['label']} {m['ms_per_step']:.1f} ms" for m in methods.values()),
        fontsize=11,
    )
    fig.savefig(path, dpi=110)


def _tab20(i: int):
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)
