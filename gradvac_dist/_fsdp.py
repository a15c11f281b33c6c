"""FSDP2 (``torch.distributed.fsdp.fully_shard``): GradVac on per-task gradients that never leave their shards.

Usage, symmetrical with the DDP hook::

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)                                   # the root too
    state = gradvac_dist.GradVacState(num_tasks=m, grouping="module")
    handle = gradvac_dist.register_fsdp(model, state)    # once
    ...
    losses = [loss_fn(out_i, y_i) for ...]               # one forward
    gradvac_dist.backward(model, losses)                 # m backward passes + one GradVac step
    optimizer.step(); optimizer.zero_grad()
    dcp.save({"model": get_model_state_dict(model), "gradvac": handle}, checkpoint_id=...)

FSDP2 already reduce-scatters every backward pass (mean over ranks, each rank keeps a 1/W shard
of every parameter), so each task's rank-mean gradient arrives sharded for free; GradVac adds one
all-reduce of ``K*m*m + m`` numbers per step and no all-gather of gradients. Gramians of a vector
split across ranks add up, so the partial Gramians of the local shards, summed over ranks, are the
exact Gramians of the rank-mean per-task gradients. What follows once the shards are stashed (the
Gramians, the one all-reduce, the coefficient stage) is the engine's (``_engine.py``), shared with
the DDP hook; this room keeps what is FSDP2's: taking each pass's shards, and writing ``.grad``.

Facts of torch 2.13 this relies on (checked on gloo CPU ranks): one forward then m backward passes
(``retain_graph=True``) works; each pass reduce-scatters and leaves ``param.grad`` a DTensor
sharded like the parameter; a second pass accumulates into ``.grad``; each pass re-all-gathers the
parameters unless told not to reshard after backward. The FSDP internals
used here (each ``FSDPParamGroup``'s ``reshard_after_backward`` and ``reduce_grads``, the shared
``is_last_backward`` flag, ``FSDPParam.sharded_param`` / ``to_sharded_dtensor``) are checked at
registration, so another torch release fails loudly instead of misbehaving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from . import _grads
from . import _torch_compat as compat
from ._blocks import BlockLayout, Segment, append_segment, combine, layout_of, segments_of_range
from ._checks import check_loss_count, check_losses, reject_fsdp1, reject_sparse
from ._comm import CommCounters
from ._engine import Driver, Engine, Piece, agree_on_failure, attach, detach, driver_of
from ._state import GradVacState, from_plain, to_plain

__all__ = ["FSDPGradVac", "fsdp_backward", "is_fsdp2", "register_fsdp"]


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` was sharded with FSDP2's ``fully_shard`` (it is then an ``FSDPModule``)."""
    return isinstance(model, FSDPModule)


def register_fsdp(model: nn.Module, state: GradVacState, *, reshard_between_passes: bool = False) -> FSDPGradVac:
    """Attaches GradVac to a model sharded with FSDP2; then call ``gradvac_dist.backward(model, losses)``.

    Call it on every rank: registration is agreed by every rank (one small all-reduce), so an
    error on one rank raises on all of them.

    Args:
        model: the ROOT module given to ``fully_shard`` (after the per-layer calls); every
            trainable parameter must be an FSDP-sharded DTensor on a 1-D device mesh, or on HSDP's
            2-D mesh (``init_device_mesh(device, (replicas, shards), mesh_dim_names=...)``, spanning
            every rank): each task's gradient then arrives sharded within a replica group and
            averaged across replicas, the replicas divide their shard's Gramian columns, and the
            one Gramian all-reduce spans every rank.
        state: a :class:`GradVacState` (``num_tasks``, ``beta``, ``eps``, ``seed``, ``grouping``,
            ``shared_params``, ``on_nonfinite``, ``check_sync_every``); one state per model. Its
            ``process_group`` must be ``None`` (the FSDP mesh's group is used) or that group. ``strategy`` is a DDP
            setting: FSDP always reduce-scatters, so only ``None`` or ``"sharded"`` are accepted.
        reshard_between_passes: ``False`` (default): the parameters stay unsharded from the first
            backward pass of a step to the last, so a step all-gathers exactly what one plain
            backward does (peak memory: the full unsharded parameters during the passes, as with
            ``reshard_after_forward=False``). ``True``: FSDP's own per-pass behaviour (each pass
            re-all-gathers what it resharded: less memory, up to m times the backward all-gathers).

    Returns:
        The :class:`FSDPGradVac` handle. It is a DCP
        ``Stateful``: put it in the dict given to ``torch.distributed.checkpoint.save`` / ``load``.

    Raises:
        ValueError: FSDP1, a model not sharded with ``fully_shard``, unsharded or non-DTensor
            trainable parameters, a mesh of more than two dimensions (tensor parallelism) or an HSDP
            mesh that does not span every rank, a state or model registered twice.
        TypeError: ``state`` is not a :class:`GradVacState`.

    Example:
        On every rank, with the process group initialised (``examples/fsdp2_train.py`` is a
        whole run)::

            from torch.distributed.checkpoint.state_dict import get_model_state_dict
            from torch.distributed.fsdp import fully_shard
            import torch.distributed.checkpoint as dcp
            import gradvac_dist

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)                                   # the root too
            state = gradvac_dist.GradVacState(num_tasks=m, grouping="module")
            handle = gradvac_dist.register_fsdp(model, state)    # once
            for x, ys in loader:
                losses = task_losses(model(x), ys)
                gradvac_dist.backward(model, losses)             # m backward passes + one GradVac step
                optimizer.step()
                optimizer.zero_grad()
            dcp.save({"model": get_model_state_dict(model), "gradvac": handle}, checkpoint_id=path)
    """
    # Registration proves rank agreement (one small all-reduce): a rank that fails here takes part
    # all the same, so every rank raises rather than some waiting for it in FSDP's collectives.
    try:
        handle = _register(model, state, bool(reshard_between_passes))
    except (ValueError, TypeError, RuntimeError) as err:
        counters = state.counters if isinstance(state, GradVacState) else CommCounters()
        agree_on_failure(err, _group_for_failure(model, state), counters)
        raise  # agree_on_failure raised already; for the type checker
    handle.engine.agree(0, remember=False)
    return handle


def _register(model: nn.Module, state: GradVacState, reshard_between_passes: bool) -> FSDPGradVac:
    reject_fsdp1(model)
    if not is_fsdp2(model):
        raise ValueError(
            f"register_fsdp needs a module sharded with FSDP2 (torch.distributed.fsdp.fully_shard), got a "
            f"{type(model).__name__}. Call fully_shard on each layer and then on the root module, and register "
            "the root. For DistributedDataParallel use ddp.register_comm_hook(state, gradvac_dist.gradvac_hook)."
        )
    if not isinstance(state, GradVacState):
        raise TypeError(f"register_fsdp(model, state): state must be a gradvac_dist.GradVacState, got {state!r}.")
    if state.strategy not in (None, "sharded"):
        raise ValueError(
            f"GradVacState(strategy={state.strategy!r}) is a DDP setting; under FSDP2 each task's gradient is always "
            "reduce-scattered by FSDP. Leave strategy=None."
        )
    handle = FSDPGradVac(model, state, _bind(model, state), reshard_between_passes=reshard_between_passes)
    attach(model, handle)
    return handle


class _Binding(NamedTuple):
    """What registration found and checked: FSDP2's objects for the model's trainable parameters."""

    modules: list[tuple[nn.Module, list[Any]]]  # every FSDP2 module under the model, with its parameter groups
    fsdp_params: list[Any]  # by parameter index: FSDP's stable FSDPParam (it knows the sharded parameter)
    members: list[list[int]]  # the parameter indices of each FSDP parameter group (reduced in one dtype)
    param_names: list[str]
    mesh: _Mesh  # the mesh's group (the Gramians are summed over it) and this rank's replica
    layout: BlockLayout
    on_accelerator: bool  # FSDP's collectives run on an accelerator (the shards may be on the CPU)


def _bind(model: nn.Module, state: GradVacState) -> _Binding:
    """The registration checks of an FSDP2 model: torch's internals present, every trainable parameter
    a DTensor sharded by FSDP2 on one 1-D mesh, the state's group that mesh's; and the block layout."""
    compat.check_fsdp(model)
    modules = compat.fsdp_param_groups(model)
    params = _trainable(model)
    names = {id(p): n for n, p in model.named_parameters()}
    param_names = [names.get(id(p), f"param{i}") for i, p in enumerate(params)]
    reject_sparse(model, params, param_names)
    mesh = _mesh_of(params, param_names)
    mesh_group = mesh.group
    # FSDP swaps the module's parameters between the sharded DTensors and the unsharded tensors
    # around forward and backward; its FSDPParam objects are stable and know the sharded one.
    by_id = compat.fsdp_params_by_id(g for _, groups in modules for g in groups)
    unmanaged = [n for n, p in zip(param_names, params) if id(p) not in by_id]
    if unmanaged:
        raise ValueError(
            f"parameters {unmanaged[:5]} are not managed by FSDP2 under this model; call fully_shard on the root "
            "module (after the per-layer calls) and register that root."
        )
    fsdp_params = [by_id[id(p)] for p in params]
    index = {id(fp): i for i, fp in enumerate(fsdp_params)}
    members = [[index[id(fp)] for fp in group.fsdp_params if id(fp) in index] for _, gs in modules for group in gs]
    if state.process_group is not None and _ranks(state.process_group) != _ranks(mesh_group):
        raise ValueError(
            f"GradVacState.process_group has ranks {_ranks(state.process_group)} but the model is sharded over "
            f"ranks {_ranks(mesh_group)}; the Gramians must be summed over the FSDP shard group. Leave "
            "process_group=None to use the mesh's group."
        )
    # block sizes are global: rank- and world-size-independent, checked on every step and load
    layout = layout_of(model, params, state.grouping, state.shared_params)
    on_accelerator = params[0].device_mesh.device_type != "cpu"
    return _Binding(modules, fsdp_params, members, param_names, mesh, layout, on_accelerator)


def _group_for_failure(model: nn.Module, state: Any) -> dist.ProcessGroup | None:
    """The group the other ranks will agree in: the state's, else the first sharded parameter's mesh."""
    if isinstance(state, GradVacState) and state.process_group is not None:
        return state.process_group
    for p in model.parameters():
        if isinstance(p, DTensor) and p.device_mesh.ndim == 1:
            return p.device_mesh.get_group(0)
    return None


@dataclass
class _Plan:
    """Where each trainable parameter's local shard lives in the ``[m, L]`` stash of a rank.

    ``segments`` are the block segments of the concatenated local shards (adjacent runs of one
    block merged); ``param_segments`` are ``(parameter index, start, stop)``, used only to name a
    non-finite parameter. Local shards are the unpadded ``to_local()`` views: FSDP's dim-0 padding
    never enters the stash. ``own`` are the stash columns whose Gramians this rank contributes: all
    of them, except under HSDP, where the replicas holding the same shards divide them (as DDP's
    replicated strategy divides buckets), so that every element is counted on exactly one rank.
    """

    params: tuple[nn.Parameter, ...]
    local_shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]  # len(params) + 1
    segments: list[Segment]
    param_segments: list[tuple[int, int, int]]
    dtype: torch.dtype
    device: torch.device
    stash: Tensor  # [m, L]
    views: list[list[Tensor]]  # views[task][i]: stash row `task` of parameter i, in its local shape
    reached: list[bool]  # whether any task of the pending step gave parameter i a gradient
    own: tuple[int, int]  # the columns [lo, hi) this rank's Gramians cover

    @property
    def length(self) -> int:
        return self.offsets[-1]

    def piece(self) -> Piece:
        """This rank's piece for the engine: the whole stash, or (HSDP) its replica's share of it."""
        lo, hi = self.own
        if (lo, hi) == (0, self.length):
            return Piece(self.stash, self.segments, self.param_segments)
        params = [(i, max(a, lo) - lo, min(b, hi) - lo) for i, a, b in self.param_segments if max(a, lo) < min(b, hi)]
        return Piece(self.stash[:, lo:hi], segments_of_range(self.segments, lo, hi), params)


class FSDPGradVac(Driver):
    """GradVac attached to an FSDP2 model by :func:`register_fsdp`; a DCP ``Stateful``.

    :meth:`backward` (what ``gradvac_dist.backward(model, losses)`` calls) runs one GradVac step:

    1. Set aside any existing ``.grad`` (it is added back at the end, as ``loss.backward()``
       accumulates). Unless ``reshard_between_passes``, tell every FSDP parameter group not to
       reshard after backward and not to finalise the backward until the last pass, so the
       parameters all-gathered in the first pass stay unsharded for the others and a prefetch
       issued in one pass is consumed in a later one (no all-gather is repeated or wasted).
    2. For each task ``i``: ``losses[i].backward(retain_graph=i < m-1)``. FSDP reduce-scatters the
       task's gradient (mean over ranks) into each sharded ``.grad``; one batched copy moves the
       local shards (``.grad.to_local()``) into row ``i`` of the stash ``[m, L]`` (``L`` = this
       rank's shard size, about n/W; zeros for parameters the task does not reach) and ``.grad``
       is set to ``None``, so the next pass does not accumulate onto it. On an accelerator the
       copy is first ordered after FSDP's reduce-scatter stream (a stream wait, no host sync).
    3. Partial Gramians ``[K, m, m]`` of the stash, block by block, plus per task the sum of the
       columns outside every block (only to detect inf/NaN there), all in float64.
    4. ONE all-reduce (SUM) of those ``K*m*m + m`` numbers: the exact Gramians of the rank-mean
       per-task gradients, identical on every rank.
    5. If finite: every rank runs the identical :meth:`Trajectory.advance` (same Gramians, targets
       and order generator; on the host, where the EMA targets are kept) and gets the per-block
       coefficients ``c[k, l]``. If not: the state is
       left untouched, the coefficients are all ones (the plain sum), and with
       ``on_nonfinite="raise"`` a :class:`~gradvac_dist.NonFiniteGradientError` naming a task and
       parameter is raised after ``.grad`` is written (one extra all-reduce, on that path only).
    6. Each rank combines its own shard, ``sum_l c[k, l] * stash[l]`` per block (plain sum for
       parameters outside ``shared_params``), and writes it into ``.grad`` as a DTensor with the
       parameter's mesh and placements, ready for the optimizer.

    Communication per step and rank, n parameters, W ranks (ring algorithms, elements sent):
    FSDP's own m reduce-scatters, about ``m n (W-1)/W`` (a plain backward does one), the
    parameter all-gathers of one plain forward + backward, GradVac's one all-reduce of
    ``K m^2 + m + 4`` float64 numbers (Gramians, non-finite flags, the rank fingerprint), and before
    the passes one of ``W`` flags (every rank's input checks; the settings at the first step). No
    gradient is all-gathered.

    Memory per rank: the stash, ``m * n/W`` elements of the parameters' dtype (see
    :attr:`stash_bytes`), and, unless ``reshard_between_passes``, the unsharded parameters for the
    duration of the passes.

    ``backward(losses, sync=False)`` is gradient accumulation: the passes still reduce-scatter (that
    is how FSDP keeps gradients at n/W per rank) but the shards are added into the stash and
    ``.grad`` is left untouched; the next ``sync=True`` call adds its micro-batch and runs steps 3-6
    once on the sums.

    Checkpoints: :meth:`state_dict` / :meth:`load_state_dict` follow DCP's ``Stateful`` protocol
    with plain Python values (see :meth:`state_dict`), so ``dcp.load`` loads into a freshly
    registered handle. The content is rank- and world-size-independent (block sizes are global),
    so any world size may resume.

    Built by :func:`register_fsdp`, not by hand.

    Args:
        model: the FSDP2 root module.
        state: its :class:`GradVacState`.
        binding: what registration found of the model (its FSDP modules and parameters, the
            blocks, the mesh): internal.
        reshard_between_passes: as for :func:`register_fsdp`.

    Example:
        A checkpoint that resumes on any number of ranks (``path`` a directory every rank
        reaches)::

            handle = gradvac_dist.register_fsdp(model, gradvac_dist.GradVacState(num_tasks=m))
            ...
            dcp.save({"model": get_model_state_dict(model), "gradvac": handle}, checkpoint_id=path)

            # later, in a new job: a model sharded the same way, a fresh state and handle
            handle = gradvac_dist.register_fsdp(model, gradvac_dist.GradVacState(num_tasks=m))
            checkpoint = {"model": get_model_state_dict(model), "gradvac": handle}
            dcp.load(checkpoint, checkpoint_id=path)             # calls handle.load_state_dict
            set_model_state_dict(model, checkpoint["model"])
            handle.state.step                                    # where the saved run stopped
    """

    def __init__(
        self, model: nn.Module, state: GradVacState, binding: _Binding, *, reshard_between_passes: bool = False
    ) -> None:
        super().__init__(model, state)
        self.reshard_between_passes = reshard_between_passes
        self._modules = binding.modules
        self._fsdp_params = binding.fsdp_params
        self._on_accelerator = binding.on_accelerator
        self.param_names = binding.param_names
        self.layout: BlockLayout = binding.layout
        self.mesh = binding.mesh
        self.engine = Engine(state, binding.mesh.group, self.layout, self.param_names, "fsdp2")
        self._accumulation = _Accumulation(binding.fsdp_params, binding.members, state.num_tasks)
        self._plan: _Plan | None = None

    # -- identity ------------------------------------------------------------------------------------
    @property
    def group(self) -> dist.ProcessGroup:
        """The process group the Gramians are summed over, the FSDP mesh's (under HSDP, every rank)."""
        return self.mesh.group

    @property
    def stash_bytes(self) -> int:
        """Bytes of this rank's per-task shard stash (``m * L * element size``; 0 before the first step)."""
        plan = self._plan
        return 0 if plan is None else plan.stash.numel() * plan.stash.element_size()

    def buffer_bytes(self) -> dict[str, int]:
        return {} if self._plan is None else {"stash": self.stash_bytes}

    def remove(self) -> None:
        """Detaches GradVac from the model (the state can then be registered elsewhere)."""
        detach(self)
        self._plan = None

    def __repr__(self) -> str:
        return (
            f"FSDPGradVac({self.state!r}, blocks={self.layout.num_blocks}, "
            f"reshard_between_passes={self.reshard_between_passes})"
        )

    # -- checkpoint (DCP Stateful) ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The trajectory as plain Python values, for ``torch.distributed.checkpoint`` (identical on all ranks).

        Keys: ``format_version``, ``grouping``, ``num_tasks``, ``step`` (ints / str), ``block_sizes``
        (list of ints: the model's global block sizes), ``targets`` (flat list of float64 values of
        the ``[K, m, m]`` EMA targets, ``None`` before the first step), ``generator_state``
        (``bytes``). No tensors on purpose: see ``gradvac_dist._state.to_plain``.

        Returns:
            The dict described above.
        """
        return to_plain(self.state.state_dict(), self.block_sizes)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads :meth:`state_dict`'s output (also after ``dcp.load``); checks it whole, changes nothing on error.

        Args:
            state_dict: what :meth:`state_dict` returned, saved at any world size.

        Raises:
            ValueError: not a checkpoint of :meth:`state_dict` (a ``GradVacState.state_dict()`` is
                loaded with ``handle.state.load_state_dict``), or one of another model, grouping
                or number of tasks.
            RuntimeError: called between micro-batches of gradient accumulation.
        """
        loaded = from_plain(state_dict)
        if self._accumulation.active:
            raise RuntimeError(
                "load_state_dict between micro-batches of gradient accumulation (gradient sync off): finish the "
                "step first."
            )
        self.state.load_state_dict(loaded)

    # -- the step ----------------------------------------------------------------------------------
    def backward(self, losses: Sequence[Tensor] | Tensor, sync: bool | None = None) -> None:
        """One GradVac step on the model (see the class docstring), as ``gradvac_dist.backward(model, losses)``.

        ``sync`` follows the model's ``set_requires_gradient_sync`` when left ``None``; with gradient
        sync off, the call accumulates a micro-batch without communication. An explicit ``sync`` that
        contradicts that switch raises. At a synchronising step the input checks are agreed by
        every rank (see ``Engine.agree``): a bad input on one rank raises on all of them.

        Args:
            losses: one scalar loss per task (``num_tasks`` of them), from the model's forward.
            sync: ``None`` (follow ``set_requires_gradient_sync``), or a value that must agree with it.

        Raises:
            ValueError: bad losses or another number of them than ``num_tasks``; ``sync``
                contradicting the model's switch, or the switch set differently on its modules;
                a model that is not the root of its forward.
            RuntimeError: called before any forward of the model.
            NonFiniteGradientError: an inf/NaN task gradient with ``on_nonfinite="raise"``
                (after ``.grad`` is written with the plain sum).
        """
        sync_on = compat.gradient_sync_enabled(g for _, gs in self._modules for g in gs)
        checked = self.engine.checked(lambda: self._check_step(losses, sync, sync_on), len, bool(sync_on))
        self._step(checked, bool(sync_on))

    def _check_step(self, losses: Any, sync: bool | None, sync_on: bool | None) -> list[Tensor]:
        """This step's input checks, each once; the checked losses."""
        losses = check_losses(losses)
        model = self.module
        if sync_on is None:
            raise ValueError(
                "gradient sync is on for some FSDP2 modules of this model and off for others; GradVac needs one "
                "setting for the whole model: call model.set_requires_gradient_sync(flag) on the root."
            )
        if sync is not None and bool(sync) != sync_on:
            raise ValueError(
                f"backward(fsdp_model, losses, sync={bool(sync)}) contradicts the model's "
                f"set_requires_gradient_sync({sync_on}): leave sync unset, and accumulate micro-batches with "
                "model.set_requires_gradient_sync(False) (True again for the micro-batch that ends the step)."
            )
        check_loss_count(len(losses), self.state.num_tasks)
        if compat.is_root(model) is None:
            raise RuntimeError(
                "backward(fsdp_model, losses) before any forward: run the model's forward first (FSDP2 sets up "
                "its root then), and compute the losses from its outputs."
            )
        if compat.is_root(model) is not True:
            raise ValueError(
                "GradVac was registered on an FSDP2 module that is not the root of its forward: register (and pass "
                "to gradvac_dist.backward) the outermost module given to fully_shard, the one you call forward on."
            )
        return losses

    def _step(self, losses: Sequence[Tensor], sync_on: bool) -> None:
        """The passes (and, when synchronising, the GradVac step) on checked, agreed inputs."""
        state = self.state
        plan = self._current_plan()
        accumulation = self._accumulation
        if not sync_on:
            self._passes(losses, accumulation.keep)
            return
        prior = _grads.set_aside(plan.params)
        done = False
        try:
            self._passes(losses, lambda task: self._take(plan, task), before=accumulation.hand_back)
            done = True
        finally:
            accumulation.reset()
            if not done:
                plan.reached[:] = [False] * len(plan.params)
                _grads.put_back(plan.params, prior)
        with state.counters.phase("step"):
            outcome = self.engine.step([plan.piece()])
            with state.counters.phase("combine"):
                self._write_grads(plan, outcome.coefficients)
                _grads.add_back(plan.params, prior)
        self.engine.finish(outcome)

    def _passes(
        self, losses: Sequence[Tensor], after: Callable[[int], None], before: Callable[[int], None] | None = None
    ) -> None:
        """One backward pass per task, with FSDP told to keep the parameters unsharded until the last
        (unless ``reshard_between_passes``) and to finalise its backward only then."""
        model, m = self.module, len(losses)
        keep_unsharded = not self.reshard_between_passes
        saved_reshard = [compat.reshard_after_backward(module, groups) for module, groups in self._modules]
        saved_last = compat.is_last_backward(model)
        try:
            for task, loss in enumerate(losses):
                last = task == m - 1
                if keep_unsharded:
                    for (module, _), value in zip(self._modules, saved_reshard):
                        module.set_reshard_after_backward(value if last else False, recurse=False)
                model.set_is_last_backward(last or not keep_unsharded)
                if before is not None:
                    before(task)
                loss.backward(retain_graph=not last)
                after(task)
        finally:
            for (module, _), value in zip(self._modules, saved_reshard):
                module.set_reshard_after_backward(value, recurse=False)
            model.set_is_last_backward(saved_last)

    def _take(self, plan: _Plan, task: int) -> None:
        """Moves pass ``task``'s reduce-scattered shards from ``.grad`` into stash row ``task`` (one batched copy)."""
        if self._on_accelerator:
            compat.wait_for_reductions(self.module, plan.device)
        views = plan.views[task]
        dst: list[Tensor] = []
        src: list[Tensor] = []
        zero: list[Tensor] = []
        with torch.no_grad():
            for i, p in enumerate(plan.params):
                grad = p.grad
                if grad is None:
                    zero.append(views[i])
                    continue
                if not isinstance(grad, DTensor):
                    raise RuntimeError(
                        f"parameter {self.param_names[i]!r} got a plain-tensor .grad in an FSDP2 backward pass; "
                        "something outside FSDP wrote it (a hook?). GradVac needs FSDP's reduce-scattered DTensor grads."
                    )
                dst.append(views[i])
                src.append(grad.to_local())
                plan.reached[i] = True
                # Freeing the shard now is safe on an accelerator too: its memory belongs to FSDP's
                # reduce-scatter stream, which waits for this stream (so for the copy issued below)
                # before its next reduction can reuse it.
                _grads.drop(p)
            if dst:
                compat.foreach_copy_(dst, src)
            if zero:
                compat.foreach_zero_(zero)

    def _write_grads(self, plan: _Plan, coef: Tensor) -> None:
        """Combines the local shards and writes them into ``.grad`` as sharded DTensors (the set-aside
        gradients are added back by the caller)."""
        flat = combine(plan.stash, coef, plan.segments)
        with torch.no_grad():
            for i, p in enumerate(plan.params):
                if not plan.reached[i]:
                    continue  # no task reached it: .grad stays None, as after loss.backward()
                local = flat[plan.offsets[i] : plan.offsets[i + 1]].view(plan.local_shapes[i])
                if local.dtype != p.dtype:
                    local = local.to(p.dtype)
                # the DTensor FSDP itself would build: the parameter's spec (mesh, placements, shape)
                _grads.put(p, compat.sharded_grad(p, local))
        plan.reached[:] = [False] * len(plan.params)

    # -- plan ----------------------------------------------------------------------------------------
    def _current_plan(self) -> _Plan:
        """The plan for the current sharded parameters (rebuilt if they were swapped, e.g. by ``model.to``)."""
        params = tuple(compat.sharded_param(fp) for fp in self._fsdp_params)
        plan = self._plan
        if plan is not None and all(a is b for a, b in zip(plan.params, params)):
            return plan
        if _mesh_of(params, self.param_names) != self.mesh:
            raise ValueError("the model was re-sharded on another mesh since register_fsdp; register it again.")
        numels = tuple(p.numel() for p in params)
        if numels != self.layout.numels:
            raise ValueError(
                "the model's parameters changed shape since register_fsdp; register a new GradVacState for a "
                "different model."
            )
        self._plan = _build_plan(params, self.layout, self.state.num_tasks, self.mesh)
        return self._plan


class _Accumulation:
    """Gradient accumulation under ``set_requires_gradient_sync(False)``: per task, per parameter, the
    local (unreduced) gradient sums FSDP has not reduced, handed back to FSDP in the step's passes."""

    __slots__ = ("fsdp_params", "members", "num_tasks", "sums")

    def __init__(self, fsdp_params: Sequence[Any], members: list[list[int]], num_tasks: int) -> None:
        self.fsdp_params = fsdp_params
        self.members = members
        self.num_tasks = num_tasks
        self.sums: list[list[Tensor | None]] | None = None

    @property
    def active(self) -> bool:
        """Whether micro-batches are pending (between a ``sync=False`` call and the step)."""
        return self.sums is not None

    def reset(self) -> None:
        self.sums = None

    def keep(self, task: int) -> None:
        """Gradient sync off, after pass ``task``: moves its unreduced local gradients into that task's sums."""
        if self.sums is None:
            self.sums = [[None] * len(self.fsdp_params) for _ in range(self.num_tasks)]
        sums = self.sums[task]
        with torch.no_grad():
            for i, fp in enumerate(self.fsdp_params):
                grad = compat.take_unsharded_grad(fp)
                if grad is not None:
                    sums[i] = grad if sums[i] is None else sums[i].add_(grad)

    def hand_back(self, task: int) -> None:
        """Before pass ``task`` of the step: gives FSDP that task's accumulated local gradients, which the
        pass adds to and reduce-scatters with its own (so accumulation costs no communication)."""
        if self.sums is None:
            return
        sums = self.sums[task]
        for members in self.members:
            given = [i for i in members if sums[i] is not None]
            if not given:
                continue
            # FSDP reduce-scatters a group in one dtype: where it accumulates in another dtype than the
            # fresh gradients have, every member gets an accumulated gradient (zeros if none).
            acc_dtype, fresh_dtype = compat.accumulation_dtypes(self.fsdp_params[given[0]])
            for i in members if acc_dtype != fresh_dtype else given:
                fp = self.fsdp_params[i]
                grad = compat.zeros_unsharded(fp, acc_dtype) if sums[i] is None else sums[i].to(acc_dtype)
                compat.give_unsharded_grad(fp, grad)
                sums[i] = None


def _build_plan(params: Sequence[nn.Parameter], layout: BlockLayout, m: int, mesh: _Mesh) -> _Plan:
    locals_ = [p.to_local() for p in params]
    device = locals_[0].device
    if any(t.device != device for t in locals_):
        raise ValueError("GradVac under FSDP2 needs every parameter's local shard on one device.")
    dtype = locals_[0].dtype
    for t in locals_[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    offsets = [0]
    segments: list[Segment] = []
    param_segments: list[tuple[int, int, int]] = []
    for i, (t, block) in enumerate(zip(locals_, layout.param_blocks)):
        start, stop = offsets[-1], offsets[-1] + t.numel()
        offsets.append(stop)
        if stop == start:
            continue  # an empty shard (a parameter with fewer dim-0 rows than ranks)
        param_segments.append((i, start, stop))
        append_segment(segments, block, start, stop)
    stash = torch.zeros((m, offsets[-1]), dtype=dtype, device=device)
    shapes = tuple(t.shape for t in locals_)
    views = [
        [stash[task, offsets[i] : offsets[i + 1]].view(shapes[i]) for i in range(len(params))] for task in range(m)
    ]
    return _Plan(
        params=tuple(params),
        local_shapes=shapes,
        offsets=tuple(offsets),
        segments=segments,
        param_segments=param_segments,
        dtype=dtype,
        device=device,
        stash=stash,
        views=views,
        reached=[False] * len(params),
        own=_share(offsets[-1], mesh.replica, mesh.replicas),
    )


def _share(length: int, replica: int, replicas: int) -> tuple[int, int]:
    """Replica ``replica``'s columns of ``length``, in ``replicas`` contiguous near-equal parts."""
    return length * replica // replicas, length * (replica + 1) // replicas


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True.")
    return params


def _ranks(group: Any) -> list[int]:
    return list(dist.get_process_group_ranks(group))


class _Mesh(NamedTuple):
    """How the parameters are placed: the group the Gramians are summed over (every rank of the mesh),
    and this rank's replica among the ``replicas`` that hold the same shards (HSDP; 1 for plain FSDP)."""

    group: dist.ProcessGroup
    replica: int
    replicas: int


def _mesh_of(params: Sequence[nn.Parameter], names: Sequence[str]) -> _Mesh:
    """The mesh all parameters are sharded on: 1-D (``Shard``), or HSDP's 2-D (``Replicate``, ``Shard``)."""
    found: _Mesh | None = None
    mesh_ranks: list[int] | None = None
    for p, name in zip(params, names):
        if not isinstance(p, DTensor):
            raise ValueError(
                f"parameter {name!r} is not sharded (a plain tensor, not a DTensor). Call fully_shard on the root "
                "module too (after the per-layer calls), register that root, and register between steps (not "
                "between a forward and its backward, when FSDP holds unsharded parameters)."
            )
        mesh, placements = p.device_mesh, p.placements
        ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
        if mesh.ndim == 1 and all(pl.is_shard() for pl in placements):
            here = _Mesh(mesh.get_group(0), 0, 1)
        elif mesh.ndim == 2 and placements[0].is_replicate() and placements[1].is_shard():
            if ranks != list(range(dist.get_world_size())):
                raise ValueError(
                    f"parameter {name!r} is on an HSDP mesh of ranks {ranks}, not the whole job's "
                    f"{dist.get_world_size()} ranks; GradVac under HSDP sums the Gramians over the default group, "
                    "so the mesh must span every rank (init_device_mesh(device, (replicas, shards)))."
                )
            replicate = mesh.get_group(0)
            here = _Mesh(dist.group.WORLD, dist.get_rank(replicate), dist.get_world_size(replicate))
        else:
            raise ValueError(
                f"parameter {name!r} is placed {placements} on a {mesh.ndim}-D mesh; GradVac under FSDP2 supports "
                "plain sharding on a 1-D mesh and HSDP (Replicate, Shard) on a 2-D mesh. Tensor or other "
                "parallelism on further mesh dimensions is not supported."
            )
        if found is None:
            found, mesh_ranks = here, ranks
        elif ranks != mesh_ranks or here.replicas != found.replicas or _ranks(here.group) != _ranks(found.group):
            raise ValueError("GradVac under FSDP2 needs all parameters sharded over the same ranks (one mesh).")
    assert found is not None
    return found


def fsdp_backward(model: nn.Module, losses: Sequence[Tensor], sync: bool | None = None) -> None:
    """``gradvac_dist.backward`` for an FSDP2 model: finds the registered handle and runs its step."""
    handle = driver_of(model)
    if not isinstance(handle, FSDPGradVac):
        raise ValueError(
            "gradvac_dist.backward(fsdp_model, losses) needs GradVac registered on this FSDP2 model first: "
            "handle = gradvac_dist.register_fsdp(model, gradvac_dist.GradVacState(num_tasks=m)). Register the root "
            "module (the one you call fully_shard on last)."
        )
    handle.backward(losses, sync)
