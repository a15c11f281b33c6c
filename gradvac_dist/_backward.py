"""``gradvac_dist.backward``: one entry for every kind of model; it only dispatches.

A plain module goes to the single-process path (``_local.py``), a DistributedDataParallel module
with :func:`gradvac_dist.gradvac_hook` registered to the DDP path (``_ddp.py``), an FSDP2 module to
the FSDP2 path (``_fsdp.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from ._aggregator import GradVac
from ._checks import check_losses, reject_fsdp1
from ._ddp import ddp_backward, is_ddp
from ._fsdp import fsdp_backward, is_fsdp2
from ._local import local_backward

__all__ = ["backward"]


def backward(
    model: nn.Module,
    losses: Sequence[Tensor] | Tensor,
    aggregator: GradVac | None = None,
    *,
    grouping: str = "whole",
    shared_params: Iterable[nn.Parameter] | None = None,
    sync: bool | None = None,
) -> None:
    """Computes GradVac's aggregated gradient of ``losses`` and writes it into the parameters' ``.grad``.

    - Plain module: the per-task gradients of the trainable parameters are formed (m backward
      passes), aggregated by ``aggregator`` with blocks from ``grouping``, and written into
      ``.grad`` (accumulated onto an existing ``.grad``, as ``loss.backward()`` would).
    - DistributedDataParallel with :func:`gradvac_dist.gradvac_hook` registered: see the DDP
      path; ``aggregator``/``grouping`` come from the registered :class:`GradVacState`.
    - FSDP2 (``fully_shard``) root module with :func:`gradvac_dist.register_fsdp` called on it: see
      :class:`gradvac_dist.FSDPGradVac`; configuration from the registered :class:`GradVacState`.

    Args:
        model: the module whose parameters receive the gradient.
        losses: one scalar loss per task (a sequence, or a 1-D tensor).
        aggregator: a :class:`GradVac` (plain modules only); it keeps the EMA targets.
        grouping: ``"whole"``, ``"parameter"`` or ``"module"`` (plain modules only).
        shared_params: the parameters GradVac acts on (e.g. a shared encoder); every other
            parameter receives the plain sum of its task gradients, LibMTL's convention for heads.
        sync: gradient accumulation. ``False``: only add each task's gradient of this micro-batch
            to a per-task accumulator (no communication, ``.grad`` untouched; under DDP run the
            forward inside ``ddp.no_sync()``, as for any DDP accumulation). ``True`` (the last
            micro-batch): GradVac runs once, on the accumulated per-task gradients. Under FSDP2
            the passes still reduce-scatter (gradients stay sharded) and the shards accumulate.
    """
    losses = check_losses(losses)
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
