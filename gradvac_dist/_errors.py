"""Errors raised by gradvac_dist that callers may want to catch by type."""

from __future__ import annotations

__all__ = ["NonFiniteGradientError", "nonfinite_message"]

ON_NONFINITE = ("raise", "skip")


class NonFiniteGradientError(FloatingPointError):
    """A task gradient holds inf or NaN; GradVac's state was left untouched.

    Attributes:
        task: index of a task whose gradient is not finite (or None if unknown).
        where: a parameter or block name where it is not finite (or None).
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
