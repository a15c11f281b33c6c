"""Shared helpers of the benchmarks: median timing, the machine line, plain-text and markdown tables.

The machines these benchmarks run on are often shared and noisy, so every number reported is a
median over several repeats after warm-up calls, and the spread (min..max) is kept alongside.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "Report",
    "Table",
    "Timing",
    "fmt_ms",
    "fmt_ratio",
    "machine_line",
    "pass_fail",
    "release_and_reset_peak",
    "rss_bytes",
    "time_interleaved",
    "time_ms",
]


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated calls, in milliseconds.

    Attributes:
        median_ms: the median over the repeats (the number to quote).
        min_ms: the fastest repeat.
        max_ms: the slowest repeat.
        repeats: how many timed calls the statistics are over.
    """

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def scaled(self, factor: float) -> Timing:
        """The same timing multiplied by ``factor`` (to extrapolate from a measured fraction of the work)."""
        return Timing(self.median_ms * factor, self.min_ms * factor, self.max_ms * factor, self.repeats)


def time_ms(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Times ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Args:
        fn: the work to time; its result is discarded.
        repeats: number of timed calls (at least 1).
        warmup: number of untimed calls first (allocator, caches, lazy initialisation).
        sync: called after each ``fn()`` and before the clock is read (e.g. ``torch.cuda.synchronize``
            for asynchronous devices); ``None`` on CPU.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Times several functions in interleaved rounds: each round calls every function once.

    On a shared machine the load drifts over seconds; interleaving exposes all contenders to the
    same drift, so their ratios stay meaningful. Arguments as in :func:`time_ms`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(statistics.median(t), min(t), max(t), repeats) for name, t in times.items()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line describing where the numbers come from: cores, CPU, torch version, threads, load."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"machine: {cores} cores ({usable} usable), {_cpu_model()}{gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads; python {platform.python_version()}; load avg {load}"
    )


def rss_bytes(peak: bool = False) -> float | None:
    """This process's resident set in bytes (``peak``: its high-water mark, ``VmHWM``), or None off Linux."""
    name = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(name):
                    return float(line.split()[1]) * 1024.0
    except (OSError, IndexError, ValueError):
        pass
    return None


def release_and_reset_peak() -> None:
    """Frees what can be freed (reference cycles, malloc's unused heap) and restarts the peak RSS from now.

    Writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS (Linux >= 4.0); where
    that is refused the peak stays the process's peak so far, so measure the lightest setup first.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def fmt_ms(timing: Timing | None) -> str:
    """A median in milliseconds with a precision that suits its size; ``-`` when absent."""
    if timing is None:
        return "-"
    value = timing.median_ms
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(value: float | None) -> str:
    """A ratio such as a speed-up, ``12.3x``; ``-`` when absent."""
    if value is None:
        return "-"
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def pass_fail(ok: bool) -> str:
    """The verdict of a goal."""
    return "PASS" if ok else "FAIL"


@dataclass
class Table:
    """A table of strings, printed aligned as text or as markdown.

    Attributes:
        title: printed above the table.
        columns: the header.
        rows: the cells, one list per row (as many cells as columns).
        notes: lines printed under the table.
    """

    title: str
    columns: Sequence[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_row(self, cells: Sequence[str]) -> None:
        """Appends a row; it must have one cell per column."""
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of table {self.title!r} needs {len(self.columns)} cells, got {len(cells)}.")
        self.rows.append([str(c) for c in cells])

    def to_text(self) -> str:
        """Aligned plain text: the first column left-aligned, the others right-aligned."""
        widths = [max(len(r[c]) for r in [list(self.columns), *self.rows]) for c in range(len(self.columns))]

        def line(cells: Sequence[str]) -> str:
            parts = [cells[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:])]
            return "  ".join(parts).rstrip()

        rule = "  ".join("-" * w for w in widths)
        out = [self.title, line(self.columns), rule, *(line(r) for r in self.rows)]
        out += [f"  {note}" for note in self.notes]
        return "\n".join(out)

    def to_markdown(self) -> str:
        """A GitHub-flavoured markdown table under a bold title, notes as a list."""
        out = [f"**{self.title}**", ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "|".join([":---"] + ["---:"] * (len(self.columns) - 1)) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {note}" for note in self.notes]
        return "\n".join(out)


@dataclass
class Report:
    """What one benchmark run prints: a header line (the machine) and tables."""

    header: str
    tables: list[Table] = field(default_factory=list)

    def to_text(self) -> str:
        """The report as aligned plain text."""
        return "\n\n".join([self.header, *(t.to_text() for t in self.tables)])

    def to_markdown(self) -> str:
        """The report as markdown."""
        return "\n\n".join([f"`{self.header}`", *(t.to_markdown() for t in self.tables)]) + "\n"
