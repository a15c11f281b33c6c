"""A read-only view of one GradVac step for logging: per block, how the tasks relate and what GradVac did.

Built from a :class:`~gradvac_dist.GradVacStepResult` without touching its tensors: nothing is
computed, copied or synchronised until a number is asked for. The tensor properties stay on the
step's device (no host synchronisation); :meth:`StepDiagnostics.summary` and
:meth:`StepDiagnostics.per_block` return plain Python floats through one device-to-host read each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._step import GradVacStepResult

__all__ = ["StepDiagnostics"]


class StepDiagnostics:
    """What one GradVac step saw and did, per block (``K`` blocks, ``m`` tasks), for logging.

    Over the ``m (m - 1)`` visits of a block (task ``i``'s gradient, as modified so far, against
    task ``j``'s original one, ``i != j``; the paper's Algorithm 1,
    https://openreview.net/forum?id=F1vEjWK-lH_):

    - ``mean_cosine[k]``: the mean of the measured cosines ``phi_ij`` (before any correction);
    - ``corrected_fraction[k]``: the fraction of visits where ``phi_ij < phi_hat_ij`` and the
      gradient was corrected;
    - ``target_min[k]``, ``target_max[k]``: the range of the EMA targets ``phi_hat_ij`` after the step
      (``phi_hat <- (1 - beta) phi_hat + beta phi``).

    With a single task there are no visits: the cosine and target values are NaN and the fraction 0.

    Args:
        result: the step's :class:`~gradvac_dist.GradVacStepResult` (``state.last_result``).
        step: the number of GradVac steps done, this one included.
        block_names: one name per block, for :meth:`per_block` (default ``"0"``, ``"1"``, ...).

    Raises:
        ValueError: ``block_names`` does not have one name per block.

    Example:
        >>> import torch, gradvac_dist
        >>> agg = gradvac_dist.GradVac(beta=0.5, seed=0)
        >>> jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> _ = agg(jac)
        >>> d = agg.diagnostics
        >>> {k: round(v, 4) for k, v in d.summary().items()}
        {'step': 1.0, 'mean_cosine': -0.7071, 'corrected_fraction': 1.0, 'target_min': -0.3536, 'target_max': -0.3536}
    """

    __slots__ = ("_result", "block_names", "step")

    def __init__(self, result: GradVacStepResult, step: int, block_names: tuple[str, ...] | None = None) -> None:
        num_blocks = result.cosines.shape[0]
        if block_names is not None and len(block_names) != num_blocks:
            raise ValueError(f"block_names has {len(block_names)} names for {num_blocks} blocks")
        object.__setattr__(self, "_result", result)
        object.__setattr__(self, "step", int(step))
        object.__setattr__(self, "block_names", tuple(block_names or (str(k) for k in range(num_blocks))))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"StepDiagnostics is read-only (tried to set {name!r})")

    @property
    def num_blocks(self) -> int:
        """K, the number of blocks of the step."""
        return self._result.cosines.shape[0]

    @property
    def num_tasks(self) -> int:
        """m, the number of tasks of the step."""
        return self._result.cosines.shape[-1]

    def _off_diagonal(self) -> Tensor:
        m = self.num_tasks
        return ~torch.eye(m, dtype=torch.bool, device=self._result.cosines.device)

    def _mean_over_visits(self, values: Tensor) -> Tensor:
        m = self.num_tasks
        if m < 2:
            return torch.full(values.shape[:1], float("nan"), dtype=torch.float64, device=values.device)
        return (values.double() * self._off_diagonal()).sum((1, 2)) / (m * (m - 1))

    @property
    def mean_cosine(self) -> Tensor:
        """``[K]`` float64: per block, the mean measured cosine over the visits (on the step's device)."""
        return self._mean_over_visits(self._result.cosines)

    @property
    def corrected_fraction(self) -> Tensor:
        """``[K]`` float64: per block, the fraction of visits that applied a correction."""
        if self.num_tasks < 2:
            return torch.zeros(self.num_blocks, dtype=torch.float64, device=self._result.corrected.device)
        return self._mean_over_visits(self._result.corrected)

    def _target_extreme(self, largest: bool) -> Tensor:
        targets = self._result.targets.double()
        if self.num_tasks < 2:
            return torch.full((self.num_blocks,), float("nan"), dtype=torch.float64, device=targets.device)
        fill = float("-inf") if largest else float("inf")
        masked = targets.masked_fill(~self._off_diagonal(), fill)
        return masked.amax((1, 2)) if largest else masked.amin((1, 2))

    @property
    def target_min(self) -> Tensor:
        """``[K]`` float64: per block, the smallest EMA target after the step."""
        return self._target_extreme(largest=False)

    @property
    def target_max(self) -> Tensor:
        """``[K]`` float64: per block, the largest EMA target after the step."""
        return self._target_extreme(largest=True)

    def summary(self) -> dict[str, float]:
        """Plain floats over all blocks, in one host read.

        Returns:
            ``{"step", "mean_cosine", "corrected_fraction", "target_min", "target_max"}``: the step
            count, the mean of the blocks' mean cosines and corrected fractions, and the targets'
            overall range. Ready for ``self.log_dict`` (Lightning) or any logger.
        """
        values = torch.stack(
            [
                self.mean_cosine.mean(),
                self.corrected_fraction.mean(),
                self.target_min.amin(),
                self.target_max.amax(),
            ]
        ).tolist()
        names = ("mean_cosine", "corrected_fraction", "target_min", "target_max")
        return {"step": float(self.step), **dict(zip(names, values))}

    def per_block(self) -> dict[str, dict[str, float]]:
        """Plain floats per block, in one host read: ``{block name: {"mean_cosine": ..., ...}}``."""
        names = ("mean_cosine", "corrected_fraction", "target_min", "target_max")
        rows = torch.stack([self.mean_cosine, self.corrected_fraction, self.target_min, self.target_max], 1).tolist()
        return {block: dict(zip(names, row)) for block, row in zip(self.block_names, rows)}

    def __repr__(self) -> str:
        return f"StepDiagnostics(step={self.step}, blocks={self.num_blocks}, tasks={self.num_tasks})"
