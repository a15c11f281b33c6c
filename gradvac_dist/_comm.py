"""Transport: per-task reduction strategies, the Gramian all-reduce, and counters.

Knows nothing of the GradVac formulas. Each collective goes through :class:`CommCounters`, so
tests can check "exactly one Gramian all-reduce per step" and benchmarks can report the payload
each rank hands to the backend.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["STRATEGIES", "CommCounters", "Strategy", "default_strategy"]

Strategy = Literal["sharded", "replicated"]
#: DDP's per-task reductions (``GradVacState(strategy=...)``): ``"sharded"`` (the default: a
#: reduce-scatter per task, 1/W of each gradient kept per rank, one all-gather of the result) or
#: ``"replicated"`` (an all-reduce per task, each rank keeps the whole gradients).
STRATEGIES: tuple[str, ...] = ("sharded", "replicated")


class CommCounters:
    """Counts the collectives issued, the payload bytes handed to each kind, and phase times.

    ``calls[name]`` and ``bytes[name]`` for names such as ``"gramian_all_reduce"``,
    ``"task_all_reduce"``, ``"task_reduce_scatter"``, ``"result_all_gather"``. The payload is the
    size of the tensor given to the collective on this rank (the input of an all-reduce or a
    reduce-scatter, the output of an all-gather); the bytes a ring algorithm sends per rank
    follow from it (see the cost table in docs/usage.md). ``calls["skipped_step"]`` counts steps left out
    because a task gradient was not finite.

    With ``timing = True`` (off by default: it costs two clock reads per phase), ``seconds[phase]``
    accumulates the host wall time of each phase of a step:

    - ``"hook"``: inside :func:`~gradvac_dist.gradvac_hook`, every bucket of every pass (DDP);
    - ``"step"``: the part of a step after the last task's gradients exist (everything below);
    - ``"gramians"``: partial Gramians of the local pieces;
    - ``"gramian_all_reduce"``: the one all-reduce of Gramians and flags;
    - ``"coefficients"``: the coefficient stage (the state's advance, or the non-finite fallback);
    - ``"combine"``: combining the local pieces with the coefficients (and, for DDP's sharded
      strategy, the all-gather of the combined shards).

    On an accelerator the times are those of the host (kernels are launched, not awaited), apart
    from the documented host synchronisation inside ``"coefficients"``.
    """

    __slots__ = ("bytes", "calls", "seconds", "timing")

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self.timing = False

    def record(self, name: str, tensor: Tensor) -> None:
        self.calls[name] += 1
        self.bytes[name] += tensor.numel() * tensor.element_size()

    def phase(self, name: str) -> _Phase:
        """A context manager adding the host time of its body to ``seconds[name]`` when ``timing``."""
        return _Phase(self, name)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes), "seconds": dict(self.seconds)}


class _Phase:
    __slots__ = ("_counters", "_name", "_start")

    def __init__(self, counters: CommCounters, name: str) -> None:
        self._counters, self._name, self._start = counters, name, 0.0

    def __enter__(self) -> None:
        if self._counters.timing:
            self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self._counters.timing:
            self._counters.seconds[self._name] += time.perf_counter() - self._start


def default_strategy(group: dist.ProcessGroup | None) -> Strategy:
    """The per-task reduction that measured fastest: ``"sharded"`` on every backend.

    Sharded sends ``(m+1) n (W-1)/W`` elements per rank and step against ``2 m n (W-1)/W`` for
    replicated. On NCCL a ring all-reduce is a reduce-scatter plus an all-gather, so this is a pure
    saving. On gloo, whose own reduce-scatter sends as much as an all-reduce, the reduce-scatter is
    built from ``all_to_all_single`` (see :func:`start_reduce_scatter`), which sends half as much;
    ``python -m benchmarks ddp`` compares the two.
    """
    del group  # kept in the signature: the choice may depend on the backend again
    return "sharded"


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None, counters: CommCounters, name: str) -> None:
    """Blocking in-place SUM all-reduce, counted."""
    counters.record(name, tensor)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


class PendingReduce:
    """An asynchronous reduction in flight; :meth:`wait` completes it (and its local epilogue)."""

    __slots__ = ("_then", "_works")

    def __init__(self, work: dist.Work | Sequence[dist.Work], then: Callable[[], object] | None = None) -> None:
        self._works = tuple(work) if isinstance(work, Sequence) else (work,)
        self._then = then

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        if self._then is not None:
            self._then()
            self._then = None


def reduce_scatter_via_all_to_all(group: dist.ProcessGroup | None) -> bool:
    """Whether to build reduce-scatter from all-to-all: yes on gloo, whose own reduce-scatter sends
    the whole buffer like an all-reduce, where all_to_all_single plus a local sum sends the
    ``(W-1)/W`` share a reduce-scatter needs (bytes: docs/design.md, "Thresholds")."""
    return str(dist.get_backend(group)).lower() == "gloo"


def start_reduce_scatter(
    output: Tensor,
    padded_input: Tensor,
    recv: Tensor | None,
    group: dist.ProcessGroup | None,
    counters: CommCounters,
    name: str,
) -> PendingReduce:
    """Async SUM reduce-scatter: chunk ``r`` of ``padded_input`` (length ``W * len(output)``), summed
    over ranks, lands in ``output`` on rank ``r``.

    With ``recv`` (a buffer like ``padded_input``; gloo), it is an ``all_to_all_single`` into
    ``recv`` followed by a local sum of the W received chunks in rank order (deterministic);
    without, the backend's reduce-scatter (list form: faster on gloo than the tensor form, and it
    does not warn in torch 2.13).
    """
    world = dist.get_world_size(group)
    counters.record(name, padded_input)
    if recv is not None:
        work = dist.all_to_all_single(recv, padded_input, group=group, async_op=True)
        assert work is not None
        return PendingReduce(work, lambda: _sum_chunks(recv.view(world, -1), output))
    work = dist.reduce_scatter(
        output, list(padded_input.chunk(world)), op=dist.ReduceOp.SUM, group=group, async_op=True
    )
    assert work is not None
    return PendingReduce(work)


def fill_piece_major(scratch: Tensor, buf: Tensor, world: int, shard: int, pieces: Sequence[tuple[int, int]]) -> None:
    """``scratch = buf / world``, laid out piece by piece for :func:`start_reduce_scatter_in_pieces`.

    ``buf`` is rank-major (rank ``r``'s shard is ``buf[r*shard : (r+1)*shard]``, the last one possibly
    short: its missing columns are padding). For each piece ``[lo, hi)`` of the shard,
    ``scratch[world*lo : world*hi]`` holds every rank's columns ``lo..hi`` one rank after the other,
    so that an ``all_to_all_single`` of that slice sends each rank its columns of the piece. Padding
    positions are never written (``scratch`` starts as zeros). The same element-wise division as the
    whole-buffer path: the values are bit-identical.
    """
    length = buf.numel()
    if length == world * shard:
        rows = buf.view(world, shard)
        for lo, hi in pieces:
            torch.div(rows[:, lo:hi], world, out=scratch[world * lo : world * hi].view(world, hi - lo))
        return
    for r in range(world):
        start = min(r * shard, length)
        chunk = buf[start : min(start + shard, length)]
        for lo, hi in pieces:
            seg = chunk[lo:hi]
            if seg.numel():
                at = world * lo + r * (hi - lo)
                torch.div(seg, world, out=scratch[at : at + seg.numel()])


def start_reduce_scatter_in_pieces(
    output: Tensor,
    scratch: Tensor,
    recv: Tensor,
    pieces: Sequence[tuple[int, int]],
    group: dist.ProcessGroup | None,
    counters: CommCounters,
    name: str,
) -> PendingReduce:
    """Async SUM reduce-scatter of a :func:`fill_piece_major` buffer: one ``all_to_all_single`` per piece,
    all in flight at once, then each piece's W received chunks summed in rank order into
    ``output[lo:hi]`` (the same sums as :func:`start_reduce_scatter`'s, bit for bit).

    Why pieces: over TCP (gloo), one large all-to-all reached 55-70% of a rate-limited link's rate
    where the same bytes in four pipelined pieces, or gloo's own chunked ring all-reduce, reached
    90-100% (docs/design.md, "Thresholds").
    """
    world = dist.get_world_size(group)
    works = []
    for lo, hi in pieces:
        piece = slice(world * lo, world * hi)
        counters.record(name, scratch[piece])
        work = dist.all_to_all_single(recv[piece], scratch[piece], group=group, async_op=True)
        assert work is not None
        works.append(work)

    def _sum() -> None:
        for lo, hi in pieces:
            _sum_chunks(recv[world * lo : world * hi].view(world, hi - lo), output[lo:hi])

    return PendingReduce(works, _sum)


def _sum_chunks(chunks: Tensor, out: Tensor) -> Tensor:
    """``out = chunks[0] + chunks[1] + ...`` in rank order, one contiguous element-wise add per chunk,
    where ``torch.sum(chunks, dim=0)`` is a strided reduction and several times slower."""
    assert chunks.shape[0] >= 2, "a reduce-scatter runs on two ranks or more (one rank copies)"
    torch.add(chunks[0], chunks[1], out=out)
    for chunk in chunks[2:]:
        out.add_(chunk)
    return out


def start_all_reduce_pending(
    tensor: Tensor, group: dist.ProcessGroup | None, counters: CommCounters, name: str
) -> PendingReduce:
    """Async in-place SUM all-reduce, counted."""
    counters.record(name, tensor)
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
    assert work is not None
    return PendingReduce(work)


def start_all_gather(
    outputs: Tensor | list[Tensor],
    shard: Tensor,
    group: dist.ProcessGroup | None,
    counters: CommCounters,
    name: str,
) -> dist.Work:
    """Async all-gather of each rank's ``shard`` into ``outputs``: a tensor of length ``W * len(shard)``,
    or the W tensors (views) that rank r's shard lands in."""
    world = dist.get_world_size(group)
    outs = list(outputs.chunk(world)) if isinstance(outputs, Tensor) else list(outputs)
    counters.calls[name] += 1
    counters.bytes[name] += sum(t.numel() * t.element_size() for t in outs)
    work = dist.all_gather(outs, shard, group=group, async_op=True)
    assert work is not None
    return work


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where tensors handed to the group's collectives must live: CPU for gloo, the current GPU otherwise."""
    if str(dist.get_backend(group)).lower() == "gloo" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def world_of(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in ``group``."""
    return dist.get_rank(group), dist.get_world_size(group)


def shard_length(length: int, world: int) -> int:
    return -(-length // world)


def extrema(
    values: Tensor, group: dist.ProcessGroup | None, counters: CommCounters, name: str
) -> tuple[Tensor, Tensor]:
    """``(minimum, maximum)`` over the ranks of every entry of ``values`` (float64): one MAX all-reduce of
    ``[x, -x]``. Every rank gets the same answer."""
    flat = values.detach().reshape(-1).to(device=collective_device(group), dtype=torch.float64)
    both = torch.cat([flat, -flat])
    counters.record(name, both)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return -both[flat.numel() :], both[: flat.numel()]


def differing_entries(
    parts: dict[str, Tensor],
    group: dist.ProcessGroup | None,
    counters: CommCounters,
    name: str = "sync_check_all_reduce",
) -> dict[str, tuple[int, float, float]]:
    """Which of ``parts`` differ across ranks: ``{name: (first differing index, min, max)}`` (one all-reduce)."""
    flat = [t.detach().reshape(-1).to(dtype=torch.float64, device="cpu") for t in parts.values()]
    values = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
    low, high = extrema(values, group, counters, name)
    low, high = low.cpu(), high.cpu()
    out: dict[str, tuple[int, float, float]] = {}
    start = 0
    for part, f in zip(parts, flat):
        diff = (high[start : start + f.numel()] != low[start : start + f.numel()]).nonzero()
        if diff.numel():
            i = int(diff[0, 0])
            out[part] = (i, float(low[start + i]), float(high[start + i]))
        start += f.numel()
    return out
