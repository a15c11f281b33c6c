"""The one writer of ``param.grad``: every path's gradient bookkeeping, in one place.

A GradVac step runs m backward passes through ``.grad`` (DDP and FSDP2 write each task's reduced
gradient there) and ends by leaving the aggregated gradient in ``.grad``, as one
``loss.backward()`` would: an existing ``.grad`` is kept and added to, a parameter no task reached
keeps ``None``, and a tensor written here has the parameter's dtype and memory layout (DDP's bucket
views and FSDP2's sharded DTensors are built by their drivers and handed in). The drivers
(``_ddp.py``, ``_fsdp.py``, ``_local.py``) decide *what* each parameter gets; only this module
assigns or adds into ``.grad`` (``tests/unit/test_package.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["accumulate", "add_back", "clear", "drop", "put", "put_back", "set_aside"]

Prior = list[Tensor | None]


def _local(grad: Tensor) -> Tensor:
    """The tensor that holds ``grad``'s numbers on this rank (a sharded DTensor's local shard)."""
    return grad.to_local() if isinstance(grad, DTensor) else grad


def set_aside(params: Sequence[nn.Parameter], *, copy: bool = False) -> Prior | None:
    """Takes every existing ``.grad`` out of the way of the passes (``.grad`` becomes ``None``).

    Returns the set-aside gradients, or ``None`` when no parameter had one (after ``zero_grad()``,
    the usual case). ``copy``: keep a copy instead of the tensor itself, for a ``.grad`` that is a
    view of a buffer the passes overwrite (DDP's ``gradient_as_bucket_view``).
    """
    if all(p.grad is None for p in params):
        return None
    prior: Prior = []
    for p in params:
        grad = p.grad
        prior.append(None if grad is None else grad.detach().clone() if copy else grad)
        p.grad = None
    return prior


def add_back(params: Sequence[nn.Parameter], prior: Prior | None) -> None:
    """After a step: adds each set-aside gradient to the step's ``.grad`` (or puts it back where the
    step left none), as ``loss.backward()`` accumulates."""
    if prior is None:
        return
    with torch.no_grad():
        for p, old in zip(params, prior):
            if old is None:
                continue
            if p.grad is not None:
                _local(p.grad).add_(_local(old))
            else:
                p.grad = old


def put_back(params: Sequence[nn.Parameter], prior: Prior | None) -> None:
    """After a failed step: every ``.grad`` is what it was before the step (``None`` included), so
    nothing half-written is left behind."""
    if prior is None:
        return
    for p, old in zip(params, prior):
        p.grad = old


def clear(params: Sequence[nn.Parameter], reached: list[bool]) -> None:
    """Between passes: drops each ``.grad`` a pass wrote (its task's gradient was taken), marking
    the parameter in ``reached``, so the next pass's autograd hands its fresh gradient over instead
    of adding it to the last one."""
    for i, p in enumerate(params):
        if p.grad is not None:
            reached[i] = True
            p.grad = None


def drop(param: nn.Parameter) -> None:
    """Drops one ``.grad`` whose content was taken (FSDP2: a pass's shard, once copied)."""
    param.grad = None


def put(param: nn.Parameter, grad: Tensor) -> None:
    """Writes a fresh gradient the driver built for ``param`` (its dtype, layout or sharding)."""
    param.grad = grad


def accumulate(param: nn.Parameter, value: Tensor) -> None:
    """Adds ``value`` (``param``'s shape) to ``param.grad``: a copy of its own in the parameter's dtype
    where there is none, as ``loss.backward()`` does."""
    with torch.no_grad():
        if param.grad is None:
            param.grad = value.to(param.dtype, copy=True)
        else:
            param.grad.add_(value.to(param.dtype))
