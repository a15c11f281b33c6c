"""The benchmark report: every benchmark (core, DDP, FSDP) and sweeps over m, n and W, in one command.

    python -m benchmarks report [--quick] [--out DIR]      (default DIR: runs/bench)

Writes ``DIR/report.md`` (the machine, the command, markdown tables), ``DIR/results.json`` (every
number behind it) and PNG plots next to them:

- ``ddp_time.png``: time per step of GradVac-DDP (replicated, sharded) and the DDP issue's baselines
  ((a) m-pass DDP without GradVac, (b) plain DDP on the summed loss, (c) naive all-gather GradVac)
  against the number of tasks m, parameters n and world size W, and each one's ratio to (a);
- ``ddp_bytes.png``: bytes each rank sends per step, counted and measured, against m, n and W;
- ``memory.png``: GradVac's per-rank stash (DDP replicated and sharded, FSDP) against the formulas
  ``m n`` and ``m n / W``, and the peak resident set each variant adds;
- ``core.png``: the single-process core benchmark; ``fsdp.png``: the FSDP2 benchmark.

Runs reuse the benchmarks' own functions (:func:`benchmarks.core.run`,
:func:`benchmarks.ddp.run`, :func:`benchmarks.fsdp.run`): one group of spawned
gloo ranks per world size runs all of that size's configurations one after the other. The full
run takes about five minutes on 2 cores (301 s on 2026-12-04); ``--quick`` (small sizes, few
steps) under a minute, for smoke tests: its numbers say nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from . import core, ddp, fsdp
from ._results import DDP_SHORT, Plan, Results, plan, sweep_rows
from ._timing import Table, machine_line

__all__ = ["Plan", "Results", "collect", "main", "plan", "write_report"]

MB = 1e6
DDP_KEYS = ddp.VARIANTS  # a..f


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _run_ddp(p: Plan) -> tuple[list[tuple[str, ddp.Summary]], Table]:
    """The DDP configurations, one spawned group per world size; the center's table as the DDP benchmark prints it."""
    configs = p.ddp_configs()
    cfgs = [c for _, c in configs]
    results, seconds = ddp._launch_many(cfgs)
    world = cfgs[0].world
    report, _ = ddp._report(cfgs[0], results[0], seconds[world])
    table = report.tables[0]
    count = sum(c.world == world for c in cfgs)
    table.notes[-1] = f"wall time of the {count} configurations with W={world}: {seconds[world]:.1f} s"
    return [(name, ddp.summarize(c, r)) for (name, c), r in zip(configs, results)], table


def _run_fsdp(p: Plan) -> tuple[list[tuple[str, fsdp.Summary]], str]:
    configs = p.fsdp_configs()
    cfgs = [c for _, c in configs]
    results, _ = fsdp._spawn_many(cfgs)
    text, _ = fsdp.report(cfgs[0], results[0], "cpu/gloo")
    return [(name, fsdp.summarize(c, r)) for (name, c), r in zip(configs, results)], text


def collect(quick: bool = False, progress: Callable[[str], None] | None = None, threads: int = 1) -> Results:
    """Runs every benchmark of the plan; returns the numbers.

    Args:
        quick: smoke sizes.
        progress: called with a line before each part, or None.
        threads: torch intra-op threads of the core benchmark (in this process; the spawned DDP
            ranks use 1 each, the FSDP ranks cores / W).
    """
    say = progress or (lambda _line: None)
    p = plan(quick)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        res = Results(p, machine_line(), _load(), threads=threads)
        start = time.perf_counter()
        say(f"report: core benchmark, {threads} thread(s) ...")
        res.core = core.measure(quick=quick, progress=say)
        res.seconds["core"] = time.perf_counter() - start
    finally:
        torch.set_num_threads(saved)
    start = time.perf_counter()
    say(f"report: DDP, {len(p.ddp_configs())} configurations (m, n, W sweeps), one spawned group per W ...")
    res.ddp, res.ddp_center_table = _run_ddp(p)
    res.seconds["ddp"] = time.perf_counter() - start
    start = time.perf_counter()
    say(f"report: FSDP2, {len(p.fsdp_configs())} configurations (1 timed, memory sweeps) ...")
    res.fsdp, res.fsdp_text = _run_fsdp(p)
    res.seconds["fsdp"] = time.perf_counter() - start
    res.load_after = _load()
    return res


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _mb(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    value = nbytes / MB
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _n(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.0f}k"


def _time_table(results: Results) -> Table:
    table = Table(
        "DDP sweeps: time per step, ms (median over the timed steps of the slowest rank), and ratio to (a)",
        ["sweep", "m", "n", "W", *(DDP_SHORT[k] for k in DDP_KEYS), "(d)/(a)", "(e)/(a)", "(c)/(a)"],
    )
    for sweep in ("m", "n", "W"):
        for s in sweep_rows(results, sweep):
            table.add_row(
                [
                    sweep,
                    str(s.m),
                    _n(s.n),
                    str(s.world),
                    *(_ms(s.median_ms.get(k)) for k in DDP_KEYS),
                    *(_x(s.paired.get(k)) for k in ("d", "e", "c")),
                ]
            )
    table.notes += [
        "ratios are paired: the median over rounds of the step time divided by (a)'s step of the same round "
        f"(the center row: {results.plan.center.steps} timed steps per variant; other rows: "
        f"{results.plan.sweep.steps}); DDP goal: GradVac-DDP <= {ddp.MAX_RATIO_TO_M_PASS}x (a) ({ddp.MAX_RATIO_TO_M_PASS_ONE_RANK}x at W=1)",
        "each row is one run; the center (m=3, largest n, W=2) appears in every sweep",
    ]
    return table


def _bytes_table(results: Results) -> Table:
    table = Table(
        "DDP sweeps: MB sent per rank per step, counted (payload of every collective turned into ring-algorithm "
        "bytes, = the documented formula) / measured (bytes each rank's process wrote to its sockets)",
        ["sweep", "m", "n", "W", *(DDP_SHORT[k] for k in DDP_KEYS)],
    )
    for sweep in ("m", "n", "W"):
        for s in sweep_rows(results, sweep):
            cells = []
            for k in DDP_KEYS:
                counted, measured = s.ring_bytes.get(k), s.rank_bytes.get(k)
                cells.append(f"{_mb(counted)} / {_mb(measured)}")
            table.add_row([sweep, str(s.m), _n(s.n), str(s.world), *cells])
    diffs = [v for _, s in results.ddp for v in s.diff.values()]
    corrections = sum(v for _, s in results.ddp for v in s.corrections.values())
    table.notes += [
        "counted == the documented formula in every cell (up to (e)'s shard padding; checked by "
        "tests/benchmarks/test_bench_ddp.py); measured adds gloo's own headers and whatever its algorithms send "
        "beyond a ring",
        "W=1 sends nothing (every collective is local)",
    ]
    if diffs:
        table.notes.append(
            f"correctness, every configuration: GradVac-DDP's .grad vs the naive GradVac's on the first steps, "
            f"max rel diff {max(diffs):.1e} (float32), {corrections} GradVac corrections applied in those steps"
        )
    return table


def _memory_table(results: Results) -> Table:
    table = Table(
        "Memory per rank, DDP: GradVac's stash vs the formulas, and the peak resident set each variant adds (MB)",
        [
            "m",
            "n",
            "W",
            "stash (d) replicated",
            "m*n",
            "stash (e) sharded",
            "m*n/W",
            "(e) / (m*n/W)",
            "(e) all-gather scratch",
            "naive buffers (c)",
            *(f"RSS +{k}" for k in DDP_KEYS),
        ],
    )
    seen = set()
    for _, s in results.ddp:
        if (s.m, s.n, s.world) in seen or not s.stash_bytes:
            continue
        seen.add((s.m, s.n, s.world))
        formula = 4 * s.m * s.n  # float32
        table.add_row(
            [
                str(s.m),
                _n(s.n),
                str(s.world),
                _mb(s.stash_bytes.get("d")),
                _mb(formula),
                _mb(s.stash_bytes.get("e")),
                _mb(formula / s.world),
                f"{s.stash_bytes['e'] / (formula / s.world):.3f}" if "e" in s.stash_bytes else "-",
                _mb(s.scratch_bytes.get("e")),
                _mb(s.stash_bytes.get("c")),
                *(_mb(s.rss_peak[k] - s.rss_base[k]) if k in s.rss_peak and k in s.rss_base else "-" for k in DDP_KEYS),
            ]
        )
    steps = results.plan.center.memory_steps
    table.notes += [
        "stash = the per-task gradients GradVac keeps (float32); naive buffers (c) = the gathered [W, m, n] plus the "
        "local [m, n]; the sharded strategy also keeps a bucket-sized all-gather buffer (n/W per rank, padded, x W)",
        f"RSS +x = peak resident set (VmHWM) while variant x alone is built and stepped {steps} time(s), minus the "
        "resident set just before it (probed lightest first, peak reset and malloc trimmed between variants; "
        "includes the model, .grad, DDP's buckets); maximum over ranks",
    ]
    return table


def _fsdp_memory_table(results: Results) -> Table:
    table = Table(
        "Memory per rank, FSDP2: GradVac-FSDP's stash vs m*n/W, and peak RSS without / with GradVac (MB)",
        ["m", "n", "W", "stash", "m*n/W", "stash / (m*n/W)", "peak RSS (a)", "peak RSS (d)", "(d) - (a)"],
    )
    for _, s in sorted(results.fsdp, key=lambda item: (item[1].world, item[1].m)):
        table.add_row(
            [
                str(s.m),
                _n(s.n),
                str(s.world),
                _mb(s.stash_bytes),
                _mb(s.formula_bytes),
                f"{s.stash_bytes / s.formula_bytes:.3f}",
                _mb(s.peak_a),
                _mb(s.peak_d),
                _mb(s.peak_d - s.peak_a),
            ]
        )
    table.notes.append(
        "stash = m x this rank's padded shard; peak RSS (a): after 3 steps of m-pass FSDP on a fresh model, "
        "(d): after 3 more with GradVac registered on it (the same process; peak reset at the start of each "
        "configuration); maximum over ranks"
    )
    return table


def _fsdp_table(results: Results) -> Table:
    main = next(s for name, s in results.fsdp if name == "center")
    table = Table(
        f"FSDP2 (fully_shard per block and root), {main.world} gloo ranks, m={main.m}, n={_n(main.n)}: time per step",
        ["variant", "median ms", "vs (a)", "all-gathers", "reduce-scatters", "all-reduces"],
    )
    base = main.median_ms["a"]
    for k, label in fsdp.LABELS.items():
        calls = main.calls.get(k, {})
        table.add_row(
            [
                label,
                _ms(main.median_ms[k]),
                _x(main.median_ms[k] / base),
                *(f"{calls.get(kind, 0):g}" for kind in fsdp.KINDS),
            ]
        )
    verdict = "PASS" if main.ratio is not None and main.ratio <= fsdp.MAX_RATIO_TO_M_PASS else "FAIL"
    table.notes.append(
        f"{verdict}: GradVac-FSDP / m-pass FSDP = {_x(main.ratio)} (paired {_x(main.paired)}), goal <= {fsdp.MAX_RATIO_TO_M_PASS}x; "
        f"collectives counted per step on rank 0"
    )
    return table


def _command(p: Plan, out: Path, threads: int) -> str:
    return (
        f"python -m benchmarks report{' --quick' if p.quick else ''}"
        f"{f' --threads {threads}' if threads != 1 else ''} --out {out}"
    )


def write_markdown(results: Results, out: Path, plots: Sequence[tuple[str, str]], plot_note: str = "") -> Path:
    """Writes ``out/report.md``; ``plots``: (file name, caption) of the PNGs written next to it."""
    p = results.plan
    total = sum(results.seconds.values())
    worlds = sorted({s.world for _, s in results.ddp} | {s.world for _, s in results.fsdp})
    cores = os.cpu_count() or 0
    lines = [
        "# gradvac_dist benchmark report" + (" (--quick: smoke sizes, the numbers say nothing)" if p.quick else ""),
        "",
        f"- Machine: `{results.machine}`",
        f"- Backend: gloo over 127.0.0.1 (CPU, torch {torch.__version__}); the core benchmark runs in one process "
        "with the intra-op threads of the machine line, DDP ranks with 1 thread each, FSDP ranks with "
        f"max(1, cores / W). Load average (1, 5, 15 min) at the start {results.load_before}, "
        f"at the end {results.load_after}: the machine is shared, so every time is a median and ratios are paired.",
        f"- World sizes W = {', '.join(map(str, worlds))}: all ranks are processes on these {cores} cores, so W > "
        f"{cores} oversubscribes them (times there measure CPU contention as much as communication) and W=1 "
        "communicates nothing. Bytes and memory do not depend on the load.",
        f"- Reproduce: `{_command(p, out, results.threads)}` (wall time {total:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in results.seconds.items())
        + ").",
        "",
        "## GradVac-DDP vs DDP (the center configuration of every sweep)",
        "",
    ]
    assert results.ddp_center_table is not None
    lines += [results.ddp_center_table.to_markdown(), ""]
    for name, caption in plots[:2]:
        lines += [f"![{caption}]({name})", ""]
    lines += ["## Sweeps over m, n and W", "", _time_table(results).to_markdown(), ""]
    lines += [_bytes_table(results).to_markdown(), ""]
    lines += ["## Memory per rank", "", _memory_table(results).to_markdown(), ""]
    lines += [_fsdp_memory_table(results).to_markdown(), ""]
    for name, caption in plots[2:3]:
        lines += [f"![{caption}]({name})", ""]
    lines += ["## FSDP2", "", _fsdp_table(results).to_markdown(), ""]
    lines += ["```text", results.fsdp_text, "```", ""]
    for name, caption in plots[3:4]:
        lines += [f"![{caption}]({name})", ""]
    lines += ["## Core (single process)", ""]
    repeats, warmup = core.timing_of(p.quick)
    core_report = core.build_report(results.core, repeats=repeats, warmup=warmup, quick=p.quick)
    lines += [t.to_markdown() + "\n" for t in core_report.tables]
    for name, caption in plots[4:]:
        lines += [f"![{caption}]({name})", ""]
    if plot_note:
        lines += [plot_note, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def write_report(results: Results, out: Path) -> list[Path]:
    """Writes the PNG plots and ``report.md`` into ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots: list[tuple[str, str]] = []
    note = ""
    try:
        from . import _plots
    except ImportError as exc:  # matplotlib is an optional dependency (the demo extra)
        note = f"(no plots: {exc}; install matplotlib, e.g. `pip install -e .[demo]`)"
    else:
        for name, caption, draw in _plots.FIGURES:
            path = out / name
            draw(results, path)
            written.append(path)
            plots.append((name, caption))
    written.append(write_markdown(results, out, plots, note))
    data = out / "results.json"
    data.write_text(json.dumps(asdict(results), indent=1, default=str) + "\n")
    written.append(data)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks report``: runs everything, writes the report; returns 0."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="smoke sizes, under a minute; the numbers say nothing")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch intra-op threads of the core benchmark (default 1: steadier on a shared machine)",
    )
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    start = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {line}", file=sys.stderr, flush=True)

    results = collect(quick=args.quick, progress=progress, threads=args.threads)
    progress("report: writing plots and report.md ...")
    paths = write_report(results, args.out)
    for path in paths:
        print(path)
    progress(f"report: done in {time.perf_counter() - start:.0f} s")
    return 0
