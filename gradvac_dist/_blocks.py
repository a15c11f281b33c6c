"""Blocks: the partition of the parameters, partial Gramians of a piece, combining a piece.

A *piece* is any ``[m, L]`` slice of the per-task gradients laid out as a flat vector (a whole
Jacobian, a DDP bucket, a rank's shard of a bucket, an FSDP shard). It is described by its
*segments*: ``(block, start, stop)`` triples saying that columns ``start:stop`` of the piece
belong to block ``block``. A block id of ``-1`` marks columns GradVac does not act on (they are
summed plainly). Partial Gramians of the pieces of a vector add up to the Gramians of the whole
vector, which is what lets the distributed paths reduce ``K*m*m`` numbers instead of gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "GROUPINGS",
    "BlockLayout",
    "Segment",
    "append_segment",
    "combine",
    "contiguous_segments",
    "exact_arithmetic",
    "gramian_row",
    "layout_of",
    "partial_gramians",
    "segments_of_range",
]

#: The ways of splitting the parameters into blocks, each with its own Gramian and targets:
#: ``"whole"`` (one block), ``"parameter"`` (one per parameter tensor, LibMTL's ``all_matrix``),
#: ``"module"`` (one per module directly owning parameters, LibMTL's ``all_layer``).
GROUPINGS: tuple[str, ...] = ("whole", "parameter", "module")
Segment = tuple[int, int, int]  # (block, start, stop) in the coordinates of a piece

#: Columns per chunk when streaming a Gramian: the whole chunks of a segment go through ONE batched
#: matmul over a strided view (no copy), each chunk's [m, m] product summed in float64. The size
#: balances the batched matmul's efficiency against the float64 partial sums it leaves (timings
#: against one ``J @ J.T`` and other chunk sizes: docs/design.md, "Thresholds").
GRAMIAN_CHUNK = 1 << 14


@dataclass(frozen=True)
class BlockLayout:
    """Which block each parameter belongs to.

    Attributes:
        numels: number of elements of each parameter, in parameter order.
        param_blocks: block id of each parameter (``-1``: not acted on by GradVac, summed plainly).
        num_blocks: K, the number of blocks.
        names: a readable name per block (for errors and logs).
    """

    numels: tuple[int, ...]
    param_blocks: tuple[int, ...]
    num_blocks: int
    names: tuple[str, ...]

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Number of elements of each block."""
        sizes = [0] * self.num_blocks
        for numel, block in zip(self.numels, self.param_blocks):
            if block >= 0:
                sizes[block] += numel
        return tuple(sizes)

    def segments(self) -> list[Segment]:
        """Segments of the flat concatenation of all parameters, adjacent runs merged."""
        out: list[Segment] = []
        start = 0
        for numel, block in zip(self.numels, self.param_blocks):
            append_segment(out, block, start, start + numel)
            start += numel
        return out


def append_segment(out: list[Segment], block: int, start: int, stop: int) -> None:
    """Appends ``(block, start, stop)`` to ``out``, merged into the last segment when it continues it;
    an empty range is dropped."""
    if stop <= start:
        return
    if out and out[-1][0] == block and out[-1][2] == start:
        out[-1] = (block, out[-1][1], stop)
    else:
        out.append((block, start, stop))


def contiguous_segments(block_sizes: Sequence[int]) -> list[Segment]:
    """Segments of a vector made of contiguous blocks of the given sizes."""
    out: list[Segment] = []
    start = 0
    for block, size in enumerate(block_sizes):
        append_segment(out, block, start, start + int(size))
        start += int(size)
    return out


def segments_of_range(segments: Sequence[Segment], start: int, stop: int) -> list[Segment]:
    """The segments of columns ``start:stop`` of a piece, re-based so that ``start`` is 0."""
    out: list[Segment] = []
    for block, s, e in segments:
        lo, hi = max(s, start), min(e, stop)
        if lo < hi:
            append_segment(out, block, lo - start, hi - start)
    return out


def layout_of(
    module: nn.Module | None,
    params: Sequence[nn.Parameter],
    grouping: str,
    shared_params: Iterable[nn.Parameter | str] | None = None,
) -> BlockLayout:
    """The blocks of ``params`` under ``grouping``: :func:`acted_on` then :func:`assign_blocks`.

    Args:
        module: the module owning ``params`` (needed for ``grouping="module"``).
        params: the parameters, in the order of the flat gradient.
        grouping: ``"whole"`` (one block), ``"parameter"`` (one block per parameter tensor: LibMTL's
            ``all_matrix``) or ``"module"`` (one block per module that directly owns parameters,
            i.e. per leaf layer: LibMTL's ``all_layer``).
        shared_params: if given, only these parameters are grouped into blocks (Parameter objects,
            or names / module-name prefixes of ``module``'s parameters); every other parameter gets
            block ``-1`` (its gradient is the plain sum of its task gradients).
    """
    if grouping not in GROUPINGS:
        raise ValueError(
            f"grouping must be one of {GROUPINGS} (one block for the whole model, one per parameter "
            f"tensor, one per layer), got {grouping!r}."
        )
    return assign_blocks(module, params, grouping, acted_on(module, params, shared_params))


def acted_on(
    module: nn.Module | None, params: Sequence[nn.Parameter], shared_params: Iterable[nn.Parameter | str] | None
) -> list[bool]:
    """Per parameter, whether GradVac acts on it: ``shared_params`` (Parameter objects, or names /
    module-name prefixes of ``module``'s parameters) resolved against ``params``; all of them if ``None``."""
    if shared_params is None:
        return [True] * len(params)
    shared = list(shared_params)
    if not shared:
        raise ValueError("shared_params is empty: pass the parameters GradVac should act on, or None for all.")
    names_by_id = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
    prefixes = [s for s in shared if isinstance(s, str)]
    shared_ids = {id(p) for p in shared if not isinstance(p, str)}
    if prefixes and module is None:
        raise ValueError("shared_params given by name need the module: pass a module, not a list of parameters.")
    if not shared_ids <= {id(p) for p in params}:
        raise ValueError(
            "shared_params contains parameters that are not trainable parameters of the model; pass "
            "a subset of model.parameters() with requires_grad=True."
        )

    def matches(p: nn.Parameter) -> bool:
        name = names_by_id.get(id(p), "")
        return id(p) in shared_ids or any(name == q or name.startswith(q + ".") for q in prefixes)

    acted = [matches(p) for p in params]
    unmatched = [q for q in prefixes if not any(n == q or n.startswith(q + ".") for n in names_by_id.values())]
    if unmatched:
        raise ValueError(
            f"shared_params names {unmatched} match no parameter of the model; use names from "
            "model.named_parameters() (or a module prefix such as 'encoder')."
        )
    return acted


def assign_blocks(
    module: nn.Module | None, params: Sequence[nn.Parameter], grouping: str, acted: Sequence[bool]
) -> BlockLayout:
    """The layout of ``params``: each acted-on, non-empty parameter gets the block ``grouping`` gives
    it (blocks numbered in order of first appearance), every other parameter block ``-1``."""
    param_names: list[str] = [f"param{i}" for i in range(len(params))]
    owner: list[str] = list(param_names)
    if module is not None:
        by_id = {}
        for mod_name, mod in module.named_modules(remove_duplicate=True):
            for p_name, p in mod.named_parameters(recurse=False):
                if id(p) not in by_id:
                    by_id[id(p)] = (mod_name, f"{mod_name}.{p_name}" if mod_name else p_name)
        for i, p in enumerate(params):
            if id(p) in by_id:
                owner[i], param_names[i] = by_id[id(p)]
    elif grouping == "module":
        raise ValueError('grouping="module" needs the module: pass a module, not a list of parameters.')

    blocks: list[int] = []
    names: list[str] = []
    key_to_block: dict[str, int] = {}
    for i in range(len(params)):
        if not acted[i] or params[i].numel() == 0:  # nothing to act on in a 0-element parameter: no empty block
            blocks.append(-1)
            continue
        if grouping == "whole":
            key = "whole"
        elif grouping == "parameter":
            key = f"p:{param_names[i]}:{i}"
        else:
            key = f"m:{owner[i]}"
        if key not in key_to_block:
            key_to_block[key] = len(names)
            names.append(
                "whole"
                if grouping == "whole"
                else (param_names[i] if grouping == "parameter" else owner[i] or "<root>")
            )
        blocks.append(key_to_block[key])
    if not names:
        raise ValueError("no parameter for GradVac to act on: the model has no trainable parameters in the chosen set.")
    return BlockLayout(tuple(p.numel() for p in params), tuple(blocks), len(names), tuple(names))


def exact_arithmetic(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Autocast off for ``device``'s type where a caller turned it on, so that GradVac's own matmuls keep
    their dtypes (an autocast region around ``backward`` would otherwise run them in bf16/fp16, and
    a comm hook runs under its caller's autocast state)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta"): nothing to turn off
        enabled = False
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


def partial_gramians(
    piece: Tensor,
    segments: Sequence[Segment],
    num_blocks: int,
    *,
    out: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Adds the per-block Gramians of ``piece`` into ``out`` (``[K, m, m]``) and returns it.

    The piece is streamed in chunks of :data:`GRAMIAN_CHUNK` columns: each chunk's Gramian is
    computed in the piece's dtype (float32 for half-precision pieces) and the chunks are summed in
    ``dtype`` (default float64), so a wide piece costs one pass over memory and no float64 copy.
    A float32 piece whose entries exceed about 1e19 overflows inside a chunk (the product of two
    such entries is past float32's range): the Gramian is then non-finite, which callers detect.
    Segments of block ``-1`` are skipped.
    """
    if piece.dim() != 2:
        raise ValueError(f"piece must be [m, L] (rows are task gradients), got shape {tuple(piece.shape)}.")
    m = piece.shape[0]
    acc_dtype = dtype or torch.float64
    if out is None:
        out = torch.zeros((num_blocks, m, m), dtype=acc_dtype, device=piece.device)
    work = piece if piece.dtype in (torch.float32, torch.float64) else piece.float()
    with exact_arithmetic(piece.device):
        for block, start, stop in segments:
            if block < 0:
                continue
            full = (stop - start) // GRAMIAN_CHUNK
            if full:
                # [full, m, CHUNK] view of the piece, no copy: one batched matmul for all whole chunks.
                x = work[:, start : start + full * GRAMIAN_CHUNK].unflatten(1, (full, GRAMIAN_CHUNK)).transpose(0, 1)
                out[block] += torch.bmm(x, x.transpose(1, 2)).sum(0, dtype=acc_dtype)
            tail = work[:, start + full * GRAMIAN_CHUNK : stop]
            if tail.shape[1]:
                out[block] += (tail @ tail.T).to(acc_dtype)
    return out


def gramian_row(piece: Tensor, row: int, segments: Sequence[Segment], out: Tensor) -> Tensor:
    """Adds ``<piece[row], piece[l]>`` per block into ``out`` (``[K, m]``, float64): one row of the
    partial Gramians, in the same chunked arithmetic as :func:`partial_gramians`."""
    work = piece if piece.dtype in (torch.float32, torch.float64) else piece.float()
    with exact_arithmetic(piece.device):
        for block, start, stop in segments:
            if block < 0:
                continue
            full = (stop - start) // GRAMIAN_CHUNK
            if full:
                x = work[:, start : start + full * GRAMIAN_CHUNK].unflatten(1, (full, GRAMIAN_CHUNK)).transpose(0, 1)
                out[block] += torch.bmm(x[:, row : row + 1], x.transpose(1, 2)).sum(0, dtype=out.dtype)[0]
            tail = work[:, start + full * GRAMIAN_CHUNK : stop]
            if tail.shape[1]:
                out[block] += (tail[row] @ tail.T).to(out.dtype)
    return out


def combine(piece: Tensor, coefficients: Tensor, segments: Sequence[Segment], *, out: Tensor | None = None) -> Tensor:
    """The aggregated gradient of a piece: column ``x`` of block ``k`` gets ``sum_l c[k, l] piece[l, x]``.

    Columns of block ``-1`` get the plain sum over tasks. The result has the piece's dtype; ``out``
    (``[L]``) may be given to write in place.
    """
    m, length = piece.shape
    if out is None:
        out = torch.empty(length, dtype=piece.dtype, device=piece.device)
    coef = coefficients.to(device=piece.device, dtype=piece.dtype)
    ones = torch.ones(m, dtype=piece.dtype, device=piece.device) if any(b < 0 for b, _, _ in segments) else coef
    with exact_arithmetic(piece.device):
        for block, start, stop in segments:
            row = ones if block < 0 else coef[block]
            torch.mm(row.unsqueeze(0), piece[:, start:stop], out=out[start:stop].unsqueeze(0))
    assert sum(stop - start for _, start, stop in segments) == length, "segments must cover the piece"
    return out
