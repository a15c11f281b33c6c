"""demo.png: per-task loss curves and held-out accuracy of the three methods over the seeds, the gradient
conflict GradVac and PCGrad act on, and, with a grouping other than ``whole``, that conflict per layer."""

from __future__ import annotations

import numpy as np

__all__ = ["make_figure", "smooth"]

STYLES = {"sum": "--", "pcgrad": ":", "gradvac": "-"}
BAR_COLORS = {"sum": "0.6", "pcgrad": "C1", "gradvac": "C0"}
BLOCK_STYLES = ("-", "--", ":", "-.")
MAX_PAIRS_PER_LAYER = 3  # more pairs than this: the per-layer panels show the mean over the pairs


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is so far)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def _curves(runs: list[list[dict]], value, window: int) -> np.ndarray:
    """``[seeds, steps]``: ``value(record)`` along each seed's run, smoothed."""
    return np.stack([smooth([value(r) for r in recs], window) for recs in runs])


def _band(ax, x, curves: np.ndarray, color, style, lw=1.6, label=None) -> None:
    """The mean over the seeds, and the range the seeds span (shaded)."""
    ax.plot(x, curves.mean(0), style, color=color, lw=lw, label=label)
    if len(curves) > 1:
        ax.fill_between(x, curves.min(0), curves.max(0), color=color, alpha=0.12, lw=0)


def _pair_color(p: int, n: int):
    if n <= 10:
        return f"C{p % 10}"
    from matplotlib import colormaps

    return colormaps["tab20"](p % 20)


def make_figure(records: dict[str, list[list[dict]]], summary: dict, path: str) -> None:
    """``records[method][seed index]``: that run's per-step records (see :mod:`examples.demo.report`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    methods = summary["methods"]
    cfg = summary["config"]
    tasks, steps, seeds = cfg["tasks"], cfg["steps"], cfg["seeds"]
    window = max(1, steps // 30)
    per_layer = cfg["grouping"] != "whole"
    task_colors = {n: f"C{i}" for i, n in enumerate(tasks)}
    spread = f"mean of {len(seeds)} seeds, shaded: their range" if len(seeds) > 1 else "1 seed"

    fig = Figure(figsize=(14, 13 if per_layer else 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3 if per_layer else 2, 2)
    (ax_loss, ax_acc), (ax_cos, ax_tgt) = axes[0], axes[1]

    for method, runs in records.items():
        x = [r["step"] for r in runs[0]]
        for n in tasks:
            _band(ax_loss, x, _curves(runs, lambda r, n=n: r["losses"][n], window), task_colors[n], STYLES[method])
    ax_loss.set_yscale("log")
    ax_loss.set(
        title=f"Training loss per task\n({window}-step average; {spread})", xlabel="step", ylabel="cross-entropy"
    )
    handles = [Line2D([], [], color=task_colors[n], lw=2, label=n) for n in tasks]
    handles += [Line2D([], [], color="k", ls=STYLES[k], label=methods[k]["label"]) for k in records]
    ax_loss.legend(handles=handles, fontsize=8, ncol=2)

    groups = [*tasks, "mean"]
    width = 0.8 / len(methods)
    pos = np.arange(len(groups))
    rng = np.random.default_rng(0)  # jitter of the per-seed dots only
    lowest = 100.0
    for k, key in enumerate(methods):
        meth = methods[key]
        stats = [meth["heldout_accuracy"][t] for t in tasks] + [meth["mean_heldout_accuracy"]]
        per_seed = [[s["heldout_accuracy"][t] for s in meth["per_seed"]] for t in tasks]
        per_seed.append([s["mean_heldout_accuracy"] for s in meth["per_seed"]])
        xs = pos + (k - (len(methods) - 1) / 2) * width
        mean = meth["mean_heldout_accuracy"]
        label = f"{meth['label']} (mean {100 * mean['mean']:.1f} ± {100 * mean['std']:.1f}%)"
        bars = ax_acc.bar(
            xs, [100 * s["mean"] for s in stats], width, yerr=[100 * s["std"] for s in stats], capsize=2,
            label=label, color=BAR_COLORS.get(key, f"C{k + 2}"), alpha=0.85,
        )  # fmt: skip
        ax_acc.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        for x0, values in zip(xs, per_seed):
            jitter = (rng.random(len(values)) - 0.5) * width * 0.5
            ax_acc.plot(x0 + jitter, [100 * v for v in values], ".", color="k", ms=3)
            lowest = min(lowest, *(100 * v for v in values))
    ax_acc.set_xticks(pos, groups)
    ax_acc.set_ylim(max(0.0, 10 * np.floor(lowest / 10) - 10), 102)
    ax_acc.set(
        title=f"Held-out accuracy, {cfg['heldout_examples']} pairs of unseen images\n(bars: mean ± std over the seeds; dots: each seed)",
        ylabel="% (axis cut)",
    )
    ax_acc.legend(fontsize=8, loc="lower right")

    aggregating = [k for k in ("gradvac", "pcgrad") if k in records]
    pairs = list(records[aggregating[0]][0][0]["cosines"]) if aggregating else []
    for p, pair in enumerate(pairs):
        color = _pair_color(p, len(pairs))
        for key in aggregating:
            runs = records[key]
            x = [r["step"] for r in runs[0]]
            label = pair if key == "gradvac" else None
            _band(
                ax_cos,
                x,
                _curves(runs, lambda r, pair=pair: r["cosines"][pair], window),
                color,
                STYLES[key],
                label=label,
            )
        if "gradvac" in records:
            runs = records["gradvac"]
            x = [r["step"] for r in runs[0]]
            _band(ax_tgt, x, _curves(runs, lambda r, pair=pair: r["targets"][pair], 1), color, "-", label=pair)
    for ax in (ax_cos, ax_tgt):
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xlabel("step")
        if pairs:
            ax.legend(fontsize=7, ncol=2 if len(pairs) > 6 else 1)
    ax_cos.set(
        title=f"Cosine of task gradients on the trunk, per pair\n({window}-step avg.; GradVac solid, PCGrad dotted; {spread})",
        ylabel="cosine (GradVac's visiting cosine)",
    )
    ax_tgt.set(title=f"GradVac: EMA target per pair (beta={cfg['beta']}; PCGrad's stay 0)", ylabel="target")

    if per_layer:
        for ax, key in zip(axes[2], ("gradvac", "pcgrad")):
            if key in records:
                _per_layer(ax, records[key], methods[key]["label"], window, spread)

    fig.suptitle(
        f"sum vs PCGrad vs GradVac: {len(tasks)} tasks, {cfg['world_size']} process(es) ({cfg['backend']}), "
        f"{steps} steps, seeds {seeds}, grouping={cfg['grouping']}.  Wall time per step: "
        + ", ".join(f"{m['label']} {m['ms_per_step']:.1f} ms" for m in methods.values()),
        fontsize=11,
    )
    fig.savefig(path, dpi=100)


def _per_layer(ax, runs: list[list[dict]], label: str, window: int, spread: str) -> None:
    """The per-layer view of the GradVac paper: the cosine of the task gradients in each block over training."""
    first = runs[0][0]["block_cosines"]
    blocks, pairs = list(first), list(next(iter(first.values())))
    x = [r["step"] for r in runs[0]]
    handles = []
    for b, block in enumerate(blocks):
        style = BLOCK_STYLES[b % len(BLOCK_STYLES)]
        width = 1.6 if b < len(BLOCK_STYLES) else 0.8
        if len(pairs) <= MAX_PAIRS_PER_LAYER:
            for p, pair in enumerate(pairs):
                curves = _curves(runs, lambda r, block=block, pair=pair: r["block_cosines"][block][pair], window)
                _band(ax, x, curves, _pair_color(p, len(pairs)), style, lw=width)
        else:
            curves = _curves(runs, lambda r, block=block: np.mean(list(r["block_cosines"][block].values())), window)
            _band(ax, x, curves, f"C{b % 10}", style, lw=width)
        handles.append((block, style))
    from matplotlib.lines import Line2D

    legend = [Line2D([], [], color="k", ls=s, label=name) for name, s in handles]
    what = "style: layer, colour: pair" if len(pairs) <= MAX_PAIRS_PER_LAYER else "mean over the pairs"
    if len(pairs) <= MAX_PAIRS_PER_LAYER:
        legend += [Line2D([], [], color=_pair_color(p, len(pairs)), lw=2, label=pair) for p, pair in enumerate(pairs)]
    ax.axhline(0.0, color="k", lw=0.6)
    ax.legend(handles=legend, fontsize=7, ncol=2)
    ax.set(
        title=f"{label}: cosine of task gradients per layer\n({what}; {window}-step avg.; {spread.split(',')[0]})",
        xlabel="step",
        ylabel="cosine (visiting cosine, per block)",
    )
