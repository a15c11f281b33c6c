"""Every access to torch internals, in one place: feature-detected, and checked once.

gradvac_dist supports torch 2.6 to 2.14 (``pyproject.toml``). What it needs beyond torch's public
API is reached here and nowhere else; :func:`check_ddp` (at a DDP module's first step) and
:func:`check_fsdp` (at :func:`gradvac_dist.register_fsdp`) verify it is all there and raise a
``RuntimeError`` naming the torch release and what is missing, so another release fails loudly
instead of misbehaving. Differences between releases are handled by feature detection, never by
version strings. Where torch has a public way, it is used (marked *public* below).

DDP (``torch.nn.parallel.DistributedDataParallel``), identical in 2.6 to 2.14:

- ``reducer.prepare_for_backward([loss])`` re-arms the reducer before each backward pass after
  the first (pytorch#47260): the one DDP internal with no public alternative.
- ``_comm_hooks``: the ``(hook, state)`` pairs ``register_comm_hook`` recorded, to find the
  :class:`~gradvac_dist.GradVacState` a user registered.
- ``_join_config``: whether ``ddp.join()`` (uneven inputs) was entered.
- ``_DDPSinkBackward`` and its ``ddp_weakref``: the node DDP's forward puts on its outputs, to
  find which DDP module a loss comes from.
- *public*: the managed parameters are ``module.named_parameters()`` minus ``parameters_to_ignore``
  (DDP's own definition); ``find_unused_parameters``, ``static_graph``, ``require_backward_grad_sync``.

FSDP2 (``torch.distributed.fsdp.fully_shard``, public there from 2.6):

- ``_get_fsdp_state()``, its ``_fsdp_param_groups`` (a list from 2.12; before, one optional
  ``_fsdp_param_group``), each group's ``fsdp_params``, ``reshard_after_backward`` and
  ``reduce_grads`` (read; written through the *public* ``set_reshard_after_backward`` and
  ``set_requires_gradient_sync``), each ``FSDPParam``'s ``sharded_param`` and ``_module_info``.
- the root state's ``_is_root`` and ``_state_ctx.is_last_backward`` (read; written through the
  *public* ``set_is_last_backward``); ``_comm_ctx``'s reduce-scatter and all-reduce streams, which
  an accelerator stream waits for before reading a pass's ``.grad``.
- gradient accumulation without communication (``set_requires_gradient_sync(False)``): each
  ``FSDPParam``'s ``_unsharded_param.grad`` and ``unsharded_accumulated_grad``, where FSDP keeps the
  local gradients it has not reduced yet (from 2.15 all of them on ``_unsharded_param.grad``, the
  other name a read-only view of it: told apart by whether that property has a setter).
- *public*: ``DTensor.from_local(..., shape=, stride=)`` builds the sharded ``.grad``.
- FSDP2 on a CPU mesh needs ``torch.cpu.Stream.record_event`` (torch 2.7 and later).

Elsewhere: ``torch._foreach_*`` (batched copies, with a per-tensor fallback) and
``torch.compile``'s ``OptimizedModule._orig_mod``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

__all__ = [
    "accumulation_dtypes",
    "check_ddp",
    "check_fsdp",
    "ddp_of_sink",
    "ddp_parameters",
    "foreach_copy_",
    "foreach_zero_",
    "fsdp_param_groups",
    "fsdp_params_by_id",
    "fsdp_root_state",
    "give_unsharded_grad",
    "gradient_sync_enabled",
    "has_comm_hook",
    "hook_states",
    "is_last_backward",
    "is_root",
    "join_enabled",
    "prepare_for_backward",
    "reshard_after_backward",
    "sharded_grad",
    "sharded_param",
    "take_unsharded_grad",
    "unwrap_compiled",
    "wait_for_reductions",
    "zeros_unsharded",
]


def _missing(what: Sequence[str], needed_for: str) -> RuntimeError:
    return RuntimeError(
        f"this torch release ({torch.__version__}) lacks {', '.join(what)}, which gradvac_dist needs {needed_for}; "
        "gradvac_dist supports torch 2.6 to 2.14 (see docs/compatibility.md)."
    )


# -- DDP -------------------------------------------------------------------------------------------


def check_ddp(ddp: nn.Module) -> None:
    """Raises if this torch's DistributedDataParallel lacks what the DDP path relies on."""
    missing = []
    reducer = getattr(ddp, "reducer", None)
    if reducer is None or not hasattr(reducer, "prepare_for_backward"):
        missing.append("DistributedDataParallel.reducer.prepare_for_backward")
    if not isinstance(getattr(ddp, "_comm_hooks", None), list):
        missing.append("DistributedDataParallel._comm_hooks")
    if not hasattr(ddp, "parameters_to_ignore"):
        missing.append("DistributedDataParallel.parameters_to_ignore")
    if missing:
        raise _missing(missing, "to run one backward pass per task under DDP")


def prepare_for_backward(ddp: nn.Module, loss: Tensor) -> None:
    """Re-arms DDP's reducer for one more backward pass from ``loss``."""
    ddp.reducer.prepare_for_backward([loss])


def hook_states(ddp: nn.Module, hook: Callable[..., Any]) -> list[Any]:
    """The states registered with ``hook`` through ``ddp.register_comm_hook``."""
    return [state for registered, state in getattr(ddp, "_comm_hooks", []) if registered is hook]


def has_comm_hook(ddp: nn.Module) -> bool:
    """Whether any comm hook was registered through ``ddp.register_comm_hook``."""
    return bool(getattr(ddp, "_comm_hooks", []))


def ddp_parameters(ddp: nn.Module) -> list[nn.Parameter]:
    """The parameters DDP manages, in its order (those it was told to ignore left out)."""
    ignored = ddp.parameters_to_ignore
    return [p for name, p in ddp.module.named_parameters() if name not in ignored]


def join_enabled(ddp: nn.Module) -> bool:
    """Whether ``ddp.join()`` was entered on this module (its setting stays after the context exits)."""
    config = getattr(ddp, "_join_config", None)
    return bool(getattr(config, "enable", False))


def ddp_of_sink(node: Any) -> nn.Module | None:
    """The DDP module whose forward made ``node`` (a ``grad_fn``), if it is DDP's output node."""
    if type(node).__name__ != "_DDPSinkBackward":
        return None
    ref = getattr(node, "ddp_weakref", None)
    return ref() if callable(ref) else None


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (repeatedly), or ``model`` itself."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


# -- FSDP2 -----------------------------------------------------------------------------------------


def fsdp_param_groups(model: nn.Module) -> list[tuple[FSDPModule, list[Any]]]:
    """Every FSDP2 module under ``model`` with its parameter groups (``FSDPParamGroup``)."""
    out = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)  # torch 2.12 and later: a list
            if groups is None:  # torch 2.6 to 2.11: one optional group per state
                single = getattr(state, "_fsdp_param_group", None)
                groups = [] if single is None else [single]
            out.append((module, list(groups)))
    return out


def check_fsdp(model: nn.Module) -> None:
    """Raises if this torch's FSDP2 lacks what the FSDP2 path relies on (at ``register_fsdp``)."""
    missing = []
    if not hasattr(model, "_get_fsdp_state"):
        missing.append("FSDPModule._get_fsdp_state")
        raise _missing(missing, "for GradVac under FSDP2")
    root = model._get_fsdp_state()
    if not hasattr(root, "_fsdp_param_groups") and not hasattr(root, "_fsdp_param_group"):
        missing.append("FSDPState._fsdp_param_groups")
    groups = [g for _, gs in fsdp_param_groups(model) for g in gs] if not missing else []
    for attr in ("fsdp_params", "reshard_after_backward", "reduce_grads"):
        if groups and not hasattr(groups[0], attr):
            missing.append(f"FSDPParamGroup.{attr}")
    fsdp_params = [fp for g in groups for fp in getattr(g, "fsdp_params", [])]
    for attr in ("sharded_param", "_module_info", "unsharded_accumulated_grad"):
        if fsdp_params and not hasattr(fsdp_params[0], attr):
            missing.append(f"FSDPParam.{attr}")
    for attr in ("_state_ctx", "_is_root", "_comm_ctx"):
        if not hasattr(root, attr):
            missing.append(f"FSDPState.{attr}")
    for attr in ("set_is_last_backward", "set_reshard_after_backward", "set_requires_gradient_sync"):
        if not hasattr(model, attr):
            missing.append(f"FSDPModule.{attr}")
    if missing:
        raise _missing(missing, "for GradVac under FSDP2")
    meshes = {p.device_mesh.device_type for p in model.parameters() if isinstance(p, DTensor)}
    if "cpu" in meshes and not hasattr(torch.cpu.Stream, "record_event"):
        raise _missing(["torch.cpu.Stream.record_event"], "(FSDP2 itself does, on a CPU mesh: torch 2.7 and later)")


def fsdp_params_by_id(groups: Iterable[Any]) -> dict[int, Any]:
    """``id(parameter) -> FSDPParam`` for the sharded parameter and the one registered on its module now."""
    by_id = {}
    for group in groups:
        for fp in group.fsdp_params:
            by_id[id(fp.sharded_param)] = fp
            info = fp._module_info  # the parameter as registered on its module now (before lazy init too)
            by_id[id(getattr(info.module, info.param_name))] = fp
    return by_id


def sharded_param(fsdp_param: Any) -> nn.Parameter:
    """The stable sharded parameter of an ``FSDPParam`` (FSDP swaps the module's around forward/backward)."""
    return fsdp_param.sharded_param


def fsdp_root_state(model: nn.Module) -> Any:
    """The root's FSDP state: ``_is_root`` is ``None`` before the first forward, ``True`` on the root."""
    return model._get_fsdp_state()


def is_root(model: nn.Module) -> bool | None:
    return fsdp_root_state(model)._is_root


def is_last_backward(model: nn.Module) -> bool:
    return bool(fsdp_root_state(model)._state_ctx.is_last_backward)


def reshard_after_backward(module: FSDPModule, groups: Sequence[Any]) -> bool:
    """The module's setting (FSDP gives all its groups the same one)."""
    return bool(groups[0].reshard_after_backward) if groups else True


def gradient_sync_enabled(groups: Iterable[Any]) -> bool | None:
    """``True``/``False`` if every group has gradient sync on/off, ``None`` if they differ."""
    values = {bool(g.reduce_grads) for g in groups}
    return values.pop() if len(values) == 1 else (None if values else True)


def wait_for_reductions(model: nn.Module, stash_device: torch.device) -> None:
    """Orders this stream after FSDP's reductions of the pass, so that ``.grad`` can be read.

    FSDP reduce-scatters (and, for HSDP, all-reduces) on side streams and makes the current stream
    wait for them only when it finalises a backward, which GradVac defers to the last pass. A stream
    wait costs no host synchronisation. Shards offloaded to the CPU are written by asynchronous
    device-to-host copies: the host must wait for the device there (and where the streams are not
    found).
    """
    comm = getattr(fsdp_root_state(model), "_comm_ctx", None)
    streams = [getattr(comm, name, None) for name in ("reduce_scatter_stream", "all_reduce_stream")]
    if stash_device.type == "cpu" or streams[0] is None:
        torch.accelerator.synchronize()
        return
    current = torch.accelerator.current_stream()
    for stream in streams:
        if stream is not None:
            current.wait_stream(stream)


def sharded_grad(param: DTensor, local: Tensor) -> DTensor:
    """The ``.grad`` FSDP itself would build for ``param`` from this rank's shard ``local``."""
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def _accumulates_on_param(fsdp_param: Any) -> bool:
    """Whether FSDP keeps every unreduced gradient on ``_unsharded_param.grad`` (torch 2.15 and later).

    Before, a gradient accumulated across backward passes with sync off moved to a separate
    ``unsharded_accumulated_grad`` slot (in the reduce dtype); from 2.15 that name is a read-only
    view of ``_unsharded_param.grad``, where autograd itself accumulates (in ``grad_dtype``).
    """
    slot = getattr(type(fsdp_param), "unsharded_accumulated_grad", None)
    return isinstance(slot, property) and slot.fset is None


def take_unsharded_grad(fsdp_param: Any) -> Tensor | None:
    """Removes and returns the local gradient FSDP keeps unreduced (gradient sync off), if any."""
    if not _accumulates_on_param(fsdp_param):
        grad = fsdp_param.unsharded_accumulated_grad
        if grad is not None:
            fsdp_param.unsharded_accumulated_grad = None
            return grad
    unsharded = getattr(fsdp_param, "_unsharded_param", None)
    if unsharded is None or unsharded.grad is None:
        return None
    grad = unsharded.grad
    unsharded.grad = None
    return grad


def accumulation_dtypes(fsdp_param: Any) -> tuple[torch.dtype, torch.dtype]:
    """(the dtype FSDP accumulates unreduced gradients in, the dtype a pass's fresh gradient has)."""
    fresh = getattr(fsdp_param, "param_dtype", None) or fsdp_param.sharded_param.dtype
    return getattr(fsdp_param, "reduce_dtype", None) or fresh, fresh


def zeros_unsharded(fsdp_param: Any, dtype: torch.dtype) -> Tensor:
    """A zero unsharded local gradient of this parameter."""
    sharded = fsdp_param.sharded_param
    return torch.zeros(sharded.shape, dtype=dtype, device=sharded.to_local().device)


def give_unsharded_grad(fsdp_param: Any, grad: Tensor) -> None:
    """Hands FSDP an unreduced local gradient: its next backward adds to it and reduce-scatters the sum."""
    if _accumulates_on_param(fsdp_param):
        fsdp_param._unsharded_param.grad = grad
    else:
        fsdp_param.unsharded_accumulated_grad = grad


# -- batched tensor ops ------------------------------------------------------------------------------


def foreach_copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_") and all(d.dtype == s.dtype for d, s in zip(dst, src)):
        torch._foreach_copy_(list(dst), list(src))
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def foreach_zero_(tensors: Sequence[Tensor]) -> None:
    if hasattr(torch, "_foreach_zero_"):
        torch._foreach_zero_(list(tensors))
    else:
        for t in tensors:
            t.zero_()
