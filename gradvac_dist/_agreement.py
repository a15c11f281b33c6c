"""Rank agreement: what every rank must hold identically, proven across the ranks.

Three checks; each raises on every rank at once, because every rank decides from the same reduced
numbers.

- :func:`check_agreement`, once, at a driver's first synchronising step (and at FSDP2
  registration): the
  settings (num_tasks, grouping, strategy, the parameters GradVac acts on, beta, eps, seed,
  on_nonfinite, the block layout, ...) and the trajectory (step count, generator, targets). Each
  setting is encoded into a number of float64 entries fixed by its *kind*, never by its value, so
  the payload has the same size on every rank whatever the ranks hold: a mismatch is reported,
  never turned into mismatched collectives. One MAX all-reduce of ``[x, -x]`` gives the minimum
  and maximum of every entry over the ranks; a setting differs iff they differ. A rank that could
  not even build its settings (a bad argument on that rank only) takes part all the same, so the
  others raise instead of waiting for it. A later ``load_state_dict`` changes only the
  trajectory, which the fingerprint below covers at the next step.
- :func:`check_step_inputs`, at every later synchronising step, before the passes: whether every
  rank's inputs passed their checks (one all-reduce of W flags), so a loss refused on one rank
  raises on all of them instead of leaving the others waiting in the first pass's reductions.
- The per-step *fingerprint* of the trajectory (targets, generator state, step count), carried by
  the Gramian all-reduce at no extra collective: :data:`CHANNELS` integers ``f_c < 2^k`` enter as
  ``f_c`` and ``f_c^2``; after the SUM over ``W`` ranks, ``W * sum(f^2) == (sum f)^2`` iff every
  rank holds the same ``f`` (``W sum f^2 - (sum f)^2 = sum_{r<s} (f_r - f_s)^2``), and ``k`` is
  chosen from ``W`` so that every sum is an integer below 2^53, exact in float64. The targets
  are hashed where they live (integer arithmetic, whose sums do not depend on their order), so
  the fingerprint costs no host synchronisation.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._comm import CommCounters, all_reduce_sum, collective_device, extrema, world_of

__all__ = [
    "CHANNELS",
    "Kind",
    "Setting",
    "check_agreement",
    "fingerprint_agrees",
    "fingerprint_bits",
    "payload_size",
    "write_fingerprint",
]


class Kind(enum.Enum):
    """How a setting is encoded, and so how many entries it takes."""

    INT = "int"  # a non-negative integer below 2^64: high and low 32 bits
    FLOAT = "float"  # a float, exactly
    CHOICE = "choice"  # one of a known tuple of values: its index (-1: another value)
    DIGEST = "digest"  # anything else: 64 bits of a hash of its repr (reported by its digest)

    @property
    def width(self) -> int:
        """Entries one setting of this kind takes."""
        return 2 if self in (Kind.INT, Kind.DIGEST) else 1


class Setting(NamedTuple):
    name: str
    kind: Kind
    value: Any
    choices: tuple[Any, ...] = ()


def _digest(value: Any) -> int:
    data = value if isinstance(value, bytes) else repr(value).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _encode(setting: Setting) -> list[float]:
    kind, value = setting.kind, setting.value
    if kind is Kind.INT:
        v = int(value) % (1 << 64)
        return [float(v >> 32), float(v & 0xFFFFFFFF)]
    if kind is Kind.FLOAT:
        return [float(value)]
    if kind is Kind.CHOICE:
        return [float(setting.choices.index(value)) if value in setting.choices else -1.0]
    v = _digest(value)
    return [float(v >> 32), float(v & 0xFFFFFFFF)]


def _decode(setting: Setting, entries: Sequence[float]) -> str:
    kind = setting.kind
    if kind is Kind.INT:
        return str(int(entries[0]) * (1 << 32) + int(entries[1]))
    if kind is Kind.FLOAT:
        return repr(entries[0])
    if kind is Kind.CHOICE:
        i = int(entries[0])
        return repr(setting.choices[i]) if i >= 0 else "another value"
    return f"digest {int(entries[0]) * (1 << 32) + int(entries[1]):016x}"


_SETUP_FAILED = Setting("set-up on this rank", Kind.CHOICE, "ok", ("ok", "failed"))


def check_agreement(
    settings: Sequence[Setting] | None,
    num_entries: int,
    group: dist.ProcessGroup | None,
    counters: CommCounters,
    local_error: BaseException | None = None,
) -> None:
    """Raises on every rank unless every rank holds the same ``settings``; one fixed-size all-reduce.

    Args:
        settings: this rank's settings, or ``None`` when this rank failed to build them
            (``local_error`` says why); the other ranks then raise too.
        num_entries: the payload size, a function of the code alone (see :func:`payload_size`).
        local_error: the error this rank met while setting up; re-raised here after the
            collective, so no rank is left waiting.
    """
    if settings is None:
        entries = [0.0] * num_entries
        entries[0] = 1.0  # _SETUP_FAILED: "failed"
    else:
        entries = _encode(Setting(_SETUP_FAILED.name, Kind.CHOICE, "ok", _SETUP_FAILED.choices))
        for setting in settings:
            entries += _encode(setting)
    assert len(entries) == num_entries, "the agreement payload must have the same size on every rank"
    low_t, high_t = extrema(torch.tensor(entries, dtype=torch.float64), group, counters, "agreement_all_reduce")
    low, high = low_t.tolist(), high_t.tolist()
    if local_error is not None:
        raise local_error
    if high[0] != low[0]:
        raise RuntimeError(
            "GradVac could not be set up on another rank, or refused this step's inputs there (that rank's error "
            "says why); this rank stops too, so that no rank waits for the others."
        )
    if high == low:
        return
    assert settings is not None
    report, start = [], 1
    for setting in settings:
        stop = start + setting.kind.width
        if high[start:stop] != low[start:stop]:
            report.append(
                f"{setting.name}: {_decode(setting, low[start:stop])} on some ranks, "
                f"{_decode(setting, high[start:stop])} on others"
            )
        start = stop
    raise ValueError(
        "GradVac is set up differently across ranks: "
        + "; ".join(report)
        + ". Every rank must build the same model and GradVacState (num_tasks, grouping, strategy, shared_params, "
        "beta, eps, seed, on_nonfinite), pass the same number of losses, and load the same checkpoint."
    )


def check_step_inputs(
    local_error: BaseException | None, group: dist.ProcessGroup | None, counters: CommCounters
) -> None:
    """Raises on every rank unless every rank's inputs to this step passed their checks.

    One SUM all-reduce of W flags (rank ``r`` sets entry ``r`` when ``local_error`` is set), read on
    the host; the failing rank re-raises its own error, the others a ``RuntimeError`` naming it.
    """
    rank, world = world_of(group)
    flags = torch.zeros(world, dtype=torch.float64)
    flags[rank] = float(local_error is not None)
    on_wire = flags.to(collective_device(group))  # NCCL reduces device tensors; gloo, host ones
    all_reduce_sum(on_wire, group, counters, "input_all_reduce")
    failed = on_wire.nonzero().flatten().tolist()
    if local_error is not None:
        raise local_error
    if failed:
        raise RuntimeError(
            f"GradVac refused this step's inputs on rank(s) {failed} (their error says why); this rank stops too, "
            "so that no rank waits for the others in the backward passes. Nothing was changed on any rank."
        )


def payload_size(settings: Sequence[Setting]) -> int:
    """Entries of :func:`check_agreement`'s payload for settings of these kinds."""
    return 1 + sum(s.kind.width for s in settings)


#: Integer channels of the per-step fingerprint (each carried as f and f^2).
CHANNELS = 2


def fingerprint_bits(world: int) -> int:
    """Bits per channel such that ``W^2 * 2^(2k) < 2^53``: every sum of ``f`` and ``f^2`` stays exact."""
    return max(1, min(24, (52 - 2 * world.bit_length()) // 2))


def write_fingerprint(out: Tensor, targets: Tensor | None, generator: torch.Generator, step: int, bits: int) -> None:
    """Writes ``[f_1..f_C, f_1^2..f_C^2]`` (float64) into ``out`` for this trajectory; no host sync.

    The targets are hashed where they live: their bits as int64, times distinct odd multipliers,
    summed (int64 arithmetic wraps modulo 2^64, so the sum does not depend on the order of the
    reduction); the step and generator state are hashed on the host.
    """
    host = _digest(bytes(generator.get_state().numpy().tobytes()) + int(step).to_bytes(8, "little"))
    host = host - (1 << 64) if host >= (1 << 63) else host  # as a signed int64
    if targets is None:
        mixed = torch.tensor(host, dtype=torch.int64)
    else:
        # in blocks-last order, the layout the coefficient stage leaves them in (no copy then); any
        # other layout (a loaded checkpoint) hashes the same values to the same fingerprint
        t = targets.detach().permute(1, 2, 0).contiguous().view(torch.int64).reshape(-1)
        mixed = (t * _multipliers(t.numel(), t.device)).sum() ^ host
    mask = (1 << bits) - 1
    channels = torch.stack([(mixed >> (3 + 23 * c)) & mask for c in range(CHANNELS)]).to(torch.float64)
    if channels.device != out.device:  # host targets, accelerator buffer: scalars, no copy from pageable memory
        for i, v in enumerate(channels.tolist()):
            out[i].fill_(v)
            out[CHANNELS + i].fill_(v * v)
    else:
        out[:CHANNELS].copy_(channels)
        out[CHANNELS:].copy_(channels * channels)


_MULTIPLIERS: dict[tuple[int, torch.device], Tensor] = {}


def _multipliers(numel: int, device: torch.device) -> Tensor:
    """Distinct odd int64 multipliers, one per target entry (made once per size and device): a change of
    any one entry changes the sum modulo 2^64, since an odd multiplier is invertible there."""
    key = (numel, device)
    if key not in _MULTIPLIERS:
        index = torch.arange(numel, dtype=torch.int64, device=device)
        _MULTIPLIERS[key] = index.mul_(0x5851F42D4C957F2D).add_(0x14057B7EF767814F).bitwise_or_(1)
    return _MULTIPLIERS[key]


def fingerprint_agrees(summed: Tensor, world: int) -> Tensor:
    """After the SUM all-reduce: a bool tensor, whether every rank wrote the same fingerprint."""
    s1, s2 = summed[:CHANNELS], summed[CHANNELS:]
    return (s2 * world == s1 * s1).all()
