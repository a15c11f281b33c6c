"""Every setting all ranks must share, in one frozen object, checked once at construction.

:class:`GradVacSettings` is what :class:`~gradvac_dist.GradVacState` (and the single-process
aggregators) are configured by. Nothing writes it after construction: the rank agreement, the
pickle and the ``repr`` of a state all read this one object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._blocks import GROUPINGS
from ._checks import check_num_tasks
from ._comm import STRATEGIES
from ._errors import ON_NONFINITE
from ._weighting import Weighting, check_weighting

__all__ = ["GradVacSettings"]


@dataclass(frozen=True, kw_only=True)
class GradVacSettings:
    """The settings of GradVac (or of a Gramian weighting); immutable, identical on every rank.

    Every argument is checked here, once, and kept as the (read-only) attribute of the same name;
    the constructor takes keywords only. :class:`~gradvac_dist.GradVacState` and the
    single-process aggregators build one from their own arguments (``state.settings``).

    Args:
        num_tasks: m, the number of task losses per step; ``None`` only for the single-process
            aggregators, where the first step fixes it.
        beta: EMA rate of the targets, in ``[0, 1]`` (paper and LibMTL default 0.5).
        eps: stabiliser of both denominators, ``>= 0`` (default 1e-8, as LibMTL).
        seed: seed of the CPU generator the visiting orders (and a weighting's random draws) come from.
        grouping: ``"whole"``, ``"parameter"`` or ``"module"``: how parameters are split into blocks.
        strategy: DDP's per-task reduction, ``"sharded"`` or ``"replicated"``; ``None``: the
            backend's default.
        shared_params: names or name prefixes of the parameters GradVac acts on (a tuple), or
            ``None`` for all of them. A single string or a list is accepted and kept as a tuple.
        on_nonfinite: ``"raise"`` (default) or ``"skip"`` a step with an inf/NaN task gradient.
        check_sync_every: every that many steps, check that the ranks' trajectories are
            identical; ``None``: never.
        weighting: ``None`` for GradVac, or a Gramian weighting run on each block's Gramian
            instead of GradVac's coefficient stage (beta and eps then unused). A TorchJD
            Gramian-weighted aggregator is kept as its weighting.

    Raises:
        ValueError: any setting out of its range or of the wrong type (the message names it
            and what it accepts); a weighting that cannot run identically on every rank.

    Example:
        >>> import dataclasses
        >>> import gradvac_dist
        >>> settings = gradvac_dist.GradVacSettings(num_tasks=3, grouping="module", shared_params="encoder")
        >>> settings.shared_params
        ('encoder',)
        >>> settings.beta = 0.9
        Traceback (most recent call last):
            ...
        dataclasses.FrozenInstanceError: cannot assign to field 'beta'
        >>> dataclasses.replace(settings, beta=0.9).beta  # a new, checked, object
        0.9
        >>> gradvac_dist.GradVacSettings(beta=2.0)
        Traceback (most recent call last):
            ...
        ValueError: beta must be a number in [0, 1] (the EMA rate of the targets), got 2.0.
    """

    num_tasks: int | None = None
    beta: float = 0.5
    eps: float = 1e-8
    seed: int = 0
    grouping: str = "whole"
    strategy: str | None = None
    shared_params: tuple[str, ...] | None = None
    on_nonfinite: str = "raise"
    check_sync_every: int | None = None
    weighting: Weighting | None = None

    def __post_init__(self) -> None:
        if self.num_tasks is not None:
            check_num_tasks(self.num_tasks)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1] (the EMA rate of the targets), got {self.beta!r}.")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps >= 0.0:
            raise ValueError(f"eps must be a number >= 0, got {self.eps!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}.")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}.")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy must be one of {STRATEGIES} or None (the backend's default), got {self.strategy!r}."
            )
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}.")
        every = self.check_sync_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"check_sync_every must be None or an int >= 1 (steps), got {every!r}.")
        # Normal forms, set once here (the dataclass is frozen for everyone else).
        object.__setattr__(self, "shared_params", _shared_params(self.shared_params))
        if self.weighting is not None:
            object.__setattr__(self, "weighting", check_weighting(self.weighting))


def _shared_params(shared_params: Any) -> tuple[str, ...] | None:
    if shared_params is None:
        return None
    if isinstance(shared_params, str):
        shared_params = [shared_params]
    try:
        names = tuple(shared_params)
    except TypeError:
        names = ()
    if not names or not all(isinstance(s, str) and s for s in names):
        raise ValueError(
            "shared_params must be a non-empty list of parameter names or name prefixes of the wrapped "
            f"module (e.g. ['encoder']), got {shared_params!r}."
        )
    return names
