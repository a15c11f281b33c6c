"""GradVac's state: the frozen settings (:mod:`._settings`) kept apart from the mutable trajectory.

The trajectory (EMA targets, the order generator, the step count) is what every rank must hold
bit-identically; only :meth:`Trajectory.advance` changes it, and it does so from inputs that are
identical on every rank (the all-reduced Gramians). Checkpoint keys are module constants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from ._checks import check_num_tasks
from ._comm import CommCounters
from ._diagnostics import StepDiagnostics
from ._settings import GradVacSettings
from ._step import GradVacStepResult, StepWorkspace, step_with_drawn_order
from ._weighting import Weighting, weigh_blocks

__all__ = ["GradVacState", "Trajectory", "from_plain", "to_plain"]

# Checkpoint keys (state_dict of the aggregator, of GradVacState and of the FSDP wrapper).
VERSION_KEY = "format_version"
NUM_TASKS_KEY = "num_tasks"
BLOCK_SIZES_KEY = "block_sizes"
TARGETS_KEY = "targets"
GENERATOR_KEY = "generator_state"
STEP_KEY = "step"
GROUPING_KEY = "grouping"
FORMAT_VERSION = 1


class Trajectory:
    """The mutable state of GradVac: EMA targets, the order generator and the step count.

    ``targets`` is ``None`` until the first step fixes the number of tasks and the blocks; from
    then on a step with another ``m`` or other block sizes is refused (call :meth:`reset`).
    """

    __slots__ = ("_seed", "block_sizes", "generator", "num_tasks", "step", "targets", "workspace")

    def __init__(self, seed: int, num_tasks: int | None = None) -> None:
        self._seed = seed
        self.num_tasks = num_tasks
        #: the coefficient stage's working arrays, kept between steps (scratch, never in state_dict)
        self.workspace = StepWorkspace()
        self.reset()

    def reset(self) -> None:
        """Forgets the targets, re-seeds the generator and restarts the step count."""
        self.workspace.clear()
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self._seed)
        self.targets: Tensor | None = None
        self.block_sizes: tuple[int, ...] | None = None
        self.step = 0

    def check_shape(self, num_tasks: int, block_sizes: tuple[int, ...]) -> None:
        """Refuses a step whose number of tasks or blocks differs from the state's."""
        if self.num_tasks is not None and num_tasks != self.num_tasks:
            raise ValueError(
                f"GradVac got {num_tasks} task gradients but its state is for {self.num_tasks} tasks; "
                "pass one loss (Jacobian row) per task, or call reset() to start a new trajectory."
            )
        if self.block_sizes is not None and block_sizes != self.block_sizes:
            raise ValueError(
                f"GradVac's blocks changed between steps: the state has {len(self.block_sizes)} blocks "
                f"of sizes {_short(self.block_sizes)}, this step has {len(block_sizes)} of sizes "
                f"{_short(block_sizes)}. Keep the model and grouping fixed, or call reset() to start "
                "a new trajectory."
            )

    def advance(
        self, gramians: Tensor, block_sizes: tuple[int, ...], beta: float, eps: float, *, check_inputs: bool = True
    ) -> GradVacStepResult:
        """One step: draws the order (:func:`~gradvac_dist.draw_order`), runs
        :func:`~gradvac_dist.gradvac_step`, keeps the new targets."""
        num_blocks, m = gramians.shape[0], gramians.shape[1]
        self.check_shape(m, block_sizes)
        if self.targets is None:
            targets = torch.zeros((num_blocks, m, m), dtype=torch.float64, device=gramians.device)
        else:
            targets = self.targets.to(gramians.device)
        result = step_with_drawn_order(
            gramians,
            targets,
            self.generator,
            beta=beta,
            eps=eps,
            check_inputs=check_inputs,
            workspace=self.workspace,
        )
        self.targets = result.targets
        self.block_sizes = block_sizes
        self.num_tasks = m
        self.step += 1
        return result

    def weigh(
        self,
        gramians: Tensor,
        block_sizes: tuple[int, ...],
        weighting: Weighting,
        share: Callable[[Tensor | None, BaseException | None], Tensor] | None = None,
    ) -> Tensor:
        """One step of a Gramian weighting instead of GradVac: ``[K, m]`` float64 weights, on the host.

        ``share`` (distributed): called with this rank's weights or the error the weighting raised,
        it returns the weights every rank uses, or raises on every rank. Only then does the
        trajectory advance, so a step refused on any rank leaves every rank's trajectory untouched.
        """
        m = gramians.shape[1]
        self.check_shape(m, block_sizes)
        generator = torch.Generator(device="cpu")
        generator.set_state(self.generator.get_state())
        if share is None:
            weights = weigh_blocks(weighting, gramians, generator)
        else:
            try:
                mine: Tensor | None = weigh_blocks(weighting, gramians, generator)
                error = None
            except Exception as err:  # a user's weighting may raise anything; every rank must hear of it
                mine, error = None, err
            weights = share(mine, error)
        self.generator = generator
        self.block_sizes = block_sizes
        self.num_tasks = m
        self.step += 1
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {
            VERSION_KEY: FORMAT_VERSION,
            NUM_TASKS_KEY: self.num_tasks,
            BLOCK_SIZES_KEY: None if self.block_sizes is None else list(self.block_sizes),
            # packed [K, m, m], whatever layout the stage left them in (blocks last)
            TARGETS_KEY: None
            if self.targets is None
            else self.targets.detach().cpu().clone(memory_format=torch.contiguous_format),
            GENERATOR_KEY: self.generator.get_state(),
            STEP_KEY: self.step,
        }

    def load_state_dict(self, state: dict[str, Any], *, expected_block_sizes: tuple[int, ...] | None = None) -> None:
        """Loads a trajectory after checking it whole; on any error nothing is changed."""
        if not isinstance(state, dict):
            raise ValueError(f"a GradVac state_dict must be a dict, got {type(state).__name__}.")
        missing = [
            k
            for k in (VERSION_KEY, NUM_TASKS_KEY, BLOCK_SIZES_KEY, TARGETS_KEY, GENERATOR_KEY, STEP_KEY)
            if k not in state
        ]
        if missing:
            raise ValueError(
                f"not a GradVac state_dict: keys {missing} are missing (is it a checkpoint of another object?)."
            )
        if state[VERSION_KEY] != FORMAT_VERSION:
            raise ValueError(
                f"GradVac state_dict format {state[VERSION_KEY]!r} is not supported (this version reads {FORMAT_VERSION})."
            )
        num_tasks, sizes, targets = state[NUM_TASKS_KEY], state[BLOCK_SIZES_KEY], state[TARGETS_KEY]
        step, gen_state = state[STEP_KEY], state[GENERATOR_KEY]
        if self.num_tasks is not None and num_tasks is not None and num_tasks != self.num_tasks:
            raise ValueError(
                f"checkpoint is for {num_tasks} tasks, this GradVac state for {self.num_tasks}; refusing to load it."
            )
        if expected_block_sizes is not None and sizes is not None and tuple(sizes) != tuple(expected_block_sizes):
            raise ValueError(
                f"checkpoint has {len(sizes)} blocks of sizes {_short(tuple(sizes))}, this model/grouping has "
                f"{len(expected_block_sizes)} of sizes {_short(tuple(expected_block_sizes))}; refusing to load it "
                "(a different model or grouping)."
            )
        if targets is not None:
            if not isinstance(targets, Tensor) or sizes is None or num_tasks is None:
                raise ValueError(
                    "checkpoint targets are malformed: expected a tensor with num_tasks and block_sizes set."
                )
            if tuple(targets.shape) != (len(sizes), num_tasks, num_tasks):
                raise ValueError(
                    f"checkpoint targets have shape {tuple(targets.shape)}, expected {[len(sizes), num_tasks, num_tasks]}."
                )
            if not bool(torch.isfinite(targets).all()) or bool((targets.abs() > 1).any()):
                raise ValueError("checkpoint targets must be finite and inside [-1, 1]; the checkpoint is corrupt.")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}.")
        if not isinstance(gen_state, Tensor) or gen_state.dtype != torch.uint8:
            raise ValueError("checkpoint generator_state must be a uint8 tensor (torch.Generator.get_state()).")
        generator = torch.Generator(device="cpu")
        try:
            generator.set_state(gen_state.cpu())
        except RuntimeError as err:
            raise ValueError(f"checkpoint generator_state is not a valid CPU generator state: {err}") from err
        # Everything checked: commit.
        device = self.targets.device if self.targets is not None else "cpu"
        self.generator = generator
        self.targets = None if targets is None else targets.to(device=device, dtype=torch.float64).clone()
        self.block_sizes = None if sizes is None else tuple(int(s) for s in sizes)
        self.num_tasks = num_tasks if num_tasks is not None else self.num_tasks
        self.step = step


def to_plain(state_dict: dict[str, Any], block_sizes: tuple[int, ...]) -> dict[str, Any]:
    """A trajectory ``state_dict`` as plain Python values (for ``torch.distributed.checkpoint``).

    ``block_sizes`` are the model's global block sizes (recorded even before the first step);
    ``targets`` become a flat list of float64 values (Python floats are float64: exact),
    ``generator_state`` bytes. DCP stores each plain value as one object and replaces it on load,
    so a checkpoint of another model, grouping or task count reaches ``load_state_dict``, which
    refuses it with a message, instead of failing inside DCP's planner on a tensor-shape mismatch.
    """
    targets = state_dict[TARGETS_KEY]
    return {
        **state_dict,
        BLOCK_SIZES_KEY: list(block_sizes),
        TARGETS_KEY: None if targets is None else targets.to(dtype=torch.float64).flatten().tolist(),
        GENERATOR_KEY: bytes(state_dict[GENERATOR_KEY].numpy().tobytes()),
    }


def from_plain(plain: dict[str, Any]) -> dict[str, Any]:
    """Undoes :func:`to_plain`, checking only what the conversion needs (``load_state_dict`` checks the rest)."""
    if not isinstance(plain, dict) or not isinstance(plain.get(GENERATOR_KEY), (bytes, bytearray)):
        raise ValueError(
            "not a checkpoint of FSDPGradVac.state_dict() (generator_state is not bytes); a "
            "GradVacState.state_dict() is loaded with state.load_state_dict(...) instead."
        )
    sizes, m, targets = plain.get(BLOCK_SIZES_KEY), plain.get(NUM_TASKS_KEY), plain.get(TARGETS_KEY)
    if targets is not None:
        ok = isinstance(sizes, list) and isinstance(m, int) and isinstance(targets, list)
        if not ok or len(targets) != len(sizes) * m * m:
            raise ValueError(
                "checkpoint targets are malformed: expected a flat list of K*m*m numbers with block_sizes (K) "
                "and num_tasks (m) set."
            )
        targets = torch.tensor(targets, dtype=torch.float64).view(len(sizes), m, m)
    return {
        VERSION_KEY: plain.get(VERSION_KEY),
        NUM_TASKS_KEY: m,
        BLOCK_SIZES_KEY: sizes if targets is not None else None,
        TARGETS_KEY: targets,
        GENERATOR_KEY: torch.frombuffer(bytearray(plain[GENERATOR_KEY]), dtype=torch.uint8),
        STEP_KEY: plain.get(STEP_KEY),
        **({GROUPING_KEY: plain[GROUPING_KEY]} if GROUPING_KEY in plain else {}),
    }


class Bound(Protocol):
    """What a state needs of the driver it is attached to (``gradvac_dist._engine.Driver``)."""

    @property
    def block_sizes(self) -> tuple[int, ...]: ...

    def buffer_bytes(self) -> dict[str, int]: ...


def _short(sizes: tuple[int, ...], limit: int = 6) -> str:
    if len(sizes) <= limit:
        return str(list(sizes))
    return str(list(sizes[:limit]))[:-1] + ", ...]"


class GradVacState:
    """State of :func:`gradvac_dist.gradvac_hook` (DDP) and of the FSDP2 path.

    Holds the frozen :class:`~gradvac_dist.GradVacSettings` (``state.settings``), the trajectory
    every rank keeps identical (EMA targets, order generator, step), the communication counters
    and the link to the model it drives. Like PyTorch's ``PowerSGDState``, it pickles everything
    but the process group (and that link, which is rebuilt at the next step): after unpickling,
    the default process group is used.

    The settings are read-only: ``state.num_tasks``, ``state.grouping``, ... read
    ``state.settings``; assigning one raises ``AttributeError`` (every rank must hold the same
    settings for a whole run; build a new state to change them).

    Args:
        num_tasks: m, the number of task losses passed to :func:`gradvac_dist.backward` each step.
        beta: EMA rate of the targets, in ``[0, 1]``.
        eps: stabiliser of both denominators, ``>= 0``.
        seed: seed of the CPU generator of the visiting orders; must be the same on every rank.
        grouping: ``"whole"``, ``"parameter"`` or ``"module"`` (see :mod:`gradvac_dist`).
        process_group: the group to communicate in (default: the default group; under FSDP2, the
            model's mesh group).
        strategy: ``"sharded"`` or ``"replicated"`` per-task reduction, ``None`` for the backend's
            default (``"sharded"``; on gloo its reduce-scatter is built from all-to-all).
        shared_params: names (or name prefixes, e.g. ``"encoder"``) of the wrapped module's
            parameters GradVac acts on; every other parameter gets the plain sum of its task
            gradients. ``None``: all parameters.
        on_nonfinite: ``"raise"`` (default): a step whose task gradients hold inf/NaN on any rank
            raises :class:`~gradvac_dist.NonFiniteGradientError` on every rank; ``"skip"``: the
            state is left untouched and ``.grad`` gets the plain (non-finite) mean-sum, so that a
            ``GradScaler`` skips the optimizer step. The decision rides on the Gramian all-reduce:
            no extra collective (naming the parameter in the error costs one, on that path only).
        check_sync_every: if set, every that many steps all ranks check (one small all-reduce) that
            they hold identical targets, generator state and step count, and raise a
            ``RuntimeError`` naming what differs. Off by default.
        weighting: ``None`` (default): GradVac. Otherwise a Gramian weighting, a callable from an
            ``[m, m]`` Gramian to ``[m]`` task weights (TorchJD's ``UPGradWeighting()``,
            ``MGDAWeighting()``, ``PCGradWeighting()``, ... as they are, or a TorchJD aggregator
            such as ``UPGrad()``), run on each block's Gramian instead of GradVac's coefficient
            stage: identical on every rank (float64 inputs, host, random draws seeded from this
            state's generator). ``beta`` and ``eps`` are then unused. Weightings with state of their
            own and matrix weightings are refused (``gradvac_dist/_weighting.py`` says why).

    Raises:
        ValueError: ``num_tasks`` not an int ``>= 1``, or any other setting out of its range (as
            :class:`~gradvac_dist.GradVacSettings` checks them).

    Example:
        Construction and checkpoints run on one process; the state then drives DDP or FSDP2
        (see :func:`~gradvac_dist.gradvac_hook` and :func:`~gradvac_dist.register_fsdp`).

        >>> import gradvac_dist
        >>> state = gradvac_dist.GradVacState(num_tasks=3, beta=0.5, seed=0, grouping="module")
        >>> state
        GradVacState(num_tasks=3, beta=0.5, eps=1e-08, seed=0, grouping='module', strategy=None, step=0)
        >>> state.settings.grouping, state.num_tasks, state.step
        ('module', 3, 0)
        >>> state.beta = 0.9
        Traceback (most recent call last):
            ...
        AttributeError: GradVacState.beta is a setting: every rank must hold the same for the whole run, ...
        >>> checkpoint = state.state_dict()  # torch.save(checkpoint, path) on one rank
        >>> sorted(checkpoint)
        ['block_sizes', 'format_version', 'generator_state', 'grouping', 'num_tasks', 'step', 'targets']
        >>> resumed = gradvac_dist.GradVacState(num_tasks=3, grouping="module")
        >>> resumed.load_state_dict(checkpoint)
        >>> resumed.step
        0
    """

    __slots__ = (  # noqa: RUF023 (grouped by purpose, as PowerSGDState)
        # what every rank must share: frozen
        "settings",
        # communication
        "process_group",
        "counters",
        # trajectory: identical on every rank, changed only by the core
        "trajectory",
        "last_result",
        # the model this state drives (not pickled): see gradvac_dist._engine.attach
        "_driver",
    )

    def __init__(
        self,
        num_tasks: int,
        beta: float = 0.5,
        eps: float = 1e-8,
        seed: int = 0,
        grouping: str = "whole",
        process_group: Any = None,
        strategy: str | None = None,
        shared_params: Any = None,
        on_nonfinite: str = "raise",
        check_sync_every: int | None = None,
        weighting: Any = None,
    ) -> None:
        check_num_tasks(num_tasks)  # required here (None is for the single-process aggregators)
        settings = GradVacSettings(
            num_tasks=num_tasks,
            beta=beta,
            eps=eps,
            seed=seed,
            grouping=grouping,
            strategy=strategy,
            shared_params=shared_params,
            on_nonfinite=on_nonfinite,
            check_sync_every=check_sync_every,
            weighting=weighting,
        )
        self._build(settings, process_group)

    def _build(self, settings: GradVacSettings, process_group: Any) -> None:
        _set = object.__setattr__
        _set(self, "settings", settings)
        _set(self, "process_group", process_group)
        _set(self, "counters", CommCounters())
        _set(self, "trajectory", Trajectory(settings.seed, settings.num_tasks))
        _set(self, "last_result", None)
        _set(self, "_driver", None)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SETTING_NAMES or name in _FIXED:
            what = "a setting" if name in _SETTING_NAMES else "fixed once the state exists"
            raise AttributeError(
                f"GradVacState.{name} is {what}: every rank must hold the same for the whole run, so it cannot be "
                f"changed after construction. Build a new GradVacState({name}=...) instead."
            )
        object.__setattr__(self, name, value)

    # Read-only views of the settings (the constructor's keyword arguments).
    num_tasks = property(lambda self: self.settings.num_tasks, doc="m, the number of task losses.")
    beta = property(lambda self: self.settings.beta, doc="EMA rate of the targets.")
    eps = property(lambda self: self.settings.eps, doc="Stabiliser of both denominators.")
    seed = property(lambda self: self.settings.seed, doc="Seed of the order generator.")
    grouping = property(lambda self: self.settings.grouping, doc="How parameters are split into blocks.")
    strategy = property(
        lambda self: self.settings.strategy, doc="DDP's per-task reduction (None for the backend's default)."
    )
    shared_params = property(lambda self: self.settings.shared_params, doc="Parameters GradVac acts on.")
    on_nonfinite = property(lambda self: self.settings.on_nonfinite, doc="What a non-finite step does.")
    check_sync_every = property(lambda self: self.settings.check_sync_every, doc="Steps between sync checks.")
    weighting = property(lambda self: self.settings.weighting, doc="The Gramian weighting, or None (GradVac).")

    @property
    def step(self) -> int:
        """Steps completed."""
        return self.trajectory.step

    @property
    def diagnostics(self) -> StepDiagnostics | None:
        """A read-only view of the latest step for logging (per block: mean cosine, corrected fraction,
        target range), or ``None`` before the first step and after a skipped one. Building it reads
        nothing from the device; its ``summary()`` and ``per_block()`` return plain floats.

        Example:
            >>> state = GradVacState(num_tasks=2)
            >>> state.diagnostics is None       # no step yet
            True
        """
        result = self.last_result
        if result is None or not isinstance(result, GradVacStepResult):
            return None
        names = getattr(getattr(self._driver, "layout", None), "names", None)
        if names is not None and len(names) != result.cosines.shape[0]:
            names = None
        return StepDiagnostics(result, self.step, names)

    def buffer_bytes(self) -> dict[str, int]:
        """Bytes of the buffers GradVac keeps on this rank between steps, by kind; empty before the first step.

        Returns:
            A dict from kind to bytes:

            ``"stash"``: the per-task gradients (``m n / W`` elements under DDP's sharded strategy and
            FSDP2, ``m n`` under DDP's replicated strategy); ``"scratch"`` (DDP, sharded): the padded
            send and receive buffers of the per-task reduce-scatter, reused by the result all-gather;
            ``"stage"``: the coefficient stage's working arrays (about ``10 K m^2`` float64 numbers,
            once the vectorised stage has run).
        """
        out = {} if self._driver is None else self._driver.buffer_bytes()
        if out and self.trajectory.workspace.nbytes:
            out["stage"] = self.trajectory.workspace.nbytes
        return out

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"GradVacState(num_tasks={s.num_tasks}, beta={s.beta}, eps={s.eps}, seed={s.seed}, "
            f"grouping={s.grouping!r}, strategy={s.strategy!r}, step={self.step}"
            + ("" if s.weighting is None else f", weighting={s.weighting!r}")
            + ")"
        )

    def state_dict(self) -> dict[str, Any]:
        """The trajectory and the setting it depends on (grouping); rank- and world-size-independent.

        Returns:
            A dict of tensors and plain values (``format_version``, ``num_tasks``,
            ``block_sizes``, ``targets``, ``generator_state``, ``step``, ``grouping``), identical
            on every rank: save it from one rank with ``torch.save``, load it with
            ``torch.load(..., weights_only=True)``.
        """
        out = self.trajectory.state_dict()
        out[GROUPING_KEY] = self.settings.grouping
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a checkpoint of the same num_tasks and grouping (any world size); checks it whole first.

        Args:
            state_dict: what :meth:`state_dict` returned, on any rank of a job of any world size.

        Raises:
            ValueError: another grouping or number of tasks, other block sizes than the model
                this state drives, not a GradVac ``state_dict``, or malformed content; nothing
                is changed then.
        """
        grouping = self.settings.grouping
        if isinstance(state_dict, dict) and state_dict.get(GROUPING_KEY, grouping) != grouping:
            raise ValueError(
                f"checkpoint grouping {state_dict[GROUPING_KEY]!r} differs from this state's {grouping!r}; "
                "refusing to load it (its targets are per block of another partition)."
            )
        expected = self._driver.block_sizes if self._driver is not None else None
        self.trajectory.load_state_dict(state_dict, expected_block_sizes=expected)

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "trajectory": self.trajectory.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        settings = state.get("settings")
        if settings is None:  # a state pickled by 0.1.0: the frozen config and the settings apart
            config = state["config"]
            settings = GradVacSettings(
                num_tasks=state["num_tasks"],
                beta=config.beta,
                eps=config.eps,
                seed=config.seed,
                on_nonfinite=config.on_nonfinite,
                grouping=state["grouping"],
                strategy=state["strategy"],
                shared_params=state["shared_params"],
                check_sync_every=state["check_sync_every"],
                weighting=state.get("weighting"),
            )
        self._build(settings, None)
        self.trajectory.load_state_dict(state["trajectory"])


_SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(GradVacSettings)) | {"settings"}
#: Attributes set once by the constructor; a driver reads them, never replaces them.
_FIXED = frozenset({"counters", "process_group", "trajectory"})
