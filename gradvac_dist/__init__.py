"""gradvac_dist: exact GradVac (Gradient Vaccine, ICLR 2021) for distributed PyTorch training.

Paper: Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR 2021, https://arxiv.org/abs/2010.05874
"""

import warnings as _warnings
from typing import Any as _Any

from ._aggregator import GradVac, GramianAggregator, GramianWeightedAggregator
from ._backward import backward
from ._blocks import GROUPINGS
from ._comm import STRATEGIES
from ._ddp import gradvac_hook, register_ddp
from ._diagnostics import StepDiagnostics
from ._errors import NonFiniteGradientError
from ._fsdp import FSDPGradVac, register_fsdp
from ._settings import GradVacSettings
from ._state import GradVacState
from ._step import GradVacStepResult, draw_order, gradvac_step

__all__ = [
    "GROUPINGS",
    "STRATEGIES",
    "FSDPGradVac",
    "GradVac",
    "GradVacSettings",
    "GradVacState",
    "GradVacStepResult",
    "GramianAggregator",
    "GramianWeightedAggregator",
    "NonFiniteGradientError",
    "StepDiagnostics",
    "backward",
    "draw_order",
    "gradvac_hook",
    "gradvac_step",
    "register_ddp",
    "register_fsdp",
]

__version__ = "0.1.0"

#: Names of 0.1.0 that stay importable until 0.3 with a DeprecationWarning: old name -> (module, name, advice).
_DEPRECATED = {
    "WeightedAggregator": (
        "._aggregator",
        "GramianWeightedAggregator",
        "use gradvac_dist.GramianWeightedAggregator (the name TorchJD gives the same contract)",
    ),
    "GradVacConfig": (
        "._settings",
        "GradVacSettings",
        "use gradvac_dist.GradVacSettings (keyword arguments), or read state.settings",
    ),
    "StepWorkspace": ("._step", "StepWorkspace", "it is internal scratch of the coefficient stage"),
    "CommCounters": ("._comm", "CommCounters", "read state.counters instead"),
    "save_checkpoint": ("._checkpoint", "save_checkpoint", "use torch.save on state.state_dict()"),
    "load_checkpoint": ("._checkpoint", "load_checkpoint", "use torch.load(..., weights_only=True)"),
}


def __getattr__(name: str) -> _Any:
    if name in _DEPRECATED:
        module, attr, advice = _DEPRECATED[name]
        _warnings.warn(
            f"gradvac_dist.{name} is deprecated and will be removed in 0.3: {advice}.",
            DeprecationWarning,
            stacklevel=2,
        )
        import importlib

        return getattr(importlib.import_module(module, __name__), attr)
    raise AttributeError(f"module 'gradvac_dist' has no attribute {name!r}")
