"""The report's PNG figures (matplotlib, Agg canvas: no display, no pyplot state).

Each ``draw_*`` takes the :class:`~benchmarks._results.Results` of a run and a path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from . import ddp, fsdp
from ._results import DDP_SHORT, Results, sweep_rows

__all__ = ["FIGURES"]

MB = 1e6
DPI = 110
STYLE = {  # DDP variants: colour, marker, line style
    "a": ("0.35", "s", "-"),
    "b": ("0.65", "v", "--"),
    "c": ("tab:red", "^", "-."),
    "d": ("tab:blue", "o", "-"),
    "e": ("tab:green", "D", "-"),
    "f": ("tab:orange", "P", ":"),
}
FSDP_COLOR = "tab:purple"
SWEEPS = (("m", "number of tasks m"), ("n", "parameters n"), ("W", "world size W (gloo ranks)"))


def _figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Figure, Any]:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _fmt_n(n: float) -> str:
    return f"{n / 1e6:.2g}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _x_of(sweep: str, s: Any) -> float:
    return {"m": s.m, "n": s.n, "W": s.world}[sweep]


def _sweep_axis(ax: Any, sweep: str, xs: Sequence[float], label: str) -> None:
    if sweep == "n":
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_fmt_n(x) if sweep == "n" else f"{x:g}" for x in xs])
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def _fixed(s: Any, sweep: str) -> str:
    """What the other two quantities are held at, for a panel's title."""
    parts = {"m": f"m={s.m}", "n": f"n={_fmt_n(s.n)}", "W": f"W={s.world}"}
    return ", ".join(v for k, v in parts.items() if k != sweep)


def _center(results: Results) -> Any:
    return next(s for name, s in results.ddp if name == "center")


def _mb_axis(ax: Any) -> None:
    """Plain numbers on a log axis (10, 20, 0.5), not 2x10^1."""
    import math

    def minor(v: float, _pos: int) -> str:
        low, high = ax.get_ylim()
        decades = math.log10(high / low) if low > 0 and high > 0 else 99.0
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9)) if v > 0 else 0
        return f"{v:g}" if decades < 1.2 or (decades < 2.5 and mantissa in (2, 5)) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _legend_below(
    fig: Figure, ax: Any, first: Sequence[tuple[Any, str]] = (), last: Sequence[tuple[Any, str]] = ()
) -> None:
    """One legend under the panels: ``first``, then ``ax``'s entries, then ``last``."""
    handles, labels = ax.get_legend_handles_labels()
    handles = [h for h, _ in first] + handles + [h for h, _ in last]
    labels = [label for _, label in first] + labels + [label for _, label in last]
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=9)


def _oversubscribed(ax: Any, xs: Sequence[float]) -> None:
    """Shades the world sizes above the machine's cores (and says so under the axis)."""
    cores = os.cpu_count() or 1
    ax.set_xlim(min(xs) - 0.3, max(xs) + 0.3)
    if max(xs) > cores:
        ax.axvspan(cores + 0.5, max(xs) + 0.3, color="orange", alpha=0.12, lw=0)
        ax.set_xlabel(f"world size W (gloo ranks; shaded: W > {cores} cores, oversubscribed)")


def draw_ddp_time(results: Results, path: Path) -> None:

    fig, axes = _figure(2, 3, (15, 9.4))
    center = _center(results)
    for col, (sweep, label) in enumerate(SWEEPS):
        rows = sweep_rows(results, sweep)
        xs = [_x_of(sweep, s) for s in rows]
        top, bottom = axes[0][col], axes[1][col]
        for k in ddp.VARIANTS:
            color, marker, ls = STYLE[k]
            top.plot(xs, [s.median_ms[k] for s in rows], ls=ls, marker=marker, color=color, label=DDP_SHORT[k])
            if k != "a":
                bottom.plot(xs, [s.paired[k] for s in rows], ls=ls, marker=marker, color=color, label=DDP_SHORT[k])
        top.set_yscale("log")
        _mb_axis(top)
        top.set(title=f"Time per step vs {sweep} ({_fixed(center, sweep)})", ylabel="ms per step (log)")
        bottom.axhline(1.0, color=STYLE["a"][0], lw=1.2, label="(a) m-pass DDP = 1")
        bottom.axhline(
            ddp.MAX_RATIO_TO_M_PASS,
            color="k",
            lw=0.9,
            ls=":",
            label=f"goal for (d), (e): {ddp.MAX_RATIO_TO_M_PASS}x ({ddp.MAX_RATIO_TO_M_PASS_ONE_RANK}x at W=1)",
        )
        bottom.set(title=f"Step time / (a)'s, paired by round, vs {sweep}", ylabel="ratio to (a)")
        for ax in (top, bottom):
            _sweep_axis(ax, sweep, xs, label)
        if sweep == "W":
            for ax in (top, bottom):
                _oversubscribed(ax, xs)
    _legend_below(fig, axes[1][0], first=[(axes[0][0].get_lines()[0], DDP_SHORT["a"])])
    fig.suptitle(
        "GradVac-DDP vs DDP baselines, gloo on 127.0.0.1 (CPU): median over the timed steps of the slowest rank",
        fontsize=12,
    )
    fig.savefig(path, dpi=DPI)


def draw_ddp_bytes(results: Results, path: Path) -> None:

    fig, axes = _figure(1, 3, (15, 5.4))
    center = _center(results)
    for col, (sweep, label) in enumerate(SWEEPS):
        ax = axes[0][col]
        rows = sweep_rows(results, sweep)
        xs = [_x_of(sweep, s) for s in rows]
        for k in ddp.VARIANTS:
            color, marker, ls = STYLE[k]
            pts = [(x, s.ring_bytes[k] / MB) for x, s in zip(xs, rows) if s.ring_bytes.get(k)]
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker=marker, color=color, label=f"{DDP_SHORT[k]}")
            meas = [(x, s.rank_bytes[k] / MB) for x, s in zip(xs, rows) if s.rank_bytes.get(k)]
            if meas:
                ax.plot(*zip(*meas), ls="none", marker=marker, mfc="none", ms=11, color=color)
        ax.set_yscale("log")
        _mb_axis(ax)
        _sweep_axis(ax, sweep, xs, label)
        if sweep == "W":  # bytes do not depend on the load: no oversubscription shading
            ax.set_xlim(min(xs) - 0.3, max(xs) + 0.3)
            if min(xs) == 1:
                ax.text(1, 0.5, "W=1:\nnothing sent", transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
        ax.set(title=f"MB sent per rank per step vs {sweep} ({_fixed(center, sweep)})", ylabel="MB (log)")
    from matplotlib.lines import Line2D

    measured = Line2D([], [], ls="none", marker="o", mfc="none", ms=11, color="k")
    _legend_below(fig, axes[0][0], last=[(measured, "measured: bytes each rank wrote to its sockets")])
    fig.suptitle(
        "Bytes sent per rank per step: lines = counted payload as ring-algorithm bytes (= the documented formula), "
        "hollow markers = measured; (a), (c), (d) coincide at W=2",
        fontsize=11,
    )
    fig.savefig(path, dpi=DPI)


def draw_memory(results: Results, path: Path) -> None:

    fig, axes = _figure(1, 3, (17, 5.2))
    center = _center(results)
    fsdp_center = next(s for name, s in results.fsdp if name == "center")
    for col, sweep in enumerate(("W", "m")):
        ax = axes[0][col]
        rows = [s for s in sweep_rows(results, sweep) if s.stash_bytes]
        xs = [_x_of(sweep, s) for s in rows]
        for k, label in (("d", "DDP replicated stash"), ("e", "DDP sharded stash")):
            color, marker, _ = STYLE[k]
            ax.plot(xs, [s.stash_bytes[k] / MB for s in rows], marker=marker, color=color, ms=8, lw=0, label=label)
        ax.plot(xs, [4 * s.m * s.n / MB for s in rows], color=STYLE["d"][0], ls="--", lw=1.2, label="m*n (DDP)")
        ax.plot(
            xs, [4 * s.m * s.n / s.world / MB for s in rows], color=STYLE["e"][0], ls="--", lw=1.2, label="m*n/W (DDP)"
        )
        if sweep == "W":
            frows = sorted((s for _, s in results.fsdp if s.m == fsdp_center.m), key=lambda s: s.world)
            fxs = [s.world for s in frows]
        else:
            frows = sorted((s for _, s in results.fsdp if s.world == fsdp_center.world), key=lambda s: s.m)
            fxs = [s.m for s in frows]
        ax.plot(fxs, [s.stash_bytes / MB for s in frows], marker="P", ms=9, lw=0, color=FSDP_COLOR, label="FSDP2 stash")
        ax.plot(
            fxs, [s.formula_bytes / MB for s in frows], color=FSDP_COLOR, ls=":", lw=1.2, label="m*n/W (FSDP2 model)"
        )
        allx = sorted(set(xs) | set(fxs))
        _sweep_axis(ax, sweep, allx, "world size W" if sweep == "W" else "number of tasks m")
        ax.set_ylim(bottom=0)
        fixed = f"m={center.m}" if sweep == "W" else f"W={center.world}"
        ax.set(
            title=f"GradVac stash per rank vs {sweep} ({fixed}; DDP n={_fmt_n(center.n)}, FSDP n={_fmt_n(fsdp_center.n)})",
            ylabel="MB per rank (float32)",
        )
        ax.title.set_fontsize(10)
        ax.legend(fontsize=8)

    ax = axes[0][2]
    names, incs, stash, colors = [], [], [], []
    for k in ddp.VARIANTS:
        if k in center.rss_peak and k in center.rss_base:
            names.append(f"DDP {DDP_SHORT[k]}")
            incs.append((center.rss_peak[k] - center.rss_base[k]) / MB)
            stash.append(center.stash_bytes.get(k, 0) / MB)
            colors.append(STYLE[k][0])
    names.append(
        f"FSDP2: GradVac over m-pass FSDP\n(m={fsdp_center.m}, n={_fmt_n(fsdp_center.n)}, W={fsdp_center.world})"
    )
    incs.append((fsdp_center.peak_d - fsdp_center.peak_a) / MB)
    stash.append(fsdp_center.stash_bytes / MB)
    colors.append(FSDP_COLOR)
    pos = list(range(len(names)))
    bars = ax.barh(pos, incs, color=colors, alpha=0.85, label="peak RSS increase")
    ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.scatter(stash, pos, marker="|", s=400, color="k", zorder=3, label="its stash / naive buffers")
    ax.set_yticks(pos, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(incs), max(stash)) * 1.2)
    ax.set(
        title=f"Peak RSS each setup adds per rank (DDP: m={center.m}, n={_fmt_n(center.n)}, W={center.world})",
        xlabel="MB over the resident set before it (peak, max over ranks)",
    )
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Memory per rank: GradVac's stash against the m*n and m*n/W formulas, and resident set", fontsize=12)
    fig.savefig(path, dpi=DPI)


def draw_fsdp(results: Results, path: Path) -> None:
    fig, axes = _figure(1, 1, (8.5, 4.6))
    ax = axes[0][0]
    main = next(s for name, s in results.fsdp if name == "center")
    keys = list(fsdp.LABELS)
    values = [main.median_ms[k] for k in keys]
    colors = ["0.35", "0.65", "0.8", FSDP_COLOR]
    bars = ax.barh(range(len(keys)), values, color=colors)
    ax.bar_label(bars, labels=[f"{v:.1f} ms ({v / values[0]:.2f}x (a))" for v in values], fontsize=9, padding=3)
    ax.set_yticks(range(len(keys)), [fsdp.LABELS[k] for k in keys])
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.35)
    ax.set(
        xlabel="ms per step (median over the timed steps of the slowest rank)",
        title=f"FSDP2, {main.world} gloo ranks, m={main.m}, n={_fmt_n(main.n)}\nGradVac-FSDP / m-pass FSDP = "
        f"{main.ratio:.2f}x (paired {main.paired:.2f}x; goal <= {fsdp.MAX_RATIO_TO_M_PASS}x)",
    )
    ax.title.set_fontsize(10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, dpi=DPI)


def draw_core(results: Results, path: Path) -> None:
    fig, axes = _figure(1, 1, (10, 4.8))
    ax = axes[0][0]
    series: list[tuple[str, str, Callable[[Any], float | None]]] = [
        ("GradVac (gradvac_dist)", "tab:blue", lambda r: r.gradvac.median_ms),
        ("plain per-pair loop (LibMTL-style)", "tab:red", lambda r: r.loop.median_ms),
        ("TorchJD GradVac (K=1 only)", "tab:orange", lambda r: None if r.torchjd is None else r.torchjd.median_ms),
        ("plain summation (floor)", "0.6", lambda r: r.summation.median_ms),
    ]
    cases = results.core
    width = 0.8 / len(series)
    for j, (label, color, get) in enumerate(series):
        pos = [i + (j - (len(series) - 1) / 2) * width for i in range(len(cases))]
        vals = [get(r) for r in cases]
        pts = [(p, v) for p, v in zip(pos, vals) if v is not None]
        if pts:
            bars = ax.bar([p for p, _ in pts], [v for _, v in pts], width, color=color, label=label)
            ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for _, v in pts], fontsize=7, padding=1)
    ax.set_yscale("log")
    _mb_axis(ax)
    ax.set_xticks(
        range(len(cases)), [r.case.label + ("\n(loop extrapolated)" if r.case.loop_tasks else "") for r in cases]
    )
    ax.set(
        ylabel="ms per call (median, log)",
        title=f"Core, one process ({results.threads} thread(s)): aggregating an [m, n] float32 Jacobian in K blocks",
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=DPI)


FIGURES: list[tuple[str, str, Callable[[Results, Path], None]]] = [
    ("ddp_time.png", "time per step vs m, n, W", draw_ddp_time),
    ("ddp_bytes.png", "bytes sent per rank per step vs m, n, W", draw_ddp_bytes),
    ("memory.png", "memory per rank vs the formulas", draw_memory),
    ("fsdp.png", "FSDP2 time per step", draw_fsdp),
    ("core.png", "core benchmark", draw_core),
]
"""(file name, caption, drawing function), in the order report.md shows them."""
