"""Core benchmark: the single-process :class:`~gradvac_dist.GradVac` aggregator against its baselines.

For each case (``m`` tasks, ``K`` equal contiguous blocks, ``n`` columns, a float32 Jacobian from
``torch.randn`` with a fixed seed) it times, in one run:

- GradVac: ``GradVac()(jacobian, block_sizes)``, and its stages alone: the Gramians
  (:func:`~gradvac_dist._blocks.partial_gramians`), the coefficient stage
  (:func:`~gradvac_dist.gradvac_step` without its input checks and with a kept workspace, as the
  aggregator runs it: it builds the Gramians and orders itself and checks finiteness once) and
  :func:`~gradvac_dist._blocks.combine`;
- the plain per-pair loop: the vector form of the design notes written naively, as LibMTL does
  (:class:`PlainLoopGradVac`);
- plain summation of the task gradients, ``jacobian.sum(0)``: the floor;
- TorchJD's ``torchjd.aggregation.GradVac`` when it is installed (whole model, so ``K = 1`` only);

and checks the project's performance goals on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gradvac_dist import GradVac, draw_order, gradvac_step

# The aggregator's two other stages, timed alone: the library has no public name for them (GradVac
# runs them inside its call), so they are read from the private module, called, and never patched.
from gradvac_dist._blocks import combine, contiguous_segments, partial_gramians
from gradvac_dist._step import StepWorkspace

from ._timing import Report, Table, Timing, fmt_ms, fmt_ratio, machine_line, pass_fail, time_interleaved, time_ms

__all__ = [
    "FULL_CASES",
    "QUICK_CASES",
    "Case",
    "CaseResult",
    "Goal",
    "PlainLoopGradVac",
    "build_report",
    "measure",
    "run",
    "run_case",
    "timing_of",
]

SEED = 0

GoalKind = Literal["loop", "sum", "torchjd", "step_share"]


@dataclass(frozen=True)
class Goal:
    """A performance goal checked on one case.

    Attributes:
        kind: ``"loop"``: GradVac at least ``threshold`` times faster than the plain loop;
            ``"sum"``: GradVac at most ``threshold`` times plain summation;
            ``"torchjd"``: GradVac at least ``threshold`` times faster than TorchJD;
            ``"step_share"``: the coefficient stage below ``threshold`` of GradVac's whole time.
        threshold: the bound.
    """

    kind: GoalKind
    threshold: float

    def describe(self) -> str:
        """The goal in words."""
        return {
            "loop": "GradVac faster than the plain loop",
            "sum": "GradVac time / plain summation",
            "torchjd": "GradVac faster than TorchJD",
            "step_share": "coefficient stage share of GradVac",
        }[self.kind]

    def target(self) -> str:
        """The bound, printed."""
        if self.kind == "step_share":
            return f"< {self.threshold:.0%}"
        return f"{'<=' if self.kind == 'sum' else '>='} {self.threshold:g}x"


@dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Attributes:
        m: number of tasks (rows of the Jacobian).
        num_blocks: K, the number of equal contiguous blocks.
        n: number of columns (parameters).
        goals: the goals checked on this case.
        loop_tasks: time the plain loop on the first ``loop_tasks`` task rows only and extrapolate
            linearly to ``m`` (the rows cost the same); ``None`` runs all of them.
        loop_repeats: timed repeats of the plain loop (it is slow).
    """

    m: int
    num_blocks: int
    n: int
    goals: tuple[Goal, ...] = ()
    loop_tasks: int | None = None
    loop_repeats: int = 3

    @property
    def label(self) -> str:
        """``m=10 K=40 n=4M``."""
        return f"m={self.m} K={self.num_blocks} n={_short_int(self.n)}"

    def block_sizes(self) -> list[int]:
        """K contiguous blocks of equal size (the first ``n % K`` one column longer)."""
        base, extra = divmod(self.n, self.num_blocks)
        return [base + (k < extra) for k in range(self.num_blocks)]


FULL_CASES: tuple[Case, ...] = (
    Case(10, 1, 4_000_000, goals=(Goal("sum", 4.0),)),
    Case(10, 40, 4_000_000, goals=(Goal("loop", 20.0), Goal("sum", 4.0))),
    Case(32, 1, 1_000_000, goals=(Goal("torchjd", 3.0),), loop_repeats=2),
    Case(64, 500, 4_000_000, goals=(Goal("step_share", 0.25),), loop_tasks=1, loop_repeats=1),
)
"""The sizes of the project's performance goals (two to five minutes on two shared cores)."""

QUICK_CASES: tuple[Case, ...] = (
    Case(4, 1, 50_000, goals=(Goal("sum", 4.0),), loop_repeats=1),
    Case(4, 8, 50_000, goals=(Goal("loop", 20.0), Goal("sum", 4.0)), loop_repeats=1),
    Case(8, 1, 20_000, goals=(Goal("torchjd", 3.0),), loop_repeats=1),
    Case(8, 20, 50_000, goals=(Goal("step_share", 0.25),), loop_tasks=1, loop_repeats=1),
)
"""Small sizes for a smoke test (a few seconds); their verdicts say nothing about the goals."""


@dataclass(frozen=True)
class CaseResult:
    """The timings of one case.

    Attributes:
        case: the configuration.
        gradvac: the whole aggregator call.
        gramians: :func:`partial_gramians` alone.
        step: :func:`gradvac_step` alone (input checks off, as the aggregator runs it).
        combine: :func:`combine` alone.
        summation: ``jacobian.sum(0)``.
        loop: the plain per-pair loop (extrapolated when ``case.loop_tasks`` is set).
        loop_diff: ``max |GradVac - loop| / max |loop|`` on a first step from zero targets with the
            same orders; ``None`` when the loop was timed on part of the rows only.
        torchjd: TorchJD's GradVac, or ``None`` (see ``torchjd_note``).
        torchjd_note: why TorchJD was not timed (empty when it was).
    """

    case: Case
    gradvac: Timing
    gramians: Timing
    step: Timing
    combine: Timing
    summation: Timing
    loop: Timing
    loop_diff: float | None
    torchjd: Timing | None
    torchjd_note: str

    def goal_value(self, goal: Goal) -> float | None:
        """The measured quantity a goal bounds (``None`` when its baseline was not timed)."""
        gv = self.gradvac.median_ms
        if goal.kind == "loop":
            return self.loop.median_ms / gv
        if goal.kind == "sum":
            return gv / self.summation.median_ms
        if goal.kind == "torchjd":
            return None if self.torchjd is None else self.torchjd.median_ms / gv
        return self.step.median_ms / gv

    def goal_met(self, goal: Goal) -> bool:
        """Whether the measured quantity meets the goal."""
        value = self.goal_value(goal)
        if value is None:
            return False
        if goal.kind in ("loop", "torchjd"):
            return value >= goal.threshold
        if goal.kind == "sum":
            return value <= goal.threshold
        return value < goal.threshold


class PlainLoopGradVac:
    """GradVac's vector form written naively, the way LibMTL's ``GradVac.backward`` is.

    For each task ``i``, for each other task ``j`` in ``i``'s order, for each block: a dot product
    and two norms on slices of the task gradients, a Python ``if`` on the cosine (one host sync per
    pair and block), the correction in place, the EMA target updated. Targets are kept across
    calls (float32, ``[m, m, K]`` as LibMTL's ``rho_T``) and the orders come from
    :func:`~gradvac_dist.draw_order` on a generator seeded like :class:`~gradvac_dist.GradVac`'s,
    so both follow the same trajectory.
    """

    def __init__(self, m: int, block_sizes: Sequence[int], beta: float = 0.5, eps: float = 1e-8, seed: int = 0) -> None:
        self.beta = beta
        self.eps = eps
        self.bounds = [(start, stop) for _, start, stop in contiguous_segments(block_sizes)]
        self.targets = torch.zeros((m, m, len(self.bounds)))
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, jacobian: Tensor, tasks: int | None = None) -> Tensor:
        """One step on ``jacobian`` (``[m, n]``); only the first ``tasks`` rows are corrected if given."""
        m = jacobian.shape[0]
        beta, eps, rho = self.beta, self.eps, self.targets
        order = draw_order(m, self.generator)
        modified = jacobian.clone()
        for i in range(m if tasks is None else tasks):
            for j in order[i].tolist():
                for k, (start, stop) in enumerate(self.bounds):
                    p, g = modified[i, start:stop], jacobian[j, start:stop]
                    phi = torch.dot(p, g) / (p.norm() * g.norm() + eps)
                    if phi < rho[i, j, k]:
                        t = rho[i, j, k]
                        w = (
                            p.norm()
                            * (t * (1 - phi**2).sqrt() - phi * (1 - t**2).sqrt())
                            / (g.norm() * (1 - t**2).sqrt() + eps)
                        )
                        p += w * g
                    rho[i, j, k] = (1 - beta) * rho[i, j, k] + beta * phi
        return modified.sum(0)


def _short_int(n: int) -> str:
    for unit, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _torchjd_gradvac() -> tuple[Callable[[Tensor], Tensor] | None, str]:
    """A fresh TorchJD GradVac aggregator, or ``None`` and why not."""
    try:
        from torchjd.aggregation import GradVac as TorchJDGradVac
    except ImportError:
        return None, "not installed"
    return TorchJDGradVac(), ""


def run_case(case: Case, *, repeats: int, warmup: int) -> CaseResult:
    """Times GradVac, its stages and the baselines on one case (see the module docstring)."""
    m, sizes = case.m, case.block_sizes()
    jacobian = torch.randn((m, case.n), generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    segments = contiguous_segments(sizes)

    aggregator = GradVac(seed=SEED)
    loop = PlainLoopGradVac(m, sizes, seed=SEED)
    loop_diff = None
    if case.loop_tasks is None:  # first step of both from zero targets, same orders: they must agree
        expected = loop(jacobian)
        loop_diff = float((aggregator(jacobian, sizes) - expected).abs().max() / expected.abs().max())
        loop_time = time_ms(lambda: loop(jacobian), repeats=case.loop_repeats, warmup=0)
    else:
        loop_time = time_ms(lambda: loop(jacobian, case.loop_tasks), repeats=case.loop_repeats, warmup=0)
        loop_time = loop_time.scaled(m / case.loop_tasks)

    gramians = partial_gramians(jacobian, segments, len(sizes))
    aggregator(jacobian, sizes)  # non-zero targets from here on, as in training
    targets = aggregator.targets
    order = draw_order(m, torch.Generator().manual_seed(SEED))
    coefficients = gradvac_step(gramians, targets, order).coefficients
    workspace = StepWorkspace()  # the stage's buffers kept between calls, as the aggregator's trajectory keeps them
    contenders: dict[str, Callable[[], object]] = {
        "gradvac": lambda: aggregator(jacobian, sizes),
        "gramians": lambda: partial_gramians(jacobian, segments, len(sizes)),
        "step": lambda: gradvac_step(gramians, targets, order, check_inputs=False, workspace=workspace),
        "combine": lambda: combine(jacobian, coefficients, segments),
        "sum": lambda: jacobian.sum(0),
    }
    torchjd, torchjd_note = _torchjd_gradvac()
    if torchjd is not None and case.num_blocks > 1:
        torchjd_note = "n/a for K>1 (TorchJD's GradVac is whole-model)"
    elif torchjd is not None:
        contenders["torchjd"] = lambda: torchjd(jacobian)
    t = time_interleaved(contenders, repeats=repeats, warmup=warmup)
    return CaseResult(
        case,
        t["gradvac"],
        t["gramians"],
        t["step"],
        t["combine"],
        t["sum"],
        loop_time,
        loop_diff,
        t.get("torchjd"),
        torchjd_note,
    )


def _span(values: Iterable[int]) -> str:
    values = sorted(set(values))
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _ratio(num: Timing | None, den: Timing | None) -> float | None:
    return None if num is None or den is None else num.median_ms / den.median_ms


def build_report(results: Sequence[CaseResult], *, repeats: int, warmup: int, quick: bool) -> Report:
    """The timing table and the goals table of a run."""
    timings = Table(
        "GradVac core: median ms (float32 Jacobian, K equal contiguous blocks)",
        [
            "case",
            "GradVac",
            "Gramians",
            "step",
            "combine",
            "step share",
            "loop",
            "vs loop",
            "sum",
            "GV/sum",
            "TorchJD",
            "vs TorchJD",
            "loop diff",
        ],
    )
    torchjd_notes: list[str] = []
    for r in results:
        extrapolated = r.case.loop_tasks is not None
        if r.torchjd is None and r.torchjd_note not in torchjd_notes:
            torchjd_notes.append(r.torchjd_note)
        timings.add_row(
            [
                r.case.label,
                fmt_ms(r.gradvac),
                fmt_ms(r.gramians),
                fmt_ms(r.step),
                fmt_ms(r.combine),
                f"{r.step.median_ms / r.gradvac.median_ms:.0%}",
                fmt_ms(r.loop) + ("*" if extrapolated else ""),
                fmt_ratio(_ratio(r.loop, r.gradvac)),
                fmt_ms(r.summation),
                fmt_ratio(_ratio(r.gradvac, r.summation)),
                fmt_ms(r.torchjd),
                fmt_ratio(_ratio(r.torchjd, r.gradvac)),
                "-" if r.loop_diff is None else f"{r.loop_diff:.1e}",
            ]
        )
    timings.notes += [
        f"median of {repeats} interleaved rounds after {warmup} warm-up round(s); loop: median of {_span(r.loop.repeats for r in results)} run(s)",
        "GradVac = GradVac()(jacobian, block_sizes): Gramians + step + combine (+ checks); "
        "Gramians = partial_gramians, step = gradvac_step on the Gramians (input checks off, as GradVac runs it), "
        "combine = combine, each timed alone",
        "step share = step / GradVac; vs loop = loop / GradVac; GV/sum = GradVac / jacobian.sum(0); "
        "vs TorchJD = TorchJD / GradVac",
        "loop = the vector form written naively (per task, per visit, per block: dot/norms on slices, Python if), as LibMTL",
        "loop* = timed on the first task row only, times m (every row does the same work)",
        "loop diff = max|GradVac - loop| / max|loop| on a first step from zero targets, same orders",
    ]
    if torchjd_notes:
        timings.notes.append("TorchJD: " + "; ".join(torchjd_notes))

    goals = Table("Goals", ["goal", "case", "measured", "target", "verdict"])
    for r in results:
        for goal in r.case.goals:
            value = r.goal_value(goal)
            if value is None:
                measured = "not measured"
            elif goal.kind == "step_share":
                measured = f"{value:.0%}"
            else:
                measured = fmt_ratio(value)
            goals.add_row([goal.describe(), r.case.label, measured, goal.target(), pass_fail(r.goal_met(goal))])
    if quick:
        goals.notes.append("--quick sizes: the verdicts say nothing about the goals, which are set at the full sizes")
    return Report(machine_line(), [timings, goals])


def timing_of(quick: bool) -> tuple[int, int]:
    """(repeats, warm-up rounds) of a run."""
    return (3, 1) if quick else (7, 2)


def measure(quick: bool = False, progress: Callable[[str], None] | None = None) -> list[CaseResult]:
    """Times every case (:data:`QUICK_CASES` or :data:`FULL_CASES`); the numbers behind :func:`run`'s report."""
    repeats, warmup = timing_of(quick)
    results = []
    for case in QUICK_CASES if quick else FULL_CASES:
        if progress is not None:
            progress(f"core: {case.label} ...")
        results.append(run_case(case, repeats=repeats, warmup=warmup))
    return results


def run(quick: bool = False, progress: Callable[[str], None] | None = None) -> Report:
    """Runs every case (:data:`QUICK_CASES` or :data:`FULL_CASES`) and returns the report.

    Args:
        quick: small sizes and fewer repeats, for a smoke test.
        progress: called with a line before each case (e.g. ``print`` to stderr), or ``None``.
    """
    repeats, warmup = timing_of(quick)
    return build_report(measure(quick, progress), repeats=repeats, warmup=warmup, quick=quick)
