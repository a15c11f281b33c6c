"""``gradvac_dist.backward``: one entry for every kind of model; it only dispatches.

A plain module goes to the single-process path (``_local.py``), a DistributedDataParallel module
with :func:`gradvac_dist.gradvac_hook` registered to the DDP path (``_ddp.py``), an FSDP2 module to
the FSDP2 path (``_fsdp.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _torch_compat as compat
from ._aggregator import GramianAggregator
from ._checks import check_losses, reject_fsdp1
from ._ddp import ddp_backward, is_ddp
from ._fsdp import fsdp_backward, is_fsdp2
from ._local import local_backward

__all__ = ["backward"]


def backward(
    model: nn.Module,
    losses: Sequence[Tensor] | Tensor,
    aggregator: GramianAggregator | None = None,
    *,
    grouping: str = "whole",
    shared_params: Iterable[nn.Parameter] | None = None,
    sync: bool | None = None,
) -> None:
    """Computes GradVac's aggregated gradient of ``losses`` and writes it into the parameters' ``.grad``.

    An existing ``.grad`` is kept and the aggregated gradient is added to it, as ``loss.backward()``
    does, on every path. An enclosing ``torch.autocast`` region changes nothing: the backward passes
    and GradVac's own arithmetic run with autocast off, as PyTorch recommends for backward passes,
    so the result is the same as outside the region. A ``torch.compile``'d module is unwrapped.

    - Plain module: the per-task gradients of the trainable parameters are formed (m backward
      passes), aggregated by ``aggregator`` with blocks from ``grouping``, and written into
      ``.grad`` (accumulated onto an existing ``.grad``, as ``loss.backward()`` would).
    - DistributedDataParallel with :func:`gradvac_dist.gradvac_hook` registered: see the DDP
      path; ``aggregator``/``grouping`` come from the registered :class:`GradVacState`.
    - FSDP2 (``fully_shard``) root module with :func:`gradvac_dist.register_fsdp` called on it: see
      :class:`gradvac_dist.FSDPGradVac`; configuration from the registered :class:`GradVacState`.

    The losses may come from one forward on a shared batch or from one forward per task on that
    task's own samples (per-task data: ``[loss_fn(ddp(x_t)[t], y_t) for t, ...]``); either way task
    ``t``'s gradient is that of ``losses[t]``.

    Args:
        model: the module whose parameters receive the gradient.
        losses: one scalar loss per task (a sequence, or a 1-D tensor).
        aggregator: a :class:`GradVac` (plain modules only; it keeps the EMA targets), or a
            :class:`GramianWeightedAggregator` for another Gramian weighting.
        grouping: ``"whole"``, ``"parameter"`` or ``"module"`` (plain modules only).
        shared_params: the parameters GradVac acts on (e.g. a shared encoder); every other
            parameter receives the plain sum of its task gradients, LibMTL's convention for heads.
        sync: gradient accumulation. Leave it ``None``: under DDP it follows ``ddp.no_sync()``,
            under FSDP2 ``model.set_requires_gradient_sync``; there, and with ``sync=False`` on a
            plain module, each task's gradient of the micro-batch is added to a per-task sum with no
            communication and ``.grad`` is untouched, and the next synchronising call runs GradVac
            once, on the accumulated per-task gradients. An explicit value that contradicts the
            wrapper's switch raises.

    Raises:
        ValueError: the losses are not one scalar tensor per task that requires grad (or, under
            DDP and FSDP2, not ``num_tasks`` of them); a plain module without ``aggregator``, or
            ``aggregator`` given for a DDP or FSDP2 model; no trainable parameter; an unknown
            ``grouping``; ``shared_params`` empty or not among the trainable parameters; sparse
            gradients; FSDP1; the single-process path in a job of several ranks; ``sync``
            contradicting the wrapper's switch. Under DDP and FSDP2 a bad input on one rank
            raises on every rank.
        NonFiniteGradientError: a task gradient holds inf or NaN and the aggregator or state has
            ``on_nonfinite="raise"``; the GradVac state is left untouched.

    Example:
        One process, a linear model whose two task losses have the conflicting gradients
        ``(1, 0)`` and ``(-1, 1)``:

        >>> import torch
        >>> from torch import nn
        >>> import gradvac_dist
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> _ = nn.init.zeros_(model.weight)
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> agg = gradvac_dist.GradVac(seed=0)
        >>> losses = model(x).squeeze(1)  # loss of task t: <w, x_t>, a 1-D tensor of m = 2 losses
        >>> gradvac_dist.backward(model, losses, agg)
        >>> model.weight.grad.round(decimals=4).tolist()
        [[0.5, 1.5]]
        >>> agg.step
        1

        Under DDP or FSDP2 the state is the registered :class:`GradVacState`'s, so no
        aggregator is passed: ``gradvac_dist.backward(ddp, losses)``.
    """
    model = compat.unwrap_compiled(model)
    # The distributed paths check the losses themselves, so that every rank learns of a bad one.
    if not (is_ddp(model) or is_fsdp2(model)):
        losses = check_losses(losses)
    with _autocast_off(losses):
        _dispatch(model, losses, aggregator, grouping, shared_params, sync)


#: Device types autocast may be on for, besides the losses' own (looked up per step: a fixed list, not
#: a walk over the model's parameters).
_AUTOCAST_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")


def _autocast_off(losses: Any) -> contextlib.AbstractContextManager[None]:
    """Autocast off for every device type it is on for (the known ones and the losses' devices)."""
    stack = contextlib.ExitStack()
    devices = [loss.device.type for loss in losses if isinstance(loss, Tensor)] if isinstance(losses, Sequence) else []
    if isinstance(losses, Tensor):
        devices = [losses.device.type]
    for device_type in dict.fromkeys((*_AUTOCAST_TYPES, *devices)):
        try:
            enabled = torch.is_autocast_enabled(device_type)
        except RuntimeError:  # a device type autocast does not know
            enabled = False
        if enabled:
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _dispatch(
    model: nn.Module,
    losses: Any,
    aggregator: GramianAggregator | None,
    grouping: str,
    shared_params: Iterable[nn.Parameter] | None,
    sync: bool | None,
) -> None:
    if is_ddp(model):
        if aggregator is not None:
            raise ValueError(
                "backward(ddp_model, losses): the DDP path takes its GradVac state from the registered "
                "comm hook; drop the aggregator argument (configure GradVacState instead)."
            )
        ddp_backward(model, losses, sync=sync)
        return
    reject_fsdp1(model)
    if is_fsdp2(model):
        if aggregator is not None:
            raise ValueError(
                "backward(fsdp_model, losses): the FSDP2 path takes its GradVac state from register_fsdp(model, "
                "state); drop the aggregator argument (configure GradVacState instead)."
            )
        fsdp_backward(model, losses, sync=sync)
        return
    local_backward(model, losses, aggregator, grouping, shared_params, sync)
