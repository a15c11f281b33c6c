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
    """The base of the single-process aggregators: a Jacobian in, one aggregated gradient out.

    What :class:`GradVac` and :class:`GramianWeightedAggregator` share: the Jacobian to per-block Gramians,
    the finiteness decision, the combine, micro-batch accumulation and the trajectory's checkpoint.
    Subclasses decide the coefficients (:meth:`_coefficients`). Use it as the type that
    :func:`gradvac_dist.backward` accepts; build one of the two subclasses.

    Args:
        settings: the :class:`~gradvac_dist.GradVacSettings` (``num_tasks`` left ``None``: the
            first step fixes it); the subclasses build it from their keyword arguments.

    Attributes:
        skipped_steps: how many steps ``on_nonfinite="skip"`` skipped (inf/NaN gradients).

    Example:
        >>> import gradvac_dist
        >>> agg = gradvac_dist.GradVac(seed=0)
        >>> isinstance(agg, gradvac_dist.GramianAggregator)
        True
        >>> agg.settings.on_nonfinite, agg.step
        ('raise', 0)
    """

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
        """Number of steps taken since creation or the last :meth:`reset` (skipped steps not counted)."""
        return self._trajectory.step

    @property
    def diagnostics(self) -> StepDiagnostics | None:
        """A read-only view of the latest GradVac step for logging (see :class:`~gradvac_dist.StepDiagnostics`),
        or ``None`` before the first step, after a skipped one, and for other weightings."""
        result = self.last_result
        return StepDiagnostics(result, self.step) if isinstance(result, GradVacStepResult) else None

    def reset(self) -> None:
        """Starts a new trajectory: zero targets, generator re-seeded, step 0, any m and blocks.

        Example:
            >>> import torch
            >>> import gradvac_dist
            >>> agg = gradvac_dist.GradVac(seed=0)
            >>> _ = agg(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
            >>> agg.step
            1
            >>> agg.reset()
            >>> agg.step, agg.targets
            (0, None)
        """
        self._trajectory.reset()
        self._trajectory.num_tasks = None
        self.last_result = None

    def __call__(self, jacobian: Tensor, block_sizes: Sequence[int] | None = None) -> Tensor:
        """Aggregates the rows of ``jacobian`` (``[m, n]``) into one gradient of length ``n``.

        One step: it advances the trajectory (targets, order generator, step count), except for a
        step skipped with ``on_nonfinite="skip"``. Every step must have the same ``m`` and
        ``block_sizes`` until :meth:`reset`.

        Args:
            jacobian: ``[m, n]`` floating-point tensor, row ``i`` is task ``i``'s gradient.
            block_sizes: sizes of the contiguous column blocks (summing to ``n``); ``None`` means
                one block, the whole vector.

        Returns:
            The aggregated gradient, a tensor of length ``n`` with the Jacobian's dtype and
            device. A step skipped with ``on_nonfinite="skip"`` returns the plain sum of the rows.

        Raises:
            ValueError: ``jacobian`` is not a floating-point ``[m, n]`` tensor with ``m, n >= 1``;
                ``block_sizes`` are not positive integers summing to ``n``; ``m`` or the blocks
                differ from the previous steps' (call :meth:`reset` first).
            NonFiniteGradientError: a row holds inf or NaN and ``on_nonfinite="raise"``; the
                state is left untouched.

        Example:
            >>> import torch
            >>> import gradvac_dist
            >>> agg = gradvac_dist.GradVac(seed=0)
            >>> jacobian = torch.tensor([[1.0, 0.0, 2.0, 0.0], [-1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
            >>> agg(jacobian, block_sizes=[2, 2]).round(decimals=4).tolist()
            [0.5, 1.5, 2.0, 1.0]
            >>> agg(jacobian, block_sizes=[3, 1])
            Traceback (most recent call last):
                ...
            ValueError: GradVac's blocks changed between steps: ...
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
        """Targets, generator state and step count: what a resumed run needs to continue exactly.

        Returns:
            A dict of tensors and plain values (``format_version``, ``num_tasks``,
            ``block_sizes``, ``targets``, ``generator_state``, ``step``), loadable with
            ``torch.load(..., weights_only=True)`` once saved with ``torch.save``.

        Example:
            >>> import torch
            >>> import gradvac_dist
            >>> agg = gradvac_dist.GradVac(seed=0)
            >>> _ = agg(torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64))
            >>> sorted(agg.state_dict())
            ['block_sizes', 'format_version', 'generator_state', 'num_tasks', 'step', 'targets']
        """
        return self._trajectory.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output; checks it whole first, so a bad one changes nothing.

        Args:
            state_dict: what :meth:`state_dict` returned (of an aggregator with any seed).

        Raises:
            ValueError: not a GradVac ``state_dict`` (missing keys, another format version), one
                for another number of tasks than this aggregator's, or malformed or corrupt
                content (targets of the wrong shape or outside ``[-1, 1]``, a bad generator state).

        Example:
            >>> import torch
            >>> import gradvac_dist
            >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
            >>> agg = gradvac_dist.GradVac(seed=0)
            >>> _ = agg(jacobian)
            >>> resumed = gradvac_dist.GradVac(seed=0)
            >>> resumed.load_state_dict(agg.state_dict())
            >>> resumed.step
            1
            >>> torch.equal(resumed(jacobian), agg(jacobian))  # the same trajectory from here on
            True
        """
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
        skipped_steps: how many steps ``on_nonfinite="skip"`` skipped.

    Raises:
        ValueError: ``beta`` outside ``[0, 1]``, ``eps < 0``, ``seed`` not an int ``>= 0``, or
            ``on_nonfinite`` neither ``"raise"`` nor ``"skip"``.

    Example:
        Two tasks, four parameters in two blocks. The first step starts from targets 0, so it is
        PCGrad: in the first block the tasks conflict (cosine -0.71) and each is projected off
        the other; in the second they are orthogonal and are summed as they are.

        >>> import torch
        >>> import gradvac_dist
        >>> agg = gradvac_dist.GradVac(beta=0.5, eps=1e-8, seed=0)
        >>> jacobian = torch.tensor([[1.0, 0.0, 2.0, 0.0], [-1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
        >>> agg(jacobian, block_sizes=[2, 2]).round(decimals=4).tolist()
        [0.5, 1.5, 2.0, 1.0]
        >>> agg.last_result.cosines[0].round(decimals=4).tolist()
        [[1.0, -0.7071], [-0.7071, 1.0]]
        >>> agg.targets[0].round(decimals=4).tolist()  # (1 - beta) * 0 + beta * cosine
        [[0.0, -0.3536], [-0.3536, 0.0]]
        >>> agg.step
        1

        With ``on_nonfinite="skip"`` a step with inf/NaN returns the plain sum and changes nothing:

        >>> skipping = gradvac_dist.GradVac(on_nonfinite="skip")
        >>> skipping(torch.tensor([[1.0, float("nan")], [0.0, 1.0]], dtype=torch.float64)).tolist()
        [1.0, nan]
        >>> skipping.skipped_steps, skipping.step
        (1, 0)
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
        """The EMA targets ``[K, m, m]`` (float64), or ``None`` before the first step.

        ``targets[k, i, j]`` is the target cosine of task ``i`` against task ``j`` in block ``k``.
        """
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

    Attributes:
        skipped_steps: how many steps ``on_nonfinite="skip"`` skipped.

    Raises:
        ValueError: ``weighting`` is ``None`` or not callable, keeps state of its own, has parameters or
            buffers, or weighs the Jacobian rather than its Gramian (a TorchJD matrix weighting);
            ``seed`` or ``on_nonfinite`` is invalid. A weighting that returns something other
            than ``m`` finite weights raises ``ValueError`` at the step.

    Example:
        The mean of the task gradients, block by block, as a weighting of one's own (with TorchJD:
        ``GramianWeightedAggregator(torchjd.aggregation.UPGradWeighting())``):

        >>> import torch
        >>> import gradvac_dist
        >>> def mean_weighting(gramian):
        ...     m = gramian.shape[0]
        ...     return torch.full((m,), 1.0 / m, dtype=gramian.dtype)
        >>> agg = gradvac_dist.GramianWeightedAggregator(mean_weighting, seed=0)
        >>> jacobian = torch.tensor([[1.0, 0.0, 2.0, 0.0], [-1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
        >>> agg(jacobian, block_sizes=[2, 2]).tolist()
        [0.0, 0.5, 1.0, 0.5]
        >>> agg.weighting is mean_weighting
        True
    """

    def __init__(self, weighting: Weighting, seed: int = 0, on_nonfinite: str = "raise") -> None:
        if weighting is None:  # the settings read None as GradVac's own coefficient stage
            raise ValueError(
                "GramianWeightedAggregator needs a Gramian weighting (a callable from a Gramian [m, m] to "
                "weights [m]), got None; for GradVac itself use gradvac_dist.GradVac(...)"
            )
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
