"""The single-process path: ``gradvac_dist.backward(model, losses, GradVac(...))`` on a plain module.

The per-task gradients of the trainable parameters are formed with one backward pass per task into
an ``[m, n]`` Jacobian (parameters in order, flattened), aggregated by the :class:`GradVac`
aggregator on the layout's segments (no column is gathered or copied, whatever the grouping and
``shared_params``), and written into ``.grad``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _grads
from . import _torch_compat as compat
from ._aggregator import GramianAggregator
from ._blocks import layout_of
from ._checks import graph_nodes, reject_sparse
from ._engine import drivers
from ._errors import NonFiniteGradientError, first_nonfinite, nonfinite_flags, nonfinite_message

__all__ = ["local_backward", "task_jacobian"]


class _NotDense(ValueError):
    """A parameter got a sparse (or otherwise not strided) gradient: ``index`` in ``params``."""

    def __init__(self, index: int, layout: torch.layout) -> None:
        super().__init__(index, layout)
        self.index, self.layout = index, layout


def task_jacobian(losses: Sequence[Tensor], params: Sequence[nn.Parameter]) -> Tensor:
    """The ``[m, n]`` matrix of per-task gradients of ``params``, flattened in order.

    One ``torch.autograd.grad`` pass per task (graph retained between them); a parameter a task
    does not reach gets zeros. A single batched backward (``is_grads_batched=True``) is slower on
    the CPU for the models tried (docs/design.md, "Thresholds") and fails on ops without a
    batching rule.
    """
    m, n = len(losses), sum(p.numel() for p in params)
    dtype = params[0].dtype
    for p in params[1:]:  # parameters of several dtypes (float32 and bfloat16, say): the widest
        dtype = torch.promote_types(dtype, p.dtype)
    jac = torch.empty((m, n), dtype=dtype, device=params[0].device)
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=i < m - 1, allow_unused=True)
        offset = 0
        for p, g in zip(params, grads):
            row = jac[i, offset : offset + p.numel()]
            if g is None:
                row.zero_()
            elif g.layout != torch.strided:
                raise _NotDense(next(k for k, q in enumerate(params) if q is p), g.layout)
            else:
                row.copy_(g.reshape(-1))
            offset += p.numel()
    return jac


def local_backward(
    model: nn.Module,
    losses: Sequence[Tensor],
    aggregator: GramianAggregator | None,
    grouping: str,
    shared_params: Iterable[nn.Parameter] | None,
    sync: bool | None,
) -> None:
    """``gradvac_dist.backward`` on a plain module (see there); ``losses`` are already checked."""
    if not isinstance(aggregator, GramianAggregator):
        raise ValueError(
            "backward(model, losses, aggregator): a plain module needs aggregator=gradvac_dist.GradVac(...) (or "
            f"gradvac_dist.GramianWeightedAggregator(weighting)), got {aggregator!r}."
        )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _refuse_on_several_ranks(model, losses, first_step=aggregator.step == 0)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True.")
    layout = layout_of(model, params, grouping, shared_params)
    try:
        jac = task_jacobian(losses, params)
    except _NotDense as err:  # error path only: name the parameter, and the layer if it is a sparse embedding
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        reject_sparse(model, params, names)
        raise ValueError(
            f"parameter {names[err.index]!r} got a {err.layout} gradient; GradVac combines dense per-task gradients. "
            "Build the layer that produces it with dense gradients (e.g. nn.Embedding(sparse=False))."
        ) from None
    jac = aggregator._accumulate(jac, params, sync is not False)
    if jac is None:
        return
    try:
        aggregated = aggregator._aggregate(jac, layout.segments(), layout.block_sizes)
    except NonFiniteGradientError as err:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        offsets = [0, *itertools.accumulate(layout.numels)]
        columns = [(i, offsets[i], offsets[i + 1]) for i in range(len(names))]
        task, index = first_nonfinite(nonfinite_flags([(jac, columns)], jac.shape[0], len(names), jac.device))
        name = None if index is None else names[index]
        raise NonFiniteGradientError(nonfinite_message(task, name), task, name) from err
    offset = 0
    for p in params:
        _grads.accumulate(p, aggregated[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def _refuse_on_several_ranks(model: nn.Module, losses: Sequence[Tensor], first_step: bool) -> None:
    """In a job of several ranks, refuses the single-process path: it would give each rank its own
    GradVac step on its own gradients, and the ranks would drift apart (the message says how the
    module is known to be DDP's, where it is)."""
    wrapped = any(getattr(driver.module, "module", None) is model for driver in drivers())
    if not wrapped and first_step:  # the forward went through a DDP module (one walk of the graph)
        wrapped = any(compat.ddp_of_sink(node) is not None for node in graph_nodes(losses))
    if wrapped:
        raise ValueError(
            "backward(module, losses, GradVac()) on a module a DistributedDataParallel wraps: that runs GradVac on "
            "this rank's gradients alone, with no communication, and the ranks would drift apart. Pass the "
            "DistributedDataParallel module itself, with gradvac_dist.gradvac_hook registered: "
            "gradvac_dist.backward(ddp, losses)."
        )
    # Not provably wrapped (the forward went around DDP, before any DDP step): in a job of several ranks
    # the single-process path is still GradVac on this rank's gradients alone. Refused on every rank
    # alike (the world size is the same everywhere), so no rank waits for another.
    raise ValueError(
        f"backward(module, losses, aggregator) in a job of {dist.get_world_size()} ranks runs GradVac on this "
        "rank's gradients alone, with no communication: the ranks' models would drift apart. Wrap the model in "
        "DistributedDataParallel(model, find_unused_parameters=True), register gradvac_dist.gradvac_hook and "
        "call gradvac_dist.backward(ddp, losses) (or register_fsdp for FSDP2). If each rank really trains a "
        "model of its own, call the aggregator on the task Jacobian yourself: aggregator(jacobian)."
    )
