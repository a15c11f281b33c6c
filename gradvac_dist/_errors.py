"""Errors raised by gradvac_dist that callers may want to catch by type."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["NonFiniteGradientError", "first_nonfinite", "nonfinite_flags", "nonfinite_message"]

ON_NONFINITE = ("raise", "skip")


class NonFiniteGradientError(FloatingPointError):
    """A task gradient holds inf or NaN; GradVac's state was left untouched.

    Raised by the aggregators, :func:`gradvac_dist.backward` and the DDP and FSDP2 paths when
    ``on_nonfinite="raise"`` (the default); a ``FloatingPointError``. Under DDP and FSDP2 every
    rank raises it.

    Args:
        message: what was not finite, and what to do.
        task: index of a task whose gradient is not finite, if known.
        where: a parameter or block name where it is not finite, if known.

    Attributes:
        task: index of a task whose gradient is not finite (or None if unknown).
        where: a parameter or block name where it is not finite (or None).

    Example:
        >>> import torch
        >>> import gradvac_dist
        >>> agg = gradvac_dist.GradVac(seed=0)
        >>> jacobian = torch.tensor([[1.0, 0.0], [0.0, float("inf")]], dtype=torch.float64)
        >>> try:
        ...     agg(jacobian)
        ... except gradvac_dist.NonFiniteGradientError as err:
        ...     print(err.task, agg.step)
        1 0
    """

    def __init__(self, message: str, task: int | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.task = task
        self.where = where


def nonfinite_message(task: int | None, where: str | None, ranks: str = "") -> str:
    who = f"task {task}'s gradient" if task is not None else "a task gradient"
    place = f" in {where!r}" if where else ""
    return (
        f"GradVac: {who} is not finite (inf or NaN){place}{ranks}. The GradVac state (targets, order "
        "generator, step) was left untouched. Lower the learning rate, clip the losses, or with mixed "
        "precision construct the state with on_nonfinite='skip' and step through a GradScaler, which then "
        "skips this optimizer step."
    )


def nonfinite_flags(
    parts: Iterable[tuple[Tensor, Sequence[tuple[int, int, int]]]], m: int, count: int, device: torch.device
) -> Tensor:
    """Where the task gradients are not finite: ``[m, count]`` float64, entry ``(task, i)`` nonzero
    when task ``task``'s columns of group ``i`` (a parameter or a block) hold inf or NaN.

    ``parts`` are ``(data [m, L], columns)`` with ``columns`` the ``(group, start, stop)`` ranges of
    ``data``. The flags are counts, so flags of several ranks can be summed (one all-reduce).
    Error path only: it is never called on a finite step.
    """
    flags = torch.zeros((m, count), dtype=torch.float64, device=device)
    for data, columns in parts:
        for index, start, stop in columns:
            flags[:, index] += (~torch.isfinite(data[:, start:stop])).any(dim=1).double()
    return flags


def first_nonfinite(flags: Tensor) -> tuple[int | None, int | None]:
    """``(task, group)`` of the first nonzero entry of :func:`nonfinite_flags`' output, in task order;
    ``(None, None)`` when none is set (the Gramians overflowed although every entry is finite)."""
    bad = flags.nonzero()
    if bad.numel() == 0:
        return None, None
    return int(bad[0, 0]), int(bad[0, 1])
