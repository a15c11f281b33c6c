"""The single-process aggregators on a Jacobian (rows are task gradients): GradVac, and any Gramian
weighting (:class:`GramianWeightedAggregator`). Both stream the Jacobian once into per-block Gramians,
decide per-block coefficients from them, and combine the Jacobian's rows with those."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._blocks import Segment, combine, contiguous_segments, partial_gramians
from ._diagnostics import StepDiagnostics
from ._errors import NonFiniteGradientError, first_nonfinite, nonfinite_flags, nonfinite_message
from ._settings import GradVacSettings
from ._state import Trajectory
from ._step import GradVacStepResult
from ._weighting import Weighting

__all__ = ["GradVac", "GramianAggregator", "GramianWeightedAggregator"]


class GramianAggregator:
    """What :class:`GradVac` and :class:`GramianWeightedAggregator` share: the Jacobian to per-block Gramians,
    the finiteness decision, the combine, micro-batch accumulation and the trajectory's checkpoint.
    Subclasses decide the coefficients (:meth:`_coefficients`)."""

    settings: GradVacSettings
    _trajectory: Trajectory

    def __init__(self, settings: GradVacSettings) -> None:
        self.settings = settings
        self._trajectory = Trajectory(settings.seed)
        self.last_result: GradVacStepResult | None = None
        self.skipped_steps = 0
        # micro-batch accumulation of backward(..., sync=False): (parameter ids, [m, n] sum so far)
        self._pending: tuple[tuple[int, ...], Tensor] | None = None

    def _coefficients(self, gramians: Tensor, block_sizes: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    @property
    def step(self) -> int:
        """Number of steps taken since creation or the last :meth:`reset`."""
        return self._trajectory.step

    @property
    def diagnostics(self) -> StepDiagnostics | None:
        """A read-only view of the latest GradVac step for logging (see :class:`~gradvac_dist.StepDiagnostics`),
        or ``None`` before the first step, after a skipped one, and for other weightings."""
        result = self.last_result
        return StepDiagnostics(result, self.step) if isinstance(result, GradVacStepResult) else None

    def reset(self) -> None:
        """Starts a new trajectory: zero targets, generator re-seeded, step 0, any m and blocks."""
        self._trajectory.reset()
        self._trajectory.num_tasks = None
        self.last_result = None

    def __call__(self, jacobian: Tensor, block_sizes: Sequence[int] | None = None) -> Tensor:
        """Aggregates the rows of ``jacobian`` (``[m, n]``) into one gradient of length ``n``.

        Args:
            jacobian: ``[m, n]`` floating-point tensor, row ``i`` is task ``i``'s gradient.
            block_sizes: sizes of the contiguous column blocks (summing to ``n``); ``None`` means
                one block, the whole vector.
        """
        if not isinstance(jacobian, Tensor) or jacobian.dim() != 2 or not jacobian.is_floating_point():
            desc = (
                f"{jacobian.dtype} {tuple(jacobian.shape)}" if isinstance(jacobian, Tensor) else type(jacobian).__name__
            )
            raise ValueError(
                f"GradVac expects a floating-point Jacobian of shape [m, n] (one row per task), got {desc}."
            )
        m, n = jacobian.shape
        if m < 1 or n < 1:
            raise ValueError(f"GradVac needs at least one task and one column, got a Jacobian of shape {[m, n]}.")
        sizes = _check_block_sizes(block_sizes, n)
        return self._aggregate(jacobian, contiguous_segments(sizes), sizes)

    def _aggregate(self, jacobian: Tensor, segments: Sequence[Segment], block_sizes: tuple[int, ...]) -> Tensor:
        """One step on a Jacobian whose columns are laid out by ``segments`` (any order; block ``-1``:
        columns GradVac does not act on, which get the plain sum). No column is copied."""
        m = jacobian.shape[0]
        num_blocks = len(block_sizes)
        self._trajectory.check_shape(m, block_sizes)
        gramians = partial_gramians(jacobian, segments, num_blocks)
        outside = [jacobian[:, start:stop].sum(dim=1, dtype=torch.float64) for b, start, stop in segments if b < 0]
        finite = torch.isfinite(gramians).all()
        for total in outside:
            finite = finite & torch.isfinite(total).all()
        if not bool(finite):  # the one host sync of a step
            if self.settings.on_nonfinite == "skip":
                self.skipped_steps += 1
                self.last_result = None
                return jacobian.sum(0)
            columns = [segment for segment in segments if segment[0] >= 0]
            task, block = first_nonfinite(nonfinite_flags([(jacobian, columns)], m, num_blocks, jacobian.device))
            where = f"block {block}" if block is not None and num_blocks > 1 else None
            raise NonFiniteGradientError(nonfinite_message(task, where), task, None)
        return combine(jacobian, self._coefficients(gramians, block_sizes), segments)

    def _accumulate(self, jacobian: Tensor, params: Sequence[Any], sync: bool) -> Tensor | None:
        """Adds a micro-batch's Jacobian to the pending sum; returns the total when ``sync``."""
        key = tuple(id(p) for p in params)
        if self._pending is not None:
            pending_key, pending = self._pending
            if pending_key != key or pending.shape != jacobian.shape:
                self._pending = None
                raise ValueError(
                    "backward(..., sync=False) accumulated gradients of other parameters or another number of "
                    "tasks than this call's; accumulate the same model and losses until the sync=True call."
                )
            jacobian = pending.add_(jacobian)
        if not sync:
            self._pending = (key, jacobian)
            return None
        self._pending = None
        return jacobian

    def state_dict(self) -> dict[str, Any]:
        """Targets, generator state and step count: what a resumed run needs to continue exactly."""
        return self._trajectory.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output; checks it whole first, so a bad one changes nothing."""
        self._trajectory.num_tasks = None if self._trajectory.targets is None else self._trajectory.num_tasks
        self._trajectory.load_state_dict(state_dict)


class GradVac(GramianAggregator):
    r"""Gradient Vaccine (Wang et al., ICLR 2021, https://arxiv.org/abs/2010.05874) on one process.

    ``agg(jacobian, block_sizes)`` takes the ``[m, n]`` matrix whose row ``i`` is task ``i``'s
    gradient, splits the columns into contiguous blocks, computes one ``m x m`` Gramian per block
    (streaming through the Jacobian once), runs :func:`gradvac_dist.gradvac_step` on them with
    this aggregator's EMA targets, and returns the aggregated gradient
    :math:`\sum_i p_i` (length ``n``). Results equal LibMTL's ``GradVac`` (main branch) with
    the same visiting orders.

    Each step's order is ``draw_order(m, g)`` on a CPU ``torch.Generator`` ``g`` seeded with
    ``seed``, one draw per step, so two aggregators with the same seed follow the same trajectory.

    Args:
        beta: EMA rate of the targets, in ``[0, 1]``.
        eps: stabiliser of both denominators, ``>= 0``.
        seed: seed of the order generator.
        on_nonfinite: ``"raise"`` (default) a :class:`~gradvac_dist.NonFiniteGradientError` when a
            task gradient holds inf/NaN, or ``"skip"``: return the plain (non-finite) sum and leave
            the state untouched, so that a ``GradScaler`` skips the optimizer step.

    Attributes:
        last_result: the :class:`~gradvac_dist.GradVacStepResult` of the latest step (cosines and
            corrections for logging), or ``None``.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int = 0, on_nonfinite: str = "raise") -> None:
        super().__init__(GradVacSettings(beta=beta, eps=eps, seed=seed, on_nonfinite=on_nonfinite))

    def _coefficients(self, gramians: Tensor, block_sizes: tuple[int, ...]) -> Tensor:
        # Inputs built here (Gramians of a Jacobian, orders from draw_order); finiteness checked.
        s = self.settings
        result = self._trajectory.advance(gramians, block_sizes, s.beta, s.eps, check_inputs=False)
        self.last_result = result
        return result.coefficients

    def __repr__(self) -> str:
        c = self.settings
        return f"GradVac(beta={c.beta}, eps={c.eps}, seed={c.seed}, on_nonfinite={c.on_nonfinite!r})"

    @property
    def targets(self) -> Tensor | None:
        """The EMA targets ``[K, m, m]`` (float64), or ``None`` before the first step."""
        return self._trajectory.targets


class GramianWeightedAggregator(GramianAggregator):
    r"""Any Gramian weighting as a single-process aggregator: block ``k`` of the update is
    :math:`\sum_l w_{k,l} g_{l,k}` with :math:`w_k = \mathrm{weighting}(G_k)`.

    ``weighting`` maps an ``[m, m]`` Gramian to ``[m]`` task weights: TorchJD's Gramian weightings
    (``torchjd.aggregation.UPGradWeighting()``, ``MGDAWeighting()``, ``PCGradWeighting()``,
    ``DualProjWeighting()``, ``IMTLGWeighting()``, ``AlignedMTLWeighting()``, ...) as they are, a
    TorchJD Gramian-weighted aggregator (``UPGrad()``: its weighting is used), or your own
    callable. With ``block_sizes`` (or a grouping in :func:`gradvac_dist.backward`) the weighting
    is applied to each block's Gramian. Random draws of the weighting (PCGrad's order) come from a
    generator seeded with ``seed`` (kept in :meth:`state_dict`); weightings with state of their own
    and matrix weightings are refused (see ``gradvac_dist/_weighting.py``).

    Args:
        weighting: the Gramian weighting.
        seed: seed of the generator the weighting's random draws come from.
        on_nonfinite: as for :class:`GradVac`.
    """

    def __init__(self, weighting: Weighting, seed: int = 0, on_nonfinite: str = "raise") -> None:
        super().__init__(GradVacSettings(seed=seed, on_nonfinite=on_nonfinite, weighting=weighting))

    @property
    def weighting(self) -> Weighting:
        """The Gramian weighting (a TorchJD Gramian-weighted aggregator is replaced by its weighting)."""
        weighting = self.settings.weighting
        assert weighting is not None, "set by the constructor"
        return weighting

    def __repr__(self) -> str:
        return f"GramianWeightedAggregator({self.weighting!r}, seed={self.settings.seed})"

    def _coefficients(self, gramians: Tensor, block_sizes: tuple[int, ...]) -> Tensor:
        return self._trajectory.weigh(gramians, block_sizes, self.weighting).to(gramians.device)


def _check_block_sizes(block_sizes: Sequence[int] | None, n: int) -> tuple[int, ...]:
    if block_sizes is None:
        return (n,)
    if isinstance(block_sizes, Tensor):
        block_sizes = block_sizes.tolist()
    try:
        sizes = tuple(int(s) for s in block_sizes)
        ok = all(isinstance(s, (int, torch.SymInt)) or float(s).is_integer() for s in block_sizes)
    except (TypeError, ValueError):
        ok, sizes = False, ()
    if not ok or not sizes or any(s < 1 for s in sizes) or sum(sizes) != n:
        raise ValueError(
            f"block_sizes must be positive integers summing to the Jacobian's width n={n}, got {block_sizes!r}."
        )
    return sizes
