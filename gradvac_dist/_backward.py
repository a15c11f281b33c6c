"""``gradvac_dist.backward``: one entry that writes GradVac's aggregated gradient into ``.grad``.

It dispatches on the model: a plain module (this file), a DistributedDataParallel module with
:func:`gradvac_dist.gradvac_hook` registered (``_ddp.py``), an FSDP2 module (``_fsdp.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ._aggregator import GradVac
from ._blocks import BlockLayout, layout_of
from ._errors import NonFiniteGradientError, nonfinite_message

__all__ = ["backward", "task_jacobian"]


def _check_losses(losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(losses, Tensor):
        losses = list(losses.unbind()) if losses.dim() == 1 else [losses]
    losses = list(losses)
    if not losses:
        raise ValueError("losses is empty: pass one scalar loss per task.")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"losses[{i}] must be a scalar tensor (one loss per task), got {type(loss).__name__} "
                f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}."
            )
        if not loss.requires_grad:
            raise ValueError(f"losses[{i}] does not require grad: it is not connected to the model's parameters.")
    return losses


def task_jacobian(losses: Sequence[Tensor], params: Sequence[nn.Parameter]) -> Tensor:
    """The ``[m, n]`` matrix of per-task gradients of ``params``, flattened in order.

    One ``torch.autograd.grad`` pass per task (graph retained between them); a parameter a task
    does not reach gets zeros. A single batched backward (``is_grads_batched=True``) was measured
    slower on CPU, 1 thread, an MLP trunk with one head per task, batch 64: m=3, width 512:
    11.0 ms (m passes) vs 14.7 ms (batched); m=10: 28.6 vs 43.5 ms; m=3, width 2048: 240 vs 269 ms.
    It also fails on ops without a batching rule.
    """
    m, n = len(losses), sum(p.numel() for p in params)
    first = params[0]
    jac = torch.empty((m, n), dtype=first.dtype, device=first.device)
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=i < m - 1, allow_unused=True)
        offset = 0
        for p, g in zip(params, grads):
            row = jac[i, offset : offset + p.numel()]
            if g is None:
                row.zero_()
            else:
                row.copy_(g.reshape(-1))
            offset += p.numel()
    return jac


def backward(
    model: nn.Module,
    losses: Sequence[Tensor] | Tensor,
    aggregator: GradVac | None = None,
    *,
    grouping: str = "whole",
    shared_params: Iterable[nn.Parameter] | None = None,
    sync: bool = True,
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
    from ._ddp import ddp_backward, is_ddp  # local: the DDP room imports this one's helpers

    losses = _check_losses(losses)
    if is_ddp(model):
        if aggregator is not None:
            raise ValueError(
                "backward(ddp_model, losses): the DDP path takes its GradVac state from the registered "
                "comm hook; drop the aggregator argument (configure GradVacState instead)."
            )
        ddp_backward(model, losses, sync=sync)
        return
    _reject_unsupported_wrappers(model)
    from ._fsdp import fsdp_backward, is_fsdp2

    if is_fsdp2(model):
        if aggregator is not None:
            raise ValueError(
                "backward(fsdp_model, losses): the FSDP2 path takes its GradVac state from register_fsdp(model, "
                "state); drop the aggregator argument (configure GradVacState instead)."
            )
        fsdp_backward(model, losses, sync=sync)
        return
    if not isinstance(aggregator, GradVac):
        raise ValueError(
            "backward(model, losses, aggregator): a plain module needs aggregator=gradvac_dist.GradVac(...), "
            f"got {aggregator!r}."
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True.")
    layout = layout_of(model, params, grouping, shared_params)
    jac = task_jacobian(losses, params)
    jac = aggregator._accumulate(jac, params, sync)
    if jac is None:
        return
    try:
        aggregated = _aggregate_with_layout(aggregator, jac, layout)
    except NonFiniteGradientError as err:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        task, name = _locate_nonfinite(jac, layout.numels, names)
        raise NonFiniteGradientError(nonfinite_message(task, name), task, name) from err
    offset = 0
    for p in params:
        g = aggregated[offset : offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)
        offset += p.numel()


def _locate_nonfinite(jac: Tensor, numels: Sequence[int], names: Sequence[str]) -> tuple[int | None, str | None]:
    """(task, parameter name) of the first non-finite entry of the Jacobian (error path only)."""
    offset = 0
    for numel, name in zip(numels, names):
        bad = (~torch.isfinite(jac[:, offset : offset + numel])).any(dim=1).nonzero()
        if bad.numel():
            return int(bad[0, 0]), name
        offset += numel
    return None, None


def _aggregate_with_layout(aggregator: GradVac, jac: Tensor, layout: BlockLayout) -> Tensor:
    """Runs the aggregator on the acted-on columns only; the rest get the plain sum."""
    if all(b >= 0 for b in layout.param_blocks) and _blocks_are_contiguous(layout):
        return aggregator(jac, layout.block_sizes)
    # Gather each block's columns contiguously, aggregate, scatter back; excluded columns are summed.
    index_per_block: list[list[Tensor]] = [[] for _ in range(layout.num_blocks)]
    out = jac.sum(0)
    offset = 0
    for numel, block in zip(layout.numels, layout.param_blocks):
        if block >= 0:
            index_per_block[block].append(torch.arange(offset, offset + numel, device=jac.device))
        offset += numel
    index = torch.cat([torch.cat(ix) for ix in index_per_block])
    if not bool(torch.isfinite(out).all()):  # a non-finite column outside the blocks: same policy
        if aggregator.config.on_nonfinite == "skip":
            aggregator.skipped_steps += 1
            return out
        raise NonFiniteGradientError(nonfinite_message(None, None))
    out[index] = aggregator(jac[:, index], layout.block_sizes)
    return out


def _blocks_are_contiguous(layout) -> bool:
    seen: list[int] = []
    for block in layout.param_blocks:
        if not seen or seen[-1] != block:
            if block in seen:
                return False
            seen.append(block)
    return seen == list(range(layout.num_blocks))


def _reject_unsupported_wrappers(model: nn.Module) -> None:
    """Refuses FSDP1, on the model itself or on any submodule (also called by ``register_fsdp``)."""
    if any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        raise ValueError(
            "FSDP1 (FullyShardedDataParallel) is not supported: it crashes or skips the reduction on a "
            "second backward pass of one step. Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard) instead."
        )
