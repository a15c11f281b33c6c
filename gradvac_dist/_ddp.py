"""The DDP communication hook and the driving of m backward passes under DDP.

DDP's reducer stops listening after the first backward pass of an iteration (pytorch #47260), so
``gradvac_dist.backward(ddp, losses)`` re-arms it before every pass with the private
``reducer.prepare_for_backward([loss])``. Each pass then fires :func:`gradvac_hook` on every
bucket; the hook stashes that task's reduced bucket, and ``backward`` clears ``.grad`` between
passes, so the next pass holds exactly the next task's local gradient (autograd hands it over, no
addition to zeros). In the last pass the hook holds the buckets' futures open until the last
bucket arrives, then runs the GradVac step once and resolves them all with the aggregated
gradient, which DDP copies into ``param.grad``; a parameter that only earlier tasks reached (DDP
counts it unused in the last pass) gets its columns of that gradient afterwards. What happens
once the last task's pieces exist (Gramians, the one all-reduce, the coefficient stage) is the
engine's (``_engine.py``), shared with the FSDP2 path; this room keeps what is DDP's: bucket plans,
the per-task reductions, the hook, and the driving of the passes.
"""

# No `from __future__ import annotations` here: DDP compares the hook's annotations with
# dist.GradBucket and Future[Tensor] at registration, so they must be real objects.

import enum
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import _grads
from . import _torch_compat as compat
from ._blocks import BlockLayout, Segment, combine, layout_of, segments_of_range
from ._checks import check_loss_count, check_losses, graph_nodes, reject_sparse
from ._comm import (
    CommCounters,
    PendingReduce,
    default_strategy,
    fill_piece_major,
    reduce_scatter_via_all_to_all,
    shard_length,
    start_all_gather,
    start_all_reduce_pending,
    start_reduce_scatter,
    start_reduce_scatter_in_pieces,
    world_of,
)
from ._engine import Driver, Engine, Piece, StepOutcome, agree_on_failure, attach, driver_of
from ._state import GradVacState

__all__ = ["check_ddp_configuration", "ddp_backward", "gradvac_hook", "is_ddp", "register_ddp"]


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, DistributedDataParallel)


def gradvac_hook(state: GradVacState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook running exact GradVac on the rank-mean per-task gradients.

    Register it with ``ddp.register_comm_hook(state, gradvac_hook)`` on a
    ``DistributedDataParallel(model, find_unused_parameters=True)`` and drive each step with
    ``gradvac_dist.backward(ddp, losses)`` (m backward passes, one per task). Per step:

    1. Pass ``i < m-1``, each bucket: divide by the world size W, reduce task ``i``'s bucket
       across ranks asynchronously into the stash (``"replicated"``: all-reduce of the whole
       bucket; ``"sharded"``: reduce-scatter, so each rank keeps a 1/W shard), and return the
       bucket; ``gradvac_dist.backward`` then clears ``.grad``, so that the next pass holds task
       ``i+1``'s gradient alone.
    2. Pass ``m-1``: the same, but the buckets' futures stay open.
    3. At the last bucket of the last pass: wait for the reductions, compute per-block partial
       Gramians ``[K, m, m]`` of the stashed pieces (shards or full buckets), all-reduce them ONCE
       (replicated buckets: each rank contributes the Gramians of its 1/W slice of every bucket,
       so the sum is exact without double counting).
    4. Every rank runs the identical :func:`gradvac_dist.gradvac_step` on the same Gramians with
       the same EMA targets and the same order (drawn from the state's CPU generator).
    5. Each rank combines its piece with the per-block coefficients; ``"sharded"`` all-gathers the
       combined shards; every bucket's future is resolved with the aggregated bucket.

    Communication per step and rank, n parameters, ring algorithms (elements sent):

    - ``"replicated"``: m all-reduces of n: about ``2 m n (W-1)/W``, plus ``K m^2``.
    - ``"sharded"`` (default): m reduce-scatters and one all-gather: about ``(m+1) n (W-1)/W``, plus
      ``K m^2``. On gloo each reduce-scatter is an ``all_to_all_single`` plus a local sum, because
      gloo's own reduce-scatter sends the whole bucket; a large shard goes in up to 4 pipelined
      pieces, which keep a TCP link busy where one large all-to-all does not.

    Both strategies add, before the passes, one all-reduce of ``W`` flags (every rank's input
    checks; the settings at the first step), so that a loss refused on one rank raises on all.

    Memory: the stash holds ``m n`` (replicated) or ``m n / W`` (sharded) elements per rank.

    DDP calls the hook, never user code: its arguments are DDP's.

    Args:
        state: the :class:`~gradvac_dist.GradVacState` given to ``ddp.register_comm_hook``.
        bucket: the ``torch.distributed.GradBucket`` DDP hands over.

    Returns:
        A ``torch.futures.Future`` of the bucket's tensor: in passes before the last, the
        bucket's buffer, not reduced (``.grad`` is cleared after the pass); in the last pass,
        the aggregated GradVac gradient of the bucket, which DDP writes into ``.grad``.

    Raises:
        TypeError: called with something other than a ``GradBucket`` (as an FSDP hook, say).
        RuntimeError: fired outside :func:`gradvac_dist.backward` (a plain ``loss.backward()``
            on the DDP module), or during the backward of another DDP module.

    Example:
        On every rank of a job started by ``torchrun`` (the multi-process examples are in
        ``examples/``; ``task_losses`` stands for the model's m losses)::

            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel
            import gradvac_dist

            dist.init_process_group("gloo")          # or "nccl"
            ddp = DistributedDataParallel(model, find_unused_parameters=True)
            state = gradvac_dist.GradVacState(num_tasks=m, beta=0.5, eps=1e-8, seed=0, grouping="whole")
            ddp.register_comm_hook(state, gradvac_dist.gradvac_hook)
            for x, ys in loader:
                losses = task_losses(ddp(x), ys)     # m scalar losses
                gradvac_dist.backward(ddp, losses)   # m backward passes; the hook does the rest
                optimizer.step()
                optimizer.zero_grad()
    """
    if not isinstance(bucket, dist.GradBucket):
        raise TypeError(
            f"gradvac_hook is a DistributedDataParallel comm hook; it was called with {type(bucket).__name__}. "
            "For FSDP2 use gradvac_dist.register_fsdp(model, state); FSDP1 is unsupported."
        )
    runtime = getattr(state, "_driver", None)
    if not isinstance(runtime, DDPGradVac) or runtime.phase is _Phase.IDLE:
        if _driving is not None and _driving is not runtime:
            raise RuntimeError(
                "gradvac_hook of one DistributedDataParallel module fired during gradvac_dist.backward of another: "
                "the losses reach the parameters of two DDP modules (chained DDP models?). GradVac needs the "
                "per-task gradients of one model: wrap the whole model in one DistributedDataParallel."
            )
        raise RuntimeError(
            "gradvac_hook fired outside gradvac_dist.backward(ddp, losses): a plain loss.backward() cannot run "
            "GradVac, which needs one backward pass per task (or a rank that joined early under ddp.join(), which "
            "GradVac does not support). Call gradvac_dist.backward(ddp, [loss_1, ..., loss_m]) instead; this "
            "step's gradients were not synchronised."
        )
    with state.counters.phase("hook"):
        return runtime.on_bucket(bucket)


def register_ddp(ddp: DistributedDataParallel, state: GradVacState) -> GradVacState:
    """Registers :func:`gradvac_hook` with ``state`` on ``ddp``, once; returns the registered state.

    The same as ``ddp.register_comm_hook(state, gradvac_hook)``, for code that cannot know whether a
    framework registered it already (PyTorch Lightning's ``DDPStrategy(ddp_comm_hook=...)`` does on
    CUDA only): calling it again with the same state does nothing. Call it once the framework has
    wrapped the model (Lightning: in ``on_fit_start``, ``self.trainer.strategy.model``).

    Args:
        ddp: the ``DistributedDataParallel`` module.
        state: the :class:`~gradvac_dist.GradVacState` to register :func:`gradvac_hook` with.

    Returns:
        ``state``, registered on ``ddp``.

    Raises:
        ValueError: ``ddp`` is not a DistributedDataParallel module, or it has another comm hook, or
            gradvac_hook with another state.
        TypeError: ``state`` is not a :class:`~gradvac_dist.GradVacState`.

    Example:
        In a PyTorch Lightning module with manual optimization, trained with
        ``Trainer(strategy=DDPStrategy(find_unused_parameters=True))`` (the whole recipe:
        ``examples/lightning_train.py``)::

            def on_fit_start(self):   # the first hook where strategy.model is the DDP module
                gradvac_dist.register_ddp(self.trainer.strategy.model, self.gradvac)

            def training_step(self, batch, batch_idx):
                losses = task_losses(self.net(batch[0]), batch[1])
                gradvac_dist.backward(self.trainer.strategy.model, losses)   # not manual_backward
                self.optimizers().step()
                self.optimizers().zero_grad()

        Calling it again with the same state returns it and changes nothing; with another state
        it raises ``ValueError``.
    """
    if not isinstance(ddp, DistributedDataParallel):
        raise ValueError(
            f"register_ddp needs the DistributedDataParallel module, got a {type(ddp).__name__} (with Lightning: "
            "self.trainer.strategy.model, once the strategy has wrapped the model, e.g. in on_fit_start)."
        )
    if not isinstance(state, GradVacState):
        raise TypeError(f"register_ddp(ddp, state): state must be a gradvac_dist.GradVacState, got {state!r}.")
    compat.check_ddp(ddp)
    registered = compat.hook_states(ddp, gradvac_hook)
    if registered:
        if registered[0] is not state:
            raise ValueError(
                "gradvac_hook is already registered on this DDP module with another GradVacState; use that one "
                "(DDP takes one comm hook per module)."
            )
        return state
    if compat.has_comm_hook(ddp):
        raise ValueError(
            "this DDP module has another comm hook already (DDP takes one per module); GradVac's hook reduces the "
            "gradients itself, so register gradvac_hook alone."
        )
    ddp.register_comm_hook(state, gradvac_hook)
    return state


class _BucketPlan:
    """Where a bucket's columns go: its segments, this rank's piece of it, and its stash."""

    __slots__ = (
        "buffer",
        "full_segments",
        "future",
        "gram_segments",
        "length",
        "param_ids",
        "param_segments",
        "params_in_bucket",
        "pieces",
        "recv",
        "result",
        "scratch",
        "shard",
        "shard_segments",
        "sharded",
        "stash",
        "works",
    )

    def __init__(
        self,
        bucket: dist.GradBucket,
        index_of: dict[int, tuple[int, int]],
        m: int,
        rank: int,
        world: int,
        sharded: bool,
        all_to_all: bool,
    ) -> None:
        params = bucket.parameters()
        self.param_ids = tuple(id(p) for p in params)
        segments: list[Segment] = []
        by_param: list[Segment] = []
        start = 0
        for p in params:
            block, index = index_of[id(p)]
            segments.append((block, start, start + p.numel()))
            by_param.append((index, start, start + p.numel()))
            start += p.numel()
        buf = bucket.buffer()
        self.length = buf.numel()
        assert start == self.length, "bucket buffer must be the concatenation of its parameters' gradients"
        # adjacent parameters of one block merged: the combine is one matrix product per run, not per parameter
        self.full_segments = segments_of_range(segments, 0, self.length)
        self.params_in_bucket = by_param
        shard = shard_length(self.length, world)
        lo = min(rank * shard, self.length)
        hi = min(lo + shard, self.length)
        # This rank's 1/W slice of the bucket: the piece whose partial Gramians it contributes
        # (with either strategy, so the all-reduced sum counts every column exactly once).
        self.shard = (lo, hi)
        self.gram_segments = segments_of_range(segments, lo, hi)
        # (parameter index, start, stop) of the slice: used only to name a non-finite parameter
        self.param_segments = [(i, max(a, lo) - lo, min(b, hi) - lo) for i, a, b in by_param if max(a, lo) < min(b, hi)]
        self.shard_segments = list(self.gram_segments)
        if hi - lo < shard:
            self.shard_segments.append((-1, hi - lo, shard))  # padding columns: zeros
        if sharded:
            self.stash = torch.zeros((m, shard), dtype=buf.dtype, device=buf.device)
            self.scratch = torch.zeros(shard * world, dtype=buf.dtype, device=buf.device)
            self.recv = torch.empty_like(self.scratch) if all_to_all else None
            # all-to-all reduce-scatters of large shards go in pipelined pieces (see start_reduce_scatter_in_pieces)
            self.pieces = _pieces(shard) if all_to_all else [(0, shard)]
        else:
            self.stash = torch.zeros((m, self.length), dtype=buf.dtype, device=buf.device)
            self.scratch = self.recv = None
            self.pieces = []
        self.works: list[PendingReduce | None] = [None] * m
        self.future: torch.futures.Future[Tensor] | None = None
        self.buffer: Tensor | None = None  # the bucket's buffer in the last pass, until the step resolves it
        self.result: Tensor | None = None  # the aggregated bucket, from the step until the passes end
        self.sharded = sharded

    def own_columns(self) -> Tensor:
        """``[m, shard]``: the stashed task gradients of this rank's 1/W slice of the bucket."""
        return self.stash if self.sharded else self.stash[:, self.shard[0] : self.shard[1]]


#: The DDP runtime whose passes are running (a plain global: hooks may run on autograd's device
#: threads, which a context variable would not reach).
_driving: "DDPGradVac | None" = None


class _Phase(enum.Enum):
    """Where a DDP step is; the hook's behaviour depends on it."""

    IDLE = "idle"  # between steps: a hook call now comes from a plain loss.backward()
    PASSES = "passes"  # inside gradvac_dist.backward's m passes
    DONE = "done"  # the last bucket of the last pass has run the step


class DDPGradVac(Driver):
    """GradVac attached to a DDP module at its first step (``state._driver``): the transport.

    Bucket plans, the per-task reductions the hook starts, the step at the last bucket, and the
    bookkeeping of the m passes; accumulation under ``no_sync`` is :class:`_MicroBatches`', and
    every ``.grad`` write is ``_grads``'."""

    def __init__(self, state: GradVacState, ddp: DistributedDataParallel) -> None:
        super().__init__(ddp, state)
        group = state.process_group
        self.rank, self.world = world_of(group)
        # One rank: nothing to reduce, and both strategies are a copy into the stash.
        self.strategy = "replicated" if self.world == 1 else state.strategy or default_strategy(group)
        self.all_to_all = reduce_scatter_via_all_to_all(group)
        # Every parameter DDP manages, frozen ones too: DDP built its buckets from the parameters that
        # required grad at its construction, and one frozen since then is still in a bucket (it gets no
        # gradient, lies outside every block, and its .grad stays None).
        params = compat.ddp_parameters(ddp)
        names = {id(p): n for n, p in ddp.module.named_parameters()}
        param_names = [names.get(id(p), f"param{i}") for i, p in enumerate(params)]
        reject_sparse(ddp.module, params, param_names)
        self.trainable = tuple(p.requires_grad for p in params)
        self.layout: BlockLayout = _with_frozen(
            layout_of(ddp.module, [p for p in params if p.requires_grad], state.grouping, state.shared_params),
            params,
        )
        self.engine = Engine(state, group, self.layout, param_names, self.strategy)
        self.index_of = {id(p): (b, i) for i, (p, b) in enumerate(zip(params, self.layout.param_blocks))}
        self.plans: dict[int, _BucketPlan] = {}
        self.phase = _Phase.IDLE
        self.task = 0
        self.buckets_seen: list[int] = []
        self.num_buckets: int | None = None
        self.outcome: StepOutcome | None = None
        self.params = params
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        # A parameter's columns in a bucket follow its memory layout, not its logical order: DDP views
        # a dense parameter's bucket slice with the parameter's strides (channels_last included), and
        # so must everything that moves gradients between a flat slice and a parameter.
        self.grad_strides = [torch.empty_like(p, device="meta").stride() for p in params]
        #: parameters that got a gradient in an earlier pass of this step (see clear_grads)
        self.reached = [False] * len(params)
        self.micro_batches = _MicroBatches(self)
        #: whether the first step's losses were checked for a second DDP module in their graph
        self.graph_checked = False

    def buffer_bytes(self) -> dict[str, int]:
        plans = self.plans.values()
        if not plans:
            return {}
        scratch = [t for p in plans for t in (p.scratch, p.recv) if t is not None]
        return {
            "stash": sum(p.stash.numel() * p.stash.element_size() for p in plans),
            "scratch": sum(t.numel() * t.element_size() for t in scratch),
        }

    # -- driving, called by ddp_backward -------------------------------------------------------
    def begin_pass(self, task: int) -> None:
        self.task = task
        self.buckets_seen = []
        self.phase = _Phase.PASSES
        if task == 0:
            self.outcome = None
            self.reached = [False] * len(self.params)

    def end_pass(self) -> None:
        if self.num_buckets is None:
            self.num_buckets = len(self.buckets_seen)
        if self.buckets_seen != list(range(self.num_buckets)):
            raise RuntimeError(
                f"gradvac_hook saw buckets {self.buckets_seen} in pass {self.task}, expected 0..{self.num_buckets - 1}; "
                "DDP did not reduce every bucket in this pass (was the reducer prepared? is static_graph on?)."
            )

    def flat_view(self, flat: Tensor, index: int) -> Tensor:
        """Parameter ``index``'s columns of a flat ``[n]`` row laid out like its bucket slice, as its shape."""
        return self.as_param(flat[self.offsets[index] : self.offsets[index + 1]], index)

    def as_param(self, columns: Tensor, index: int) -> Tensor:
        """Parameter ``index``'s flat columns (in bucket layout) viewed as its shape, with its strides."""
        return columns.as_strided(self.params[index].shape, self.grad_strides[index])

    def clear_grads(self) -> None:
        """Between passes: each ``.grad`` DDP wrote goes (its task's gradient is in the stash), so the next
        pass's autograd hands its fresh gradient over instead of adding it to zeros (one read and write
        of n less per pass), and the parameters that had a gradient are remembered (see fill_reached).

        The record agrees across ranks: DDP writes ``.grad`` after a pass for every parameter that ANY
        rank reached in it (its used-parameter map is all-reduced), so a branch taken on one rank only
        is recorded on all of them."""
        _grads.clear(self.params, self.reached)

    def fill_reached(self) -> None:
        """After the last pass: a parameter an earlier task reached but the last one did not gets no
        ``.grad`` from DDP (with no gradient in the last pass it counts as unused); it gets its columns
        of the aggregated bucket here, as it would have with a gradient of zeros held over."""
        reached = self.reached
        missing = {i for i, p in enumerate(self.params) if reached[i] and p.grad is None}
        if not missing:
            return
        for plan in self.plans.values():
            if plan.result is None:
                continue
            # Runs of adjacent missing parameters are copied at once (the heads of every task but the
            # last, as a rule), each parameter's .grad a view of its run's copy with its own strides.
            runs: list[list[tuple[int, int, int]]] = []
            for index, start, stop in plan.params_in_bucket:
                if index not in missing:
                    continue
                if runs and runs[-1][-1][2] == start:
                    runs[-1].append((index, start, stop))
                else:
                    runs.append([(index, start, stop)])
            for run in runs:
                base = run[0][1]
                copy = plan.result[base : run[-1][2]].clone()
                for index, start, stop in run:
                    _grads.put(self.params[index], self.as_param(copy[start - base : stop - base], index))

    def disarm(self) -> None:
        """Ends a synchronised step, finished or failed: open futures and accumulated micro-batches go."""
        self.phase = _Phase.IDLE
        self.micro_batches.reset()
        for plan in self.plans.values():
            plan.future = plan.result = None

    # -- the hook --------------------------------------------------------------------------------
    def plan(self, bucket: dist.GradBucket) -> _BucketPlan:
        index = bucket.index()
        plan = self.plans.get(index)
        # DDP changes its buckets only in a forward (its one-time rebuild), never between the passes
        # of a step: the bucket's parameters are compared in the first pass only (a list of them costs
        # more than the rest of the bookkeeping).
        if plan is None or (self.task == 0 and plan.param_ids != tuple(id(p) for p in bucket.parameters())):
            m = self.state.num_tasks
            plan = _BucketPlan(
                bucket, self.index_of, m, self.rank, self.world, self.strategy == "sharded", self.all_to_all
            )
            self.plans[index] = plan
        return plan

    def on_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        index = bucket.index()
        self.buckets_seen.append(index)
        plan = self.plan(bucket)
        task, m = self.task, self.state.num_tasks
        group, counters = self.state.process_group, self.state.counters
        buf = bucket.buffer()
        self.micro_batches.add_into(buf, plan, task)
        if self.world == 1:
            plan.stash[task].copy_(buf)
        elif self.strategy == "sharded":
            if task > 0:
                prev = plan.works[task - 1]
                if prev is not None:
                    prev.wait()  # the scratch (and receive) buffers are reused for this task
            if plan.recv is not None and len(plan.pieces) > 1:
                fill_piece_major(plan.scratch, buf, self.world, plan.stash.shape[1], plan.pieces)
                plan.works[task] = start_reduce_scatter_in_pieces(
                    plan.stash[task], plan.scratch, plan.recv, plan.pieces, group, counters, "task_reduce_scatter"
                )
            else:
                torch.div(buf, self.world, out=plan.scratch[: plan.length])
                plan.works[task] = start_reduce_scatter(
                    plan.stash[task], plan.scratch, plan.recv, group, counters, "task_reduce_scatter"
                )
        else:
            torch.div(buf, self.world, out=plan.stash[task])
            plan.works[task] = start_all_reduce_pending(plan.stash[task], group, counters, "task_all_reduce")
        fut: torch.futures.Future[Tensor] = torch.futures.Future()
        if task < m - 1:
            # DDP copies this task's gradient into .grad, which ddp_backward clears before the next pass
            fut.set_result(buf)
            return fut
        plan.future, plan.buffer = fut, buf
        if bucket.is_last():
            with counters.phase("step"):
                self._finish_step()
        return fut

    def _finish_step(self) -> None:
        """The step, at the last bucket of the last pass: the engine's part, then combine and resolve."""
        counters, m = self.state.counters, self.state.num_tasks
        plans = [self.plans[i] for i in self.buckets_seen]
        for plan in plans:  # the earlier tasks' reductions (long done, as a rule)
            for work in plan.works[: m - 1]:
                if work is not None:
                    work.wait()

        def wait_last() -> None:  # the last task's, started by this pass: the engine waits late
            for plan in plans:
                work = plan.works[m - 1]
                if work is not None:
                    work.wait()
                plan.works = [None] * m

        # Each rank's pieces: its 1/W slice of every bucket (the whole reduced shard when sharded), so
        # that the all-reduced Gramians count every column exactly once.
        pieces = [Piece(plan.own_columns(), plan.gram_segments, plan.param_segments) for plan in plans]
        in_flight = any(plan.works[m - 1] is not None for plan in plans)  # none on one rank
        outcome = self.engine.step(pieces, wait_last if in_flight else None)
        with counters.phase("combine"):
            self._combine_and_resolve(plans, outcome.coefficients, [p.buffer for p in plans])
        self.outcome = outcome
        self.phase = _Phase.DONE

    def _combine_and_resolve(self, plans: list[_BucketPlan], coef: Tensor, buffers: list[Tensor]) -> None:
        group, counters = self.state.process_group, self.state.counters
        if self.strategy == "sharded":
            # Combine and all-gather in pieces, so that each piece travels while the next is combined.
            pending = []
            for plan in plans:
                shard = plan.stash.shape[1]
                works = []
                for lo, hi in _pieces(shard):
                    combined = combine(plan.stash[:, lo:hi], coef, segments_of_range(plan.shard_segments, lo, hi))
                    outputs = [plan.scratch[r * shard + lo : r * shard + hi] for r in range(self.world)]
                    works.append(start_all_gather(outputs, combined, group, counters, "result_all_gather"))
                pending.append((plan, works))
            for plan, works in pending:
                for work in works:
                    work.wait()
                self._resolve(plan, plan.scratch[: plan.length])
        else:  # into the bucket's own buffer, which DDP copies into .grad: no n-sized allocation a step
            for plan, buf in zip(plans, buffers):
                self._resolve(plan, combine(plan.stash, coef, plan.full_segments, out=buf))

    def _resolve(self, plan: _BucketPlan, value: Tensor) -> None:
        fut, plan.future, plan.buffer = plan.future, None, None
        assert fut is not None, "every bucket of the last pass must have an open future"
        plan.result = value
        fut.set_result(value)


class _MicroBatches:
    """Gradient accumulation under ``ddp.no_sync()``: each task's local gradient of every micro-batch,
    summed with no communication, then added into that task's buckets at the step's passes."""

    __slots__ = ("driver", "pending")

    def __init__(self, driver: "DDPGradVac") -> None:
        self.driver = driver
        self.pending: Tensor | None = None  # [m, n] local per-task sums, in bucket layout

    def reset(self) -> None:
        self.pending = None

    def accumulate(self, losses: Sequence[Tensor]) -> None:
        """Adds each task's local gradient of a micro-batch to ``pending`` (no hook fires)."""
        driver, m = self.driver, len(losses)
        if self.pending is None:
            first = driver.params[0]
            self.pending = torch.zeros((m, driver.offsets[-1]), dtype=first.dtype, device=first.device)
        trainable = [i for i, t in enumerate(driver.trainable) if t]
        params = [driver.params[i] for i in trainable]
        for task, loss in enumerate(losses):
            task_grads = torch.autograd.grad(loss, params, retain_graph=task < m - 1, allow_unused=True)
            for i, g in zip(trainable, task_grads):
                if g is not None:
                    driver.flat_view(self.pending[task], i).add_(g)

    def add_into(self, buf: Tensor, plan: _BucketPlan, task: int) -> None:
        """Adds task ``task``'s pending sums of the bucket's parameters into its buffer (same layout)."""
        if self.pending is None:
            return
        offsets = self.driver.offsets
        for index, start, stop in plan.params_in_bucket:
            buf[start:stop].add_(self.pending[task, offsets[index] : offsets[index + 1]])


#: Shards of at least twice this many elements are combined and all-gathered in pieces of about this
#: size (at most 4), so the all-gather of one piece overlaps the combine of the next.
PIPELINE_PIECE = 1 << 18


def _pieces(length: int) -> list[tuple[int, int]]:
    count = max(1, min(4, length // PIPELINE_PIECE))
    bounds = [length * i // count for i in range(count + 1)]
    return list(itertools.pairwise(bounds))


def _with_frozen(layout: BlockLayout, params: Sequence[nn.Parameter]) -> BlockLayout:
    """``layout`` (of the trainable parameters) extended to all of ``params``, frozen ones outside every block."""
    blocks = iter(layout.param_blocks)
    return BlockLayout(
        tuple(p.numel() for p in params),
        tuple(next(blocks) if p.requires_grad else -1 for p in params),
        layout.num_blocks,
        layout.names,
    )


def _find_state(ddp: DistributedDataParallel) -> GradVacState:
    hooks = compat.hook_states(ddp, gradvac_hook)
    if not hooks:
        raise ValueError(
            "gradvac_dist.backward(ddp, losses) needs gradvac_hook registered on this DDP module: "
            "ddp.register_comm_hook(gradvac_dist.GradVacState(num_tasks=m), gradvac_dist.gradvac_hook)."
        )
    state = hooks[0]
    if not isinstance(state, GradVacState):
        raise TypeError(f"gradvac_hook was registered with a {type(state).__name__}; pass a gradvac_dist.GradVacState.")
    return state


def _bind(ddp: DistributedDataParallel) -> DDPGradVac:
    """The first step of a DDP module: finds its state, checks the configuration, attaches a runtime.

    A rank that fails here still takes part in the rank agreement (see ``_agreement.py``), so that
    every rank raises rather than some waiting in a collective for a rank that stopped.
    """
    state: GradVacState | None = None
    try:
        state = _find_state(ddp)
        check_ddp_configuration(ddp)
        runtime = DDPGradVac(state, ddp)
        attach(ddp, runtime)
    except (ValueError, TypeError, RuntimeError) as err:
        group = state.process_group if state is not None else None
        agree_on_failure(err, group, state.counters if state is not None else CommCounters())
        raise  # agree_on_failure raised already; for the type checker
    return runtime


def check_ddp_configuration(ddp: DistributedDataParallel) -> None:
    """Refuses DDP settings under which several backward passes desynchronise silently."""
    if not getattr(ddp, "find_unused_parameters", False):
        raise ValueError(
            "GradVac under DDP needs DistributedDataParallel(..., find_unused_parameters=True): each task's backward "
            "pass reaches only part of the model, and DDP must be told which parameters a pass did not reach."
        )
    if getattr(ddp, "static_graph", False):
        raise ValueError(
            "GradVac under DDP cannot run with static_graph=True: DDP then skips or desynchronises the reductions of "
            "the second and later backward passes. Construct DistributedDataParallel with static_graph=False."
        )
    compat.check_ddp(ddp)


def _refuse_other_ddp_modules(ddp: nn.Module, losses: Sequence[Tensor]) -> None:
    """At the first step: the losses must not also come through another DDP module's forward (chained
    DDP models), whose reducer would reduce only the first of the m passes. One walk of the graph."""
    for node in graph_nodes(losses):
        other = compat.ddp_of_sink(node)
        if other is not None and other is not ddp:
            raise ValueError(
                "the losses also come through the forward of another DistributedDataParallel module (chained DDP "
                "models): its reducer would synchronise only the first of GradVac's m backward passes, leaving its "
                "parameters' gradients different on every rank. Wrap the whole model in one DistributedDataParallel."
            )


def _check_step(runtime: DDPGradVac, losses: Any, sync: bool | None, wrapper_sync: bool) -> tuple[list[Tensor], bool]:
    """This step's input checks, each once: the losses, the trainable set, the sync switch; the
    checked losses and whether the step synchronises."""
    losses = check_losses(losses)
    if not runtime.graph_checked:  # the first step's losses: one walk of the graph
        _refuse_other_ddp_modules(runtime.module, losses)
        runtime.graph_checked = True
    if tuple(p.requires_grad for p in runtime.params) != runtime.trainable:
        changed = [
            n for n, p, t in zip(runtime.engine.param_names, runtime.params, runtime.trainable) if p.requires_grad != t
        ]
        raise ValueError(
            f"parameters {changed[:5]} were frozen or unfrozen after the first GradVac step: the blocks and DDP's "
            "buckets were built for the trainable parameters then. Change requires_grad before wrapping the model, "
            "or build a new DistributedDataParallel and GradVacState after changing it."
        )
    sync = wrapper_sync if sync is None else bool(sync)
    if sync != wrapper_sync:
        if sync:
            raise ValueError(
                "backward(ddp, losses, sync=True) inside `with ddp.no_sync():` contradicts no_sync: leave sync unset "
                "(it follows no_sync), and run the step that synchronises outside no_sync."
            )
        raise ValueError(
            "backward(ddp, losses, sync=False) accumulates a micro-batch without communication and must run "
            "inside `with ddp.no_sync():` (around the forward and this call), as any DDP gradient accumulation."
        )
    check_loss_count(len(losses), runtime.state.num_tasks)
    return losses, sync


def ddp_backward(ddp: DistributedDataParallel, losses: Any, sync: bool | None = None) -> None:
    """Runs one backward pass per task through the DDP reducer; the hook does the rest.

    Inside ``ddp.no_sync()`` (``sync`` left ``None``, or ``False``): accumulate each task's local
    gradient of this micro-batch, no communication; the next step outside ``no_sync`` adds it to
    its buckets. An existing ``.grad`` is kept and the aggregated gradient is added to it.
    """
    if compat.join_enabled(ddp):
        raise ValueError(
            "GradVac does not support ddp.join() (uneven inputs): a rank that has joined imitates one backward pass "
            "per step, while GradVac runs m. Give every rank the same number of batches (e.g. "
            "DistributedSampler(..., drop_last=True)) and leave join() out."
        )
    runtime = driver_of(ddp)
    if not isinstance(runtime, DDPGradVac):
        runtime = _bind(ddp)
    # This step's input checks. At a synchronising step every rank learns whether every rank's passed
    # (Engine.agree), so a bad input on one rank (a task with no samples there returning a constant)
    # raises on all of them instead of leaving the others waiting in the passes.
    wrapper_sync = bool(ddp.require_backward_grad_sync)
    losses, sync = runtime.engine.checked(
        lambda: _check_step(runtime, losses, sync, wrapper_sync), lambda checked: len(checked[0]), wrapper_sync
    )
    if not sync:
        runtime.micro_batches.accumulate(losses)
        return
    m = runtime.state.num_tasks
    # With gradient_as_bucket_view an existing .grad is a view of a bucket the passes overwrite: copied.
    prior = _grads.set_aside(runtime.params, copy=bool(getattr(ddp, "gradient_as_bucket_view", False)))
    global _driving
    done = False
    try:
        _driving = runtime
        for task, loss in enumerate(losses):
            runtime.begin_pass(task)
            compat.prepare_for_backward(ddp, loss)
            loss.backward(retain_graph=task < m - 1)
            runtime.end_pass()
            if task < m - 1:
                runtime.clear_grads()
        if runtime.phase is not _Phase.DONE or runtime.outcome is None:
            raise RuntimeError("the last backward pass did not complete the GradVac step (no last bucket seen).")
        runtime.fill_reached()
        done = True
    finally:
        _driving = None
        runtime.disarm()
        (_grads.add_back if done else _grads.put_back)(runtime.params, prior)
    runtime.engine.finish(runtime.outcome)
