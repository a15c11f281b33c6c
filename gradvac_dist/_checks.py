"""Checks of user input shared by every path (single process, DDP, FSDP2).

Each raises a ``ValueError`` that says what was wrong and what to do; none touches any state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["check_loss_count", "check_losses", "check_num_tasks", "graph_nodes", "reject_fsdp1", "reject_sparse"]


def check_num_tasks(num_tasks: Any) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int >= 1 (the number of task losses), got {num_tasks!r}.")
    return num_tasks


def check_losses(losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """The losses as a list of scalar tensors that require grad (a 1-D tensor is split into its entries)."""
    if isinstance(losses, Tensor):
        losses = list(losses.unbind()) if losses.dim() == 1 else [losses]
    if isinstance(losses, (int, float)) or not isinstance(losses, Iterable):
        raise ValueError(
            f"losses must be a list of scalar loss tensors (one per task) or a 1-D tensor, got a "
            f"{type(losses).__name__}: {losses!r}."
        )
    losses = list(losses)
    if not losses:
        raise ValueError("losses is empty: pass one scalar loss per task.")
    for i, loss in enumerate(losses):
        if isinstance(loss, (int, float)):
            raise ValueError(
                f"losses[{i}] is a Python {type(loss).__name__} ({loss!r}), which carries no gradient: each loss must be "
                "a tensor computed from the model's outputs (a task with no samples in this batch can return "
                "(outputs * 0).sum(), a zero loss connected to the graph)."
            )
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"losses[{i}] must be a scalar tensor (one loss per task), got {type(loss).__name__} "
                f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}."
            )
        if not loss.requires_grad:
            raise ValueError(
                f"losses[{i}] does not require grad: it is not connected to the model's parameters (a task with no "
                "samples in this batch can return (outputs * 0).sum(), a zero loss connected to the graph)."
            )
    return losses


def check_loss_count(num_losses: int, num_tasks: int) -> None:
    """Refuses a step with another number of losses than the state's ``num_tasks``."""
    if num_losses != num_tasks:
        raise ValueError(
            f"got {num_losses} losses but GradVacState(num_tasks={num_tasks}); pass exactly one loss per task."
        )


def reject_sparse(module: nn.Module, params: Sequence[nn.Parameter], names: Sequence[str]) -> None:
    """Refuses trainable parameters that get sparse gradients (``nn.Embedding(sparse=True)``,
    ``nn.EmbeddingBag(sparse=True)``): GradVac combines dense per-task gradients."""
    ids = {id(p) for p in params}
    name_of = dict(zip((id(p) for p in params), names))
    for mod_name, mod in module.named_modules():
        if getattr(mod, "sparse", False) is True and isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            for p_name, p in mod.named_parameters(recurse=False):
                if id(p) in ids:
                    name = name_of.get(id(p)) or (f"{mod_name}.{p_name}" if mod_name else p_name)
                    raise ValueError(
                        f"parameter {name!r} gets sparse gradients ({type(mod).__name__}(sparse=True)); GradVac "
                        "combines dense per-task gradients and does not support sparse ones. Construct it with "
                        "sparse=False (the default)."
                    )


def reject_fsdp1(model: nn.Module) -> None:
    """Refuses FSDP1 (``FullyShardedDataParallel``), on the model itself or on any submodule."""
    if any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        raise ValueError(
            "FSDP1 (FullyShardedDataParallel) is not supported: it crashes or skips the reduction on a "
            "second backward pass of one step. Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard) instead."
        )


def graph_nodes(losses: Sequence[Tensor], limit: int = 1_000_000) -> Iterator[Any]:
    """The autograd nodes the losses depend on, each once (at most ``limit``; a few microseconds a node).

    The nodes' Python wrappers are kept alive while walking: a wrapper that is freed can hand its
    ``id`` to the next one (seen on torch 2.6), which would end the walk early.
    """
    seen: dict[int, Any] = {}
    todo = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    while todo and len(seen) < limit:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        yield node
        todo.extend(n for n, _ in node.next_functions if n is not None)
