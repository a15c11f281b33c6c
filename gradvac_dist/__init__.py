"""gradvac_dist: exact GradVac (Gradient Vaccine, ICLR 2021) for distributed PyTorch training.

Paper: Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR 2021, https://arxiv.org/abs/2010.05874
"""

from ._aggregator import GradVac, WeightedAggregator
from ._backward import backward
from ._blocks import GROUPINGS
from ._checkpoint import load_checkpoint, save_checkpoint
from ._comm import STRATEGIES, CommCounters
from ._ddp import gradvac_hook, register_ddp
from ._errors import NonFiniteGradientError
from ._fsdp import FSDPGradVac, register_fsdp
from ._state import GradVacConfig, GradVacState
from ._step import GradVacStepResult, StepWorkspace, draw_order, gradvac_step

__all__ = [
    "GROUPINGS",
    "STRATEGIES",
    "CommCounters",
    "FSDPGradVac",
    "GradVac",
    "GradVacConfig",
    "GradVacState",
    "GradVacStepResult",
    "NonFiniteGradientError",
    "StepWorkspace",
    "WeightedAggregator",
    "backward",
    "draw_order",
    "gradvac_hook",
    "gradvac_step",
    "load_checkpoint",
    "register_ddp",
    "register_fsdp",
    "save_checkpoint",
]

__version__ = "0.1.0"
