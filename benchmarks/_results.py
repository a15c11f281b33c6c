"""What a report runs and what it is written from: the plan, the results, and the views of them
that both the tables (``report.py``) and the figures (``_plots.py``) read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from . import core, ddp, fsdp
from ._timing import Table

__all__ = ["DDP_SHORT", "Plan", "Results", "Size", "plan", "sweep_rows"]

DDP_SHORT = {
    "a": "(a) m-pass DDP",
    "b": "(b) DDP summed loss",
    "c": "(c) naive all-gather GradVac",
    "d": "(d) GradVac-DDP replicated",
    "e": "(e) GradVac-DDP sharded",
    "f": "(f) UPGrad-DDP sharded",
}


@dataclass(frozen=True)
class Size:
    """An MLP of :class:`benchmarks.ddp.MultiTaskMLP` (n depends a little on m: one head per task)."""

    in_dim: int
    hidden: int
    head_hidden: int


@dataclass(frozen=True)
class Plan:
    """What one report runs.

    Attributes:
        quick: smoke sizes.
        center: the DDP configuration every sweep passes through (m=3, the largest model, W=2),
            run with the DDP benchmark's own step counts: the headline table.
        sweep: the settings of the other DDP points (fewer steps).
        ms, sizes, worlds: the sweeps (each varies one of m, n, W around the center).
        fsdp_main: the timed FSDP2 configuration; fsdp_ms, fsdp_worlds: its memory-only sweeps.
    """

    quick: bool
    center: ddp.Config
    sweep: ddp.Config
    ms: tuple[int, ...]
    sizes: tuple[Size, ...]
    worlds: tuple[int, ...]
    fsdp_main: fsdp.Config
    fsdp_ms: tuple[int, ...]
    fsdp_worlds: tuple[int, ...]

    def ddp_configs(self) -> list[tuple[str, ddp.Config]]:
        """(sweep name, configuration): the center first, then each sweep's other points."""
        big = self.sizes[-1]
        out = [("center", self.center)]
        out += [("m", replace(self.sweep, m=m)) for m in self.ms if m != self.center.m]
        out += [
            ("n", replace(self.sweep, in_dim=s.in_dim, hidden=s.hidden, head_hidden=s.head_hidden))
            for s in self.sizes
            if s != big
        ]
        out += [("W", replace(self.sweep, world=w)) for w in self.worlds if w != self.center.world]
        return out

    def fsdp_configs(self) -> list[tuple[str, fsdp.Config]]:
        """(sweep name, configuration): the timed one first, then memory-only points."""
        main = self.fsdp_main
        out = [("center", main)]
        out += [("m", replace(main, m=m, timed=False)) for m in self.fsdp_ms if m != main.m]
        out += [("W", replace(main, world=w, timed=False)) for w in self.fsdp_worlds if w != main.world]
        return out


def plan(quick: bool = False) -> Plan:
    """The full report (about five minutes on 2 cores) or the ``--quick`` smoke run (under a minute)."""
    if quick:
        sizes = (Size(64, 128, 32), Size(128, 256, 64))
        big = sizes[-1]
        center = ddp.Config(
            in_dim=big.in_dim,
            hidden=big.hidden,
            head_hidden=big.head_hidden,
            check_steps=1,
            warmup=1,
            steps=4,
            traffic_steps=1,
            memory_steps=1,
        )
        fsdp_main = fsdp.Config(hidden=128, depth=2, batch=16, steps=4, warmup=1)
        return Plan(True, center, center, (2, 3), sizes, (1, 2), fsdp_main, (2, 3), (2,))
    sizes = (Size(256, 320, 96), Size(512, 576, 192), Size(512, 1024, 192))  # 0.34M, 1.22M, 2.40M at m=3
    center = ddp.Config(memory_steps=2)  # the DDP benchmark's defaults: m=3, 2.40M parameters, W=2, 20 steps
    sweep = replace(center, check_steps=1, warmup=1, steps=16, traffic_steps=2)
    return Plan(False, center, sweep, (2, 3, 4, 6), sizes, (1, 2, 3), fsdp.Config(), (2, 3, 4, 6), (1, 2, 3))


@dataclass
class Results:
    """Everything a report is written from."""

    plan: Plan
    machine: str  # the machine line, taken while the core benchmark's threads are set
    load_before: str
    load_after: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each part
    core: list[core.CaseResult] = field(default_factory=list)
    ddp_center_table: Table | None = None
    ddp: list[tuple[str, ddp.Summary]] = field(default_factory=list)
    fsdp: list[tuple[str, fsdp.Summary]] = field(default_factory=list)
    fsdp_text: str = ""
    threads: int = 1


def sweep_rows(results: Results, sweep: str) -> list[ddp.Summary]:
    """The DDP points of one sweep ("m", "n" or "W"), the center included, sorted by the swept quantity."""
    rows = [s for name, s in results.ddp if name in (sweep, "center")]
    key: dict[str, Callable[[ddp.Summary], float]] = {"m": lambda s: s.m, "n": lambda s: s.n, "W": lambda s: s.world}
    return sorted(rows, key=key[sweep])
