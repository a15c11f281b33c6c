"""The DDP communication hook and the driving of m backward passes under DDP."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, DistributedDataParallel)


def ddp_backward(ddp: DistributedDataParallel, losses: list) -> None:
    raise NotImplementedError("the DDP path is being built (issue 3)")
