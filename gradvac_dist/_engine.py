"""The distributed step every transport shares, once its per-task pieces exist.

A transport (the DDP hook in ``_ddp.py``, the FSDP2 path in ``_fsdp.py``) turns m backward passes
into *pieces*: on each rank, ``[m, L]`` slices of the rank-mean per-task gradients (a rank's slice
of a DDP bucket, its FSDP2 local shards), chosen so that across all ranks and pieces every
parameter element is counted exactly once. From there a step is the same whatever the transport:

1. partial Gramians ``[K, m, m]`` of the local pieces, per block, accumulated in float64, and per
   task the sum of the columns outside every block (only to detect inf/NaN there);
2. ONE all-reduce (SUM) of those ``K*m*m + m`` numbers: the Gramians of the rank-mean per-task
   gradients (Gramians of the pieces of a vector add up), identical on every rank;
3. the coefficient stage: if all is finite, the state's trajectory advances on every rank from the
   same Gramians, targets and order generator, giving per-block coefficients ``c[k, l]``; if not,
   the state is left untouched, the coefficients are all ones (the plain sum) and the task and
   parameter that are not finite are named (one more all-reduce, on that path only);
4. the transport combines each piece, ``sum_l c[k, l] piece[l]`` per block, and puts it in place.

:class:`Engine` runs steps 1-3 and the bookkeeping after a step (:meth:`Engine.finish`).
:class:`Driver` is the one typed link between a model and the :class:`~gradvac_dist.GradVacState`
that drives it; :func:`attach`, :func:`driver_of` and :func:`detach` keep it, in both directions.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._agreement import (
    CHANNELS,
    Kind,
    Setting,
    check_agreement,
    check_step_inputs,
    fingerprint_agrees,
    fingerprint_bits,
    payload_size,
    write_fingerprint,
)
from ._blocks import GROUPINGS, BlockLayout, Segment, gramian_row, partial_gramians
from ._comm import STRATEGIES, CommCounters, all_reduce_sum, collective_device, differing_entries, world_of
from ._errors import ON_NONFINITE, NonFiniteGradientError, first_nonfinite, nonfinite_flags, nonfinite_message
from ._state import GradVacState
from ._weighting import weighting_name

__all__ = [
    "AGREEMENT_ENTRIES",
    "Driver",
    "Engine",
    "Piece",
    "StepOutcome",
    "agree_on_failure",
    "attach",
    "check_in_sync",
    "detach",
    "driver_of",
    "drivers",
    "settings",
]

_T = TypeVar("_T")

#: Where the coefficient stage runs: on the host below this many Gramian entries (K*m*m), on the
#: pieces' device at or above it. The stage is m-1 sequential visits of about a dozen element-wise
#: ops each on [K, m] tensors: on an accelerator each op is a kernel launch (a fixed cost, whatever
#: the size), on the host a small op costs less than a launch but grows with K*m*m (host timings:
#: docs/design.md, "Thresholds"). The step needs the host anyway for its one synchronisation (the
#: finiteness decision), so small problems avoid dozens of launches and large ones keep their
#: arithmetic on the accelerator. On the CPU (gloo) host and device are the same.
DEVICE_STAGE_MIN_ENTRIES = 1 << 15


class Piece(NamedTuple):
    """A rank's ``[m, L]`` slice of the per-task gradients and where its columns belong.

    Attributes:
        data: ``[m, L]``, row ``i`` is task ``i``'s (rank-mean) gradient on these columns.
        segments: ``(block, start, stop)`` of the columns that count; block ``-1``: outside every
            block (summed plainly, only checked for inf/NaN). Columns in no segment (padding) are
            ignored.
        params: ``(parameter index, start, stop)`` of the columns, used only to name a parameter
            whose gradient is not finite.
    """

    data: Tensor
    segments: Sequence[Segment]
    params: Sequence[tuple[int, int, int]]


class StepOutcome(NamedTuple):
    """What :meth:`Engine.step` decided.

    Attributes:
        coefficients: ``[K, m]`` float64 on the pieces' device (all ones, the plain sum, when the
            step was refused).
        nonfinite: the error naming a non-finite task gradient, or ``None``. The state was left
            untouched when it is set.
        desync: the error saying that the ranks' trajectories differ (the per-step fingerprint),
            or ``None``; always raised. The state was left untouched when it is set.
    """

    coefficients: Tensor
    nonfinite: NonFiniteGradientError | None
    desync: RuntimeError | None = None


#: Strategies as the rank agreement names them: DDP's two, and FSDP2's own reduce-scatter.
_STRATEGY_NAMES = (*STRATEGIES, "fsdp2")


def settings(
    state: GradVacState | None,
    strategy: str,
    layout: BlockLayout | None,
    param_names: Sequence[str],
    num_losses: int,
) -> list[Setting]:
    """What every rank must hold identically, in a fixed order of fixed kinds (values may be placeholders)."""
    s = state.settings if state is not None else None
    traj = state.trajectory if state is not None else None
    acted = () if layout is None else tuple(n for n, b in zip(param_names, layout.param_blocks) if b >= 0)
    targets = None if traj is None or traj.targets is None else traj.targets.detach().cpu()
    return [
        Setting("num_tasks", Kind.INT, s.num_tasks if s else 0),
        Setting("number of losses passed to backward", Kind.INT, num_losses),
        Setting("grouping", Kind.CHOICE, s.grouping if s else None, GROUPINGS),
        Setting("strategy", Kind.CHOICE, strategy, _STRATEGY_NAMES),
        Setting("beta", Kind.FLOAT, s.beta if s else 0.0),
        Setting("eps", Kind.FLOAT, s.eps if s else 0.0),
        Setting("seed", Kind.INT, s.seed if s else 0),
        Setting("on_nonfinite", Kind.CHOICE, s.on_nonfinite if s else None, ON_NONFINITE),
        Setting("check_sync_every", Kind.INT, (s.check_sync_every or 0) if s else 0),
        Setting("coefficient stage (weighting)", Kind.DIGEST, weighting_name(s.weighting) if s else ""),
        Setting("trainable parameters", Kind.INT, len(param_names)),
        Setting("trainable elements", Kind.INT, sum(layout.numels) if layout else 0),
        Setting("parameters GradVac acts on (shared_params)", Kind.DIGEST, acted),
        Setting("number of parameters GradVac acts on", Kind.INT, len(acted)),
        Setting("number of blocks", Kind.INT, layout.num_blocks if layout else 0),
        Setting("block sizes", Kind.DIGEST, layout.block_sizes if layout else ()),
        Setting("step count", Kind.INT, traj.step if traj else 0),
        Setting("order generator state", Kind.DIGEST, bytes(traj.generator.get_state().numpy()) if traj else b""),
        Setting("EMA targets", Kind.DIGEST, b"" if targets is None else bytes(targets.numpy().tobytes())),
    ]


#: Entries of the rank-agreement payload: fixed by the code, whatever the values.
AGREEMENT_ENTRIES = payload_size(settings(None, "sharded", None, (), 0))


def agree_on_failure(error: BaseException, group: dist.ProcessGroup | None, counters: CommCounters) -> None:
    """This rank could not set GradVac up: takes part in the agreement all the same, then raises ``error``."""
    check_agreement(None, AGREEMENT_ENTRIES, group, counters, local_error=error)


class Engine:
    """Steps 1-3 of a distributed GradVac step (module docstring) for one state and one model.

    Args:
        state: the :class:`~gradvac_dist.GradVacState` whose trajectory advances.
        group: the process group the Gramians are summed over (every rank holding a piece).
        layout: the model's :class:`BlockLayout` (global block sizes: rank- and
            world-size-independent), compared across ranks and checked at every step.
        param_names: the names of the trainable parameters, by parameter index, for errors.
        strategy: how the pieces were made (``"sharded"``, ``"replicated"`` or ``"fsdp2"``), for the
            rank agreement.
    """

    __slots__ = (
        "agreed",
        "block_sizes",
        "fingerprint_bits",
        "group",
        "layout",
        "num_blocks",
        "param_names",
        "state",
        "steps_driven",
        "strategy",
        "world",
    )

    def __init__(
        self,
        state: GradVacState,
        group: dist.ProcessGroup | None,
        layout: BlockLayout,
        param_names: Sequence[str],
        strategy: str,
    ) -> None:
        self.state = state
        self.group = group
        self.layout = layout
        self.block_sizes = layout.block_sizes
        self.num_blocks = layout.num_blocks
        self.param_names = list(param_names)
        self.strategy = strategy
        self.world = world_of(group)[1]
        self.fingerprint_bits = fingerprint_bits(self.world)
        #: whether the rank agreement was proven (at the first synchronising step)
        self.agreed = False
        #: steps completed through this engine; equal on every rank (unlike a corrupted step count)
        self.steps_driven = 0

    def agree(self, num_losses: int, local_error: BaseException | None = None, *, remember: bool = True) -> None:
        """Before a synchronising step's passes: raises on every rank unless every rank can run it.

        At the first synchronising step, proves that every rank holds the same settings and
        trajectory (one all-reduce of :data:`AGREEMENT_ENTRIES` numbers); at later steps, that
        every rank's inputs passed their checks (one all-reduce of W flags, read on the host). In
        micro-batches that accumulate without communication, nothing. ``local_error``: this rank's
        inputs failed a check; it is raised here after the collective, and the other ranks raise
        too, so no rank waits for another in the passes. ``remember=False`` checks without counting
        it as done (at FSDP2 registration, before any loss exists).

        A ``load_state_dict`` later changes only the trajectory, which the per-step fingerprint
        covers at the next step: no collective is tied to a load, so a load made on some ranks only
        is reported, never turned into mismatched collectives.
        """
        if self.world == 1:
            if local_error is not None:
                raise local_error
            return
        if remember and self.agreed:
            check_step_inputs(local_error, self.group, self.state.counters)
            return
        mine = (
            None
            if local_error is not None
            else settings(self.state, self.strategy, self.layout, self.param_names, num_losses)
        )
        check_agreement(mine, AGREEMENT_ENTRIES, self.group, self.state.counters, local_error=local_error)
        self.agreed = self.agreed or remember

    def checked(self, check: Callable[[], _T], num_losses: Callable[[_T], int], synchronising: bool) -> _T:
        """Runs a step's input checks (``check``, which raises on a bad input) and returns its result; at a
        synchronising step every rank then learns whether every rank's passed (:meth:`agree`)."""
        error: Exception | None = None
        try:
            result = check()
        except (ValueError, TypeError, RuntimeError) as err:
            error = err
        if synchronising:
            self.agree(num_losses(result) if error is None else 0, error)
        elif error is not None:
            raise error
        return result

    def step(self, pieces: Sequence[Piece], wait_last: Callable[[], None] | None = None) -> StepOutcome:
        """Gramians of the pieces, the one all-reduce, and the coefficient stage.

        ``wait_last``: the last task's rows of the pieces are still arriving (its reduction in
        flight); the Gramian entries of the other tasks are computed first, while it travels, then
        ``wait_last()`` is called and the last row added (the same entries, in the same chunked
        arithmetic, whichever order they come in).
        """
        state, counters = self.state, self.state.counters
        m, num_blocks = state.num_tasks, self.num_blocks
        assert pieces, "every rank holds at least one piece (possibly with no columns)"
        device = pieces[0].data.device
        size = num_blocks * m * m + m
        buf = torch.zeros(size + 2 * CHANNELS, dtype=torch.float64, device=device)
        gram = buf[: num_blocks * m * m].view(num_blocks, m, m)
        outside = buf[num_blocks * m * m : size]
        traj = state.trajectory
        if self.world > 1:  # one rank has no one to disagree with: its channels stay 0, which agree
            write_fingerprint(buf[size:], traj.targets, traj.generator, traj.step, self.fingerprint_bits)
        with counters.phase("gramians"):
            if wait_last is None or m == 1:
                if wait_last is not None:
                    wait_last()
                for piece in pieces:
                    partial_gramians(piece.data, piece.segments, num_blocks, out=gram)
            else:
                for piece in pieces:  # tasks 0..m-2, while the last task's reduction travels
                    partial_gramians(piece.data[: m - 1], piece.segments, num_blocks, out=gram[:, : m - 1, : m - 1])
                wait_last()
                row = torch.zeros((num_blocks, m), dtype=torch.float64, device=device)
                for piece in pieces:
                    gramian_row(piece.data, m - 1, piece.segments, row)
                gram[:, m - 1, :] += row
                gram[:, : m - 1, m - 1] += row[:, : m - 1]
            for piece in pieces:
                for block, start, stop in piece.segments:
                    if block < 0:
                        outside += piece.data[:, start:stop].sum(dim=1, dtype=torch.float64)
        if self.world > 1:  # one rank: its Gramians are the sums already
            with counters.phase("gramian_all_reduce"):
                all_reduce_sum(buf, self.group, counters, "gramian_all_reduce")
        with counters.phase("coefficients"):
            # A Gramian weighting runs on the host: in float64, identically on every rank.
            weighting = state.weighting
            on_host = device.type == "cpu" or weighting is not None or num_blocks * m * m < DEVICE_STAGE_MIN_ENTRIES
            stage = buf.cpu() if on_host else buf  # (to the host: the step's one synchronisation)
            # Both decisions are identical on every rank; one rank has no one to disagree with.
            if on_host:  # nothing left to synchronise: two plain reads (a stack would cost more)
                finite = bool(torch.isfinite(stage[:size]).all())
                in_sync = self.world == 1 or bool(fingerprint_agrees(stage[size:], self.world))
            else:  # both read in the step's one host synchronisation
                checks = torch.stack([torch.isfinite(stage[:size]).all(), fingerprint_agrees(stage[size:], self.world)])
                finite, in_sync = checks.tolist()
            if finite and in_sync:
                stage_gram = stage[: num_blocks * m * m].view(num_blocks, m, m)
                if weighting is not None:
                    state.last_result = None
                    share = self._share_weights if self.world > 1 else None
                    coefficients = traj.weigh(stage_gram, self.block_sizes, weighting, share)
                else:
                    result = traj.advance(stage_gram, self.block_sizes, state.beta, state.eps, check_inputs=False)
                    state.last_result = result
                    coefficients = result.coefficients
                if coefficients.device != device:  # host stage, accelerator pieces: an asynchronous copy
                    coefficients = coefficients.pin_memory().to(device, non_blocking=True)
                return StepOutcome(coefficients, None)
            state.last_result = None
            counters.calls["skipped_step"] += 1
            coefficients = torch.ones((num_blocks, m), dtype=torch.float64, device=device)
            if not in_sync:
                return StepOutcome(coefficients, None, self._desync())
            return StepOutcome(coefficients, self._diagnose(pieces))

    def _share_weights(self, mine: Tensor | None, error: BaseException | None) -> Tensor:
        """A Gramian weighting's ``[K, m]`` weights, the same on every rank: the first rank's, sent with
        every rank's failure flag in one all-reduce of ``K m + W`` float64 numbers (host, weighting steps only).

        The Gramians are identical on every rank, but a weighting may draw from anything (Python's
        ``random``, numpy, the rank itself); whatever it does, every rank combines with one set of
        weights, and a weighting that raises on any rank raises on every rank.
        """
        num_blocks, m = self.num_blocks, self.state.num_tasks
        rank = world_of(self.group)[0]
        buf = torch.zeros(num_blocks * m + self.world, dtype=torch.float64)
        if rank == 0 and mine is not None:
            buf[: num_blocks * m] = mine.flatten()
        buf[num_blocks * m + rank] = float(error is not None)
        on_wire = buf.to(collective_device(self.group))  # NCCL reduces device tensors; gloo, host ones
        all_reduce_sum(on_wire, self.group, self.state.counters, "weights_all_reduce")
        buf = on_wire.cpu()
        failed = buf[num_blocks * m :].nonzero().flatten().tolist()
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(
                f"the Gramian weighting raised on rank(s) {failed} (their error says why); every rank stops this step, "
                "with the GradVac state untouched."
            )
        return buf[: num_blocks * m].view(num_blocks, m)

    def _desync(self) -> RuntimeError:
        """The fingerprints differ: names what differs (error path: one extra all-reduce)."""
        try:
            check_in_sync(self.state, self.group, self.num_blocks)
        except RuntimeError as err:
            return err
        return RuntimeError(
            "GradVac ranks hold different trajectories (their per-step fingerprints differ), although the full "
            "comparison found no difference; restore all ranks from one checkpoint (state_dict)."
        )

    def _diagnose(self, pieces: Sequence[Piece]) -> NonFiniteGradientError:
        """Names a task and parameter whose gradient is not finite (error path: one extra all-reduce)."""
        m, device = self.state.num_tasks, pieces[0].data.device
        flags = nonfinite_flags(((p.data, p.params) for p in pieces), m, len(self.param_names), device)
        all_reduce_sum(flags, self.group, self.state.counters, "nonfinite_diagnosis")
        task, index = first_nonfinite(flags)
        where = None if index is None else self.param_names[index]
        return NonFiniteGradientError(nonfinite_message(task, where, " on at least one rank"), task, where)

    def finish(self, outcome: StepOutcome) -> None:
        """After the transport has written ``.grad``: count the step, raise on non-finite, check sync."""
        state = self.state
        self.steps_driven += 1
        if outcome.desync is not None:
            raise outcome.desync
        if outcome.nonfinite is not None and state.on_nonfinite == "raise":
            raise outcome.nonfinite
        if state.check_sync_every and self.steps_driven % state.check_sync_every == 0:
            check_in_sync(state, self.group, self.num_blocks)


def check_in_sync(state: GradVacState, group: dist.ProcessGroup | None, num_blocks: int) -> None:
    """Raises on every rank if the ranks' targets, generator state or step count differ (one all-reduce).

    The payload has the same size on every rank (targets not yet set count as zeros, with a flag),
    so ranks that differ are reported, never turned into mismatched collectives.
    """
    traj, m = state.trajectory, state.num_tasks
    targets = traj.targets
    parts = {
        "step count": torch.tensor([traj.step], dtype=torch.float64),
        "order generator state": traj.generator.get_state(),
        "EMA targets set": torch.tensor([float(targets is not None)], dtype=torch.float64),
        "EMA targets": torch.zeros(num_blocks * m * m, dtype=torch.float64) if targets is None else targets,
    }
    differing = differing_entries(parts, group, state.counters)
    if differing:
        what = "; ".join(
            f"{name} (entry {i}: from {lo!r} to {hi!r} across ranks)" for name, (i, lo, hi) in differing.items()
        )
        raise RuntimeError(
            f"GradVac ranks are out of sync after step {traj.step}: {what}. Every rank must run the same "
            "steps with the same seed and checkpoint; restore all ranks from one checkpoint (state_dict)."
        )


class Driver:
    """What drives a model's GradVac steps: DDPGradVac (the DDP hook's) or FSDPGradVac (the FSDP2 handle).

    It holds the model weakly (dropping the model drops the link), the state, and the shared
    :class:`Engine`. One driver per model and one per state: see :func:`attach`.
    """

    engine: Engine

    def __init__(self, model: nn.Module, state: GradVacState) -> None:
        self._model_ref = weakref.ref(model)
        self.state = state

    @property
    def module(self) -> nn.Module:
        """The model this driver steps (raises if it was garbage-collected)."""
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model this GradVac state was bound to no longer exists.")
        return model

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return self.engine.block_sizes

    def buffer_bytes(self) -> dict[str, int]:
        """Bytes of the buffers this driver keeps between steps on this rank, by kind (see the drivers)."""
        raise NotImplementedError


#: model -> its driver; the state holds the reverse link (``state._driver``). Weak keys, and a
#: driver holds its model only weakly, so a registration never keeps a model alive.
_DRIVERS: weakref.WeakKeyDictionary[nn.Module, Driver] = weakref.WeakKeyDictionary()


def attach(model: nn.Module, driver: Driver) -> None:
    """Links ``model`` and ``driver.state`` to ``driver``; refuses a model or a state linked elsewhere."""
    state = driver.state
    if state._driver is not None and state._driver is not driver:
        raise ValueError(
            "this GradVacState is already used by another DDP module or FSDP2 model; create one GradVacState per model."
        )
    if _DRIVERS.get(model, driver) is not driver:
        raise ValueError("GradVac is already registered on this model; register once (call handle.remove() first).")
    _DRIVERS[model] = driver
    state._driver = driver


def driver_of(model: nn.Module) -> Driver | None:
    """The driver attached to ``model``, if any."""
    return _DRIVERS.get(model)


def drivers() -> list[Driver]:
    """Every driver attached to a live model."""
    return list(_DRIVERS.values())


def detach(driver: Driver) -> None:
    """Undoes :func:`attach` (the state can then be used with another model)."""
    model = driver._model_ref()
    if model is not None and _DRIVERS.get(model) is driver:
        del _DRIVERS[model]
    if driver.state._driver is driver:
        driver.state._driver = None
