"""The functional core: one GradVac step on per-block Gramians.

Nothing here knows about ``torch.distributed``: Gramians and targets go in, per-block
coefficients and new targets come out. Every distributed path ends up calling
:func:`gradvac_step` with identical inputs on every rank.

Reference: Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, *Gradient Vaccine: Investigating and
Improving Multi-task Optimization in Massively Multilingual Models*, ICLR 2021,
https://arxiv.org/abs/2010.05874 .
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._blocks import exact_arithmetic

__all__ = ["SCALAR_STAGE_MAX_VISITS", "GradVacStepResult", "StepWorkspace", "draw_order", "gradvac_step"]

#: Up to this many visits (``K m (m - 1)``) a float64 step on the CPU runs as plain Python float
#: arithmetic, the same formulas visit by visit; above it, as the vectorised torch loop. The torch
#: loop dispatches about a dozen ops per visit step whatever the size; the scalar loop costs a few
#: microseconds per visit, so it wins for few visits and loses for many; this is where the two
#: cross on a CPU (timings: docs/design.md, "Thresholds"; ``python -m benchmarks core``).
SCALAR_STAGE_MAX_VISITS = 128


class GradVacStepResult(NamedTuple):
    """What one GradVac step returns: a named tuple of four tensors.

    Each argument is the field of the same name (the tuple unpacks in this order).

    Args:
        coefficients: ``[K, m]``; the aggregated gradient of block ``k`` is
            ``sum_l coefficients[k, l] * g_l`` restricted to block ``k``.
        targets: ``[K, m, m]``, the EMA targets after this step (a new tensor).
        cosines: ``[K, m, m]``; ``cosines[k, i, j]`` is the cosine ``phi`` measured when task ``i``
            visited task ``j`` in block ``k`` (task ``i``'s modified gradient against task ``j``'s
            original one), before any correction. The diagonal is 1.
        corrected: ``[K, m, m]`` bool; whether that visit applied a correction.

    The vectorised stage works blocks last (``[m, m, K]`` storage) and hands ``targets``,
    ``cosines`` and ``corrected`` back as ``[K, m, m]`` views of that storage, not packed: packing
    three such arrays cost about a fifth of the whole stage at m=64, K=500, and the next step reads
    its targets back in that layout with a plain copy. Index them as usual; call ``.contiguous()``
    where packed memory is needed (``.view`` of a flattened shape, a C extension).

    Example:
        The step of two conflicting tasks ``g_0 = (1, 0)``, ``g_1 = (-1, 1)`` in one block, from
        targets 0 (see :func:`gradvac_step`):

        >>> import torch
        >>> import gradvac_dist
        >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> gramians = (jacobian @ jacobian.T).unsqueeze(0)  # [K=1, m=2, m=2]
        >>> order = gradvac_dist.draw_order(2, torch.Generator().manual_seed(0))
        >>> result = gradvac_dist.gradvac_step(gramians, torch.zeros(1, 2, 2, dtype=torch.float64), order)
        >>> result._fields
        ('coefficients', 'targets', 'cosines', 'corrected')
        >>> result.coefficients.round(decimals=4).tolist()  # update = 2 g_0 + 1.5 g_1
        [[2.0, 1.5]]
        >>> result.cosines.round(decimals=4).tolist()
        [[[1.0, -0.7071], [-0.7071, 1.0]]]
        >>> result.corrected.tolist()  # both visits corrected: the cosine was below its target 0
        [[[False, True], [True, False]]]
        >>> result.targets.round(decimals=4).tolist()  # 0.5 * 0 + 0.5 * cosine
        [[[0.0, -0.3536], [-0.3536, 0.0]]]
    """

    coefficients: Tensor
    targets: Tensor
    cosines: Tensor
    corrected: Tensor


class StepWorkspace:
    """Buffers the vectorised stage reuses from one step to the next, for one run of steps.

    A step of the vectorised stage needs about ten ``[m-1, m, K]`` working arrays (16 MB each at
    m=64, K=500) that nothing outside it sees. Allocated fresh every step, host memory may cost a
    pass of page faults to map them and another to unmap them, depending on what else the process
    allocates (a kept workspace shortens the stage when nothing else keeps the heap warm, and
    changes nothing when something does: docs/design.md, "Thresholds"). A workspace keeps them (``nbytes`` says how
    much) and hands them back when the next step has the same ``m``, ``K``, dtype and device,
    overwriting every element before it is read, so results never depend on what a buffer held.
    The arrays a step returns are always fresh. Not shared between threads; pickled and copied
    empty (it is scratch, not state).
    """

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The buffer ``name``, uninitialised, of this shape, dtype and device (reallocated if any differ)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)  # release the old one before allocating its successor
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Releases every buffer."""
        self._buffers.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._buffers = {}


def draw_order(m: int, generator: torch.Generator) -> Tensor:
    """Draws the visiting orders of one GradVac step from ``generator`` alone.

    Row ``i`` of the result lists the ``m - 1`` tasks other than ``i`` in the order task ``i``
    visits them. The draw is, exactly::

        keys = torch.rand((m, m - 1), generator=generator, dtype=torch.float64)
        perm = keys.argsort(dim=1, stable=True)          # a permutation of 0..m-2 per row
        order[i, s] = perm[i, s] + (perm[i, s] >= i)      # skip task i itself

    so any process holding a generator in the same state draws the same orders, and the
    generator advances by the same amount whatever the device of the tensors it will be used on.

    Args:
        m: the number of tasks (at least 1).
        generator: a CPU ``torch.Generator``.

    Returns:
        A CPU ``LongTensor`` of shape ``[m, m - 1]``.

    Raises:
        ValueError: ``m`` is not an int ``>= 1``, or ``generator`` is not a CPU ``torch.Generator``.

    Example:
        >>> import torch
        >>> import gradvac_dist
        >>> generator = torch.Generator().manual_seed(0)
        >>> gradvac_dist.draw_order(3, generator).tolist()  # task 0 visits task 2, then task 1
        [[2, 1], [0, 2], [0, 1]]
        >>> gradvac_dist.draw_order(3, generator).tolist()  # the next step: the generator advanced
        [[1, 2], [2, 0], [1, 0]]
        >>> again = torch.Generator().manual_seed(0)
        >>> gradvac_dist.draw_order(3, again).tolist()  # the same seed, the same orders
        [[2, 1], [0, 2], [0, 1]]
    """
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"draw_order: m must be an int >= 1 (the number of tasks), got {m!r}.")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(
            "draw_order: generator must be a CPU torch.Generator, so that every rank draws the same "
            f"orders whatever its accelerator; got {generator!r}."
        )
    keys = torch.rand((m, m - 1), generator=generator, dtype=torch.float64)
    perm = keys.argsort(dim=1, stable=True)
    rows = torch.arange(m).unsqueeze(1)
    return perm + (perm >= rows).long()


def _draw_visits(m: int, generator: torch.Generator) -> list[list[int]]:
    """:func:`draw_order` as nested lists, for the scalar stage: the same keys from the generator
    (which advances the same), sorted by Python's sort, stable as ``argsort(stable=True)``: the
    same orders with two torch calls instead of six."""
    visits = []
    for i, row in enumerate(torch.rand((m, m - 1), generator=generator, dtype=torch.float64).tolist()):
        visits.append([p + (p >= i) for p in sorted(range(m - 1), key=row.__getitem__)])
    return visits


def uses_scalar_stage(gramians: Tensor, targets: Tensor, dtype: torch.dtype = torch.float64) -> bool:
    """Whether :func:`gradvac_step` runs these inputs through the scalar stage (a function of shapes,
    devices and dtype alone, identical on every rank)."""
    num_blocks, m = gramians.shape[0], gramians.shape[1]
    return (
        gramians.device.type == "cpu"
        and dtype == torch.float64
        and targets.device.type == "cpu"
        and num_blocks * m * (m - 1) <= SCALAR_STAGE_MAX_VISITS
    )


def step_with_drawn_order(
    gramians: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    *,
    beta: float,
    eps: float,
    check_inputs: bool,
    workspace: StepWorkspace | None,
) -> GradVacStepResult:
    """``gradvac_step(gramians, targets, draw_order(m, generator), ...)``, drawing the order in the form
    the stage reads (lists for the scalar stage, where a tensor would cost more than the step)."""
    if not check_inputs and uses_scalar_stage(gramians, targets):
        return _step_scalar(gramians, targets, _draw_visits(gramians.shape[1], generator), float(beta), float(eps))
    order = draw_order(gramians.shape[1], generator)
    if gramians.device.type != "cpu":  # pinned, so the copy is asynchronous: no host synchronisation
        order = order.pin_memory().to(gramians.device, non_blocking=True)
    return gradvac_step(gramians, targets, order, beta=beta, eps=eps, check_inputs=check_inputs, workspace=workspace)


def _check_inputs(gramians: Tensor, targets: Tensor, order: Tensor, beta: float, eps: float) -> None:
    """Validates the user-facing arguments of :func:`gradvac_step` (four host syncs: the order, the
    finiteness of gramians and of targets, the symmetry)."""
    if not isinstance(gramians, Tensor) or gramians.dim() != 3 or gramians.shape[1] != gramians.shape[2]:
        shape = tuple(gramians.shape) if isinstance(gramians, Tensor) else type(gramians).__name__
        raise ValueError(
            f"gradvac_step: gramians must be a tensor of shape [K, m, m] (one m x m Gramian per block), got {shape}."
        )
    num_blocks, m = gramians.shape[0], gramians.shape[1]
    if m < 1 or num_blocks < 1:
        raise ValueError(
            f"gradvac_step: need at least one block and one task, got gramians of shape {tuple(gramians.shape)}."
        )
    if not gramians.is_floating_point():
        raise ValueError(f"gradvac_step: gramians must be floating point, got {gramians.dtype}.")
    if not isinstance(targets, Tensor) or tuple(targets.shape) != (num_blocks, m, m):
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(
            f"gradvac_step: targets must have the shape of gramians, [K, m, m] = {[num_blocks, m, m]}, got {shape}."
        )
    if not isinstance(order, Tensor) or order.dtype != torch.long or tuple(order.shape) != (m, m - 1):
        desc = f"{order.dtype} {tuple(order.shape)}" if isinstance(order, Tensor) else type(order).__name__
        raise ValueError(
            f"gradvac_step: order must be a LongTensor of shape [m, m-1] = {[m, m - 1]} (row i: the "
            f"other tasks in task i's visiting order, e.g. from draw_order), got {desc}."
        )
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"gradvac_step: beta must be a number in [0, 1] (the EMA rate), got {beta!r}.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"gradvac_step: eps must be a number >= 0, got {eps!r}.")
    expected = torch.arange(m, device=order.device).expand(m, m)
    others = expected[~torch.eye(m, dtype=torch.bool, device=order.device)].view(m, m - 1)
    ok_order = torch.equal(order.sort(dim=1).values, others)
    finite_g = bool(torch.isfinite(gramians).all())
    finite_t = bool(torch.isfinite(targets).all())
    if not ok_order:
        raise ValueError(
            "gradvac_step: each row i of order must be a permutation of the tasks other than i "
            f"(for m={m}: row 0 a permutation of 1..{m - 1}, and so on), got {order.tolist()}."
        )
    if not finite_g:
        raise ValueError(
            "gradvac_step: gramians contain inf or NaN; a task gradient is not finite. Skip this "
            "step (or unscale with a GradScaler first) rather than feed it to GradVac."
        )
    if not finite_t:
        raise ValueError("gradvac_step: targets contain inf or NaN; they must lie in [-1, 1].")
    if m > 1:
        # Rounding makes a computed Gramian slightly asymmetric; a wrong input is off by O(1).
        g64 = gramians.double()
        diag = torch.diagonal(g64, dim1=1, dim2=2).abs()
        scale = (diag.unsqueeze(2) * diag.unsqueeze(1)).sqrt()
        if bool(((g64 - g64.transpose(1, 2)).abs() > 1e-4 * scale + 1e-300).any()):
            raise ValueError("gradvac_step: every Gramian must be symmetric (G[k] == G[k].T); got an asymmetric one.")


def gradvac_step(
    gramians: Tensor,
    targets: Tensor,
    order: Tensor,
    *,
    beta: float = 0.5,
    eps: float = 1e-8,
    dtype: torch.dtype = torch.float64,
    check_inputs: bool = True,
    workspace: StepWorkspace | None = None,
) -> GradVacStepResult:
    r"""Runs one GradVac step on per-block Gramians.

    With task gradients :math:`g_1..g_m` split into blocks, :math:`G_k[a, b] = \langle g_{a,k},
    g_{b,k}\rangle`. For every task :math:`i` (all at once) its modified gradient
    :math:`p_i = g_i` visits the other tasks :math:`j` in ``order[i]``; in every block :math:`k`:

    1. :math:`\phi = \langle p_{i,k}, g_{j,k}\rangle / (\|p_{i,k}\| \|g_{j,k}\| + \epsilon)`,
       clamped to :math:`[-1, 1]`;
    2. if :math:`\phi < T_{kij}`, with :math:`t = T_{kij}`:
       :math:`p_{i,k} \mathrel{+}= \|p_{i,k}\| \frac{t\sqrt{1-\phi^2} - \phi\sqrt{1-t^2}}
       {\|g_{j,k}\|\sqrt{1-t^2} + \epsilon}\, g_{j,k}`;
    3. always :math:`T_{kij} \leftarrow (1-\beta) T_{kij} + \beta\phi` (the :math:`\phi` of step 1).

    The result is :math:`\sum_i p_i`. Each :math:`p_{i,k}` stays a combination
    :math:`\sum_l A_k[i, l]\, g_{l,k}`, so the step runs on the Gramians alone
    (:math:`\langle p_i, g_j\rangle = (A_k G_k)[i, j]`,
    :math:`\|p_i\|^2 = (A_k G_k A_k^\top)[i, i]`) and returns
    ``coefficients[k, l] = sum_i A_k[i, l]``.

    The ``m - 1`` visits run as sequential steps vectorised over all tasks and blocks, with
    incremental updates and no host synchronisation: only the dot products still needed,
    :math:`\langle p_i, g_{order[i, r]}\rangle` for later visits ``r``, are kept and updated
    (at most ``K m^2`` numbers per visit, stored blocks-last so every gather reads whole rows). It is
    numerically safe: cosines are clamped to ``[-1, 1]``, square-root arguments at 0, a zero-norm
    ``g_j``, a target of exactly ``+-1`` (no finite ``w`` reaches it) or a zero denominator when
    ``eps == 0`` gives no correction, so targets stay in ``[-1, 1]`` and nothing non-finite comes
    out of finite inputs. Small float64 problems on the CPU (at most
    :data:`SCALAR_STAGE_MAX_VISITS` visits ``K m (m - 1)``) run the same arithmetic as plain Python
    floats instead, where a dozen torch dispatches per visit step would cost more than the work.

    This matches LibMTL's ``GradVac`` (main branch) and the paper, ICLR 2021,
    https://arxiv.org/abs/2010.05874 .

    Args:
        gramians: ``[K, m, m]``, one symmetric Gramian per block.
        targets: ``[K, m, m]``, ``targets[k, i, j]`` is the EMA target of pair ``(i, j)`` in
            block ``k`` (start at zeros). Not mutated.
        order: ``LongTensor [m, m - 1]``, row ``i`` lists the other tasks in task ``i``'s
            visiting order, shared by all blocks (see :func:`draw_order`).
        beta: EMA rate of the targets, in ``[0, 1]``.
        eps: the stabiliser added to both denominators, ``>= 0``.
        dtype: the precision of the whole computation (float64 by default, whatever the
            Gramians' dtype); results come back in this dtype, on the Gramians' device.
        check_inputs: validate shapes, the order, symmetry and finiteness (four host syncs).
            Internal callers that built the inputs themselves pass False; the step itself has none.
        workspace: a :class:`StepWorkspace` whose buffers the vectorised stage reuses (it keeps its
            working arrays there for the next call); ``None``: fresh arrays, freed on return. The
            trajectory of a :class:`~gradvac_dist.GradVac` or :class:`~gradvac_dist.GradVacState`
            keeps one.

    Returns:
        A :class:`GradVacStepResult` ``(coefficients, targets, cosines, corrected)``.

    Raises:
        ValueError: with ``check_inputs``: ``gramians`` not a floating-point ``[K, m, m]`` tensor,
            ``targets`` not of its shape, ``order`` not a ``LongTensor [m, m - 1]`` whose row ``i``
            is a permutation of the tasks other than ``i``, ``beta`` outside ``[0, 1]``,
            ``eps < 0``, inf or NaN in ``gramians`` or ``targets``, or an asymmetric Gramian.

    Example:
        Two tasks ``g_0 = (1, 0)`` and ``g_1 = (-1, 1)`` in one block, two steps of a trajectory:

        >>> import torch
        >>> import gradvac_dist
        >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> gramians = (jacobian @ jacobian.T).unsqueeze(0)  # [K=1, m=2, m=2]
        >>> targets = torch.zeros(1, 2, 2, dtype=torch.float64)
        >>> generator = torch.Generator().manual_seed(0)
        >>> result = gradvac_dist.gradvac_step(gramians, targets, gradvac_dist.draw_order(2, generator))
        >>> result.coefficients.round(decimals=4).tolist()
        [[2.0, 1.5]]
        >>> (result.coefficients[0] @ jacobian).round(decimals=4).tolist()  # the update, sum_i p_i
        [0.5, 1.5]
        >>> result = gradvac_dist.gradvac_step(gramians, result.targets, gradvac_dist.draw_order(2, generator))
        >>> result.targets.round(decimals=4).tolist()  # EMA towards the measured cosine, -0.7071
        [[[0.0, -0.5303], [-0.5303, 0.0]]]
    """
    if check_inputs:
        _check_inputs(gramians, targets, order, beta, eps)
    if uses_scalar_stage(gramians, targets, dtype):
        return _step_scalar(gramians, targets, order.tolist(), float(beta), float(eps))
    with exact_arithmetic(gramians.device):  # the whole stage keeps ``dtype``, whatever autocast says
        return _step(gramians, targets, order, beta, eps, dtype, workspace)


def _step_scalar(
    gramians: Tensor, targets: Tensor, visits: list[list[int]], beta: float, eps: float
) -> GradVacStepResult:
    """:func:`_step` for small problems on the host: the same arithmetic, in Python floats (float64).

    Same operations in the same order as the vectorised loop, one visit at a time, so both agree to
    rounding; which one runs depends only on ``K``, ``m``, device and dtype, identical on every rank.
    ``visits[i][s]``: the task that task ``i`` visits at step ``s`` (``order.tolist()``).
    """
    num_blocks, m = gramians.shape[0], gramians.shape[1]
    grams = gramians.to(torch.float64).tolist()
    old = targets.to(torch.float64).tolist()
    coef = [[1.0] * m for _ in range(num_blocks)]
    new = [[row[:] for row in block] for block in old]
    cos = [[[1.0 if a == b else 0.0 for b in range(m)] for a in range(m)] for _ in range(num_blocks)]
    corrected = [[[False] * m for _ in range(m)] for _ in range(num_blocks)]
    sqrt, keep = math.sqrt, 1.0 - beta
    for k in range(num_blocks):
        raw = grams[k]
        gram = [[0.5 * (raw[a][b] + raw[b][a]) for b in range(m)] for a in range(m)]
        g_sq = [max(gram[a][a], 0.0) for a in range(m)]
        p_sq = g_sq[:]
        dots = [[gram[i][j] for j in visits[i]] for i in range(m)]
        t_k, coef_k, new_k, cos_k, corrected_k = old[k], coef[k], new[k], cos[k], corrected[k]
        for s in range(m - 1):
            for i in range(m):
                j = visits[i][s]
                gj_sq = g_sq[j]
                gj_norm = sqrt(gj_sq)
                t = t_k[i][j]
                sqrt_1_t2 = sqrt(max(1.0 - t * t, 0.0))
                w_den = gj_norm * sqrt_1_t2 + eps
                p_norm = sqrt(max(p_sq[i], 0.0))
                den = eps + p_norm * gj_norm
                dot = dots[i][s]
                phi = 0.0 if den <= 0.0 else min(max(dot / den, -1.0), 1.0)
                if phi < t and gj_sq > 0.0 and sqrt_1_t2 > 0.0 and w_den > 0.0:
                    sqrt_1_phi2 = sqrt(max(1.0 - phi * phi, 0.0))
                    w = (t * sqrt_1_phi2 - phi * sqrt_1_t2) * p_norm / w_den
                    corrected_k[i][j] = True
                    coef_k[j] += w
                    p_sq[i] += 2.0 * (w * (dot + 0.5 * w * gj_sq))
                    row_j, later = gram[j], dots[i]
                    for r in range(s + 1, m - 1):
                        later[r] += w * row_j[visits[i][r]]
                new_k[i][j] = keep * t + beta * phi
                cos_k[i][j] = phi
    # One float64 tensor for coefficients, targets and cosines (three views of it), one for the flags:
    # at these sizes each tensor built costs more than the arithmetic above.
    flat = [c for block in coef for c in block]
    for blocks in (new, cos):
        flat.extend(x for block in blocks for row in block for x in row)
    values = torch.tensor(flat, dtype=torch.float64, device=gramians.device)
    km, kmm = num_blocks * m, num_blocks * m * m
    flags = [x for block in corrected for row in block for x in row]
    return GradVacStepResult(
        values[:km].view(num_blocks, m),
        values[km : km + kmm].view(num_blocks, m, m),
        values[km + kmm :].view(num_blocks, m, m),
        torch.tensor(flags, dtype=torch.bool, device=gramians.device).view(num_blocks, m, m),
    )


def _blocks_last(x: Tensor, out: Tensor) -> Tensor:
    """Copies ``x`` (``[K, m, m]``) into ``out`` (``[m, m, K]``, contiguous) and returns ``out``.

    A packed ``x`` is copied as the transpose of a ``[K, m m]`` matrix: torch copies that 2-D
    transpose several times as fast as the 3-D permutation. A view of
    blocks-last storage (the targets a step returned) is a plain copy either way.
    """
    num_blocks = x.shape[0]
    permuted = x.permute(1, 2, 0)
    if permuted.is_contiguous() or not x.is_contiguous():
        return out.copy_(permuted)
    out.view(-1, num_blocks).copy_(x.view(num_blocks, -1).T)
    return out


def _step(
    gramians: Tensor,
    targets: Tensor,
    order: Tensor,
    beta: float,
    eps: float,
    dtype: torch.dtype,
    workspace: StepWorkspace | None = None,
) -> GradVacStepResult:
    device = gramians.device
    num_blocks, m = gramians.shape[0], gramians.shape[1]
    order = order.to(device)
    if m == 1:
        ones = torch.ones((num_blocks, 1), dtype=dtype, device=device)
        return GradVacStepResult(
            ones, targets.to(device=device, dtype=dtype, copy=True), ones.view(-1, 1, 1), ones.view(-1, 1, 1) < 0
        )

    # Full-size [m, m, K] arrays are few and written in place where they can be: at m=64, K=500 each
    # is 16 MB, and a fresh one costs a pass of page faults besides its arithmetic. The working ones
    # come from the workspace (reused from the previous step) when there is one; the three returned
    # (targets, cosines, corrected) are always fresh.
    def work(name: str, shape: tuple[int, ...], kind: torch.dtype = dtype) -> Tensor:
        if workspace is None:
            return torch.empty(shape, dtype=kind, device=device)
        return workspace.get(name, shape, kind, device)

    # Blocks last: row a*m + b holds the K values of pair (a, b), so every gather below is a
    # contiguous index_select of whole rows.
    def blocks_first(x: Tensor) -> Tensor:  # a view: the results keep the blocks-last storage (see GradVacStepResult)
        return x.view(m, m, num_blocks).permute(2, 0, 1)

    # Exact symmetry: rounding can break it slightly. One strided copy, then a sum of contiguous
    # rows (adding two permuted views would stride through both, which is slower).
    raw = _blocks_last(gramians, work("raw", (m, m, num_blocks)))
    gram = torch.add(raw, raw.transpose(0, 1), out=work("gram", (m, m, num_blocks))).mul_(0.5).view(m * m, num_blocks)
    # a copy of its own, updated in place below into the new targets (returned: fresh)
    old_targets = torch.empty((m * m, num_blocks), dtype=dtype, device=device)
    _blocks_last(targets, old_targets.view(m, m, num_blocks))

    # Visit s of task i is the pair (i, order[i, s]). Everything is laid out visit-first,
    # [m-1, m, K], so each visit reads contiguous slices. pair_index[s, i] is the pair's row.
    visits = order.T.contiguous()  # visits[s, i] = order[i, s]
    pair_index = (torch.arange(m, device=device).unsqueeze(0) * m + visits).reshape(-1)
    # next_index[s, r, i]: the row of pair (order[i, s], order[i, r]), the Gramian entry that turns
    # a correction at visit s into a change of the dot product needed at visit r > s.
    next_index = visits.unsqueeze(1) * m + visits.unsqueeze(0)  # [m-1, m-1, m]
    shape = (m - 1, m, num_blocks)
    flat = ((m - 1) * m, num_blocks)  # the same, as rows for index_select's out=
    g_sq = gram.index_select(0, torch.arange(m, device=device) * (m + 1)).clamp_min(0.0)  # |g_l|^2, [m, K]
    gj_sq = torch.index_select(g_sq, 0, visits.reshape(-1), out=work("gj_sq", flat)).view(shape)
    # m K square roots, not m^2 K
    gj_norm = torch.index_select(g_sq.sqrt(), 0, visits.reshape(-1), out=work("gj_norm", flat)).view(shape)
    t_all = torch.index_select(old_targets, 0, pair_index, out=work("t_all", flat)).view(shape)
    # 1 - t^2, as rounded before
    sqrt_1_t2 = torch.mul(t_all, t_all, out=work("sqrt_1_t2", shape)).neg_().add_(1.0).clamp_min_(0.0).sqrt_()
    w_den = torch.mul(gj_norm, sqrt_1_t2, out=work("w_den", shape)).add_(eps)
    # No correction for a zero g_j, nor where sqrt(1 - t^2) = 0 (a target of exactly +-1): reaching a
    # cosine of +-1 would take an infinite w, and the formula's w then divides by eps alone (|p|/eps,
    # 1e8 |p|, set off by rounding noise in phi): with beta = 1 and parallel gradients that overflowed
    # float32 within two steps.
    can = torch.gt(gj_sq, 0, out=work("can", shape, torch.bool))
    flags = work("flags", shape, torch.bool)  # a bool temporary
    can.logical_and_(torch.gt(sqrt_1_t2, 0, out=flags))
    if eps <= 0:  # with eps > 0, w_den >= eps > 0 everywhere (a Python float: no host sync)
        can.logical_and_(torch.gt(w_den, 0, out=flags))
    w_den.masked_fill_(torch.logical_not(can, out=flags), 1.0)
    # dots[s, i] = <p_i, g_order[i, s]>, kept current as p_i is corrected (starts as <g_i, g_j>).
    dots = torch.index_select(gram, 0, pair_index, out=work("dots", flat)).view(shape)
    p_sq = g_sq.clone()  # |p_i|^2
    phis = work("phis", shape)
    weights = work("weights", shape)
    applied = work("applied", shape, torch.bool)
    eps_t = torch.full((), eps, dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)
    # One scratch buffer for the per-visit gathers (the raw Gramians' copy, done with): a fresh
    # allocation per visit costs more than the gather itself (page faults on large K m m).
    scratch = raw.view(m * m, num_blocks)

    # Per-visit views, made once (indexing in the loop would dispatch one select per tensor per visit).
    per_visit = zip(
        *(x.unbind(0) for x in (dots, t_all, phis, weights, applied, gj_norm, gj_sq, can, sqrt_1_t2, w_den))
    )
    for s, (dot, t, phi, w, do, gj_norm_s, gj_sq_s, can_s, sqrt_1_t2_s, w_den_s) in enumerate(per_visit):
        p_norm = p_sq.clamp_min(0.0).sqrt_()
        den = torch.addcmul(eps_t, p_norm, gj_norm_s)  # |p| |g_j| + eps
        torch.div(dot, den, out=phi)
        if eps <= 0:  # only a zero eps can leave a zero denominator (a Python float: no host sync)
            phi.masked_fill_(den <= 0, 0.0)
        phi.clamp_(-1.0, 1.0)
        torch.lt(phi, t, out=do).logical_and_(can_s)
        # |phi| <= 1 makes 1 - phi^2 >= 0 however it rounds (with or without a fused multiply-add)
        sqrt_1_phi2 = torch.addcmul(one, phi, phi, value=-1.0).sqrt_()
        # w = |p| (t sqrt(1 - phi^2) - phi sqrt(1 - t^2)) / (|g_j| sqrt(1 - t^2) + eps), where corrected
        torch.mul(t, sqrt_1_phi2, out=w).sub_(phi * sqrt_1_t2_s).mul_(p_norm).div_(w_den_s).mul_(do)
        # p_i += w g_j: |p|^2 += 2 w <p, g_j> + w^2 |g_j|^2, and <p_i, g_r> += w G[j, r] for later visits.
        p_sq.add_(w * torch.addcmul(dot, w, gj_sq_s, value=0.5), alpha=2.0)
        if s < m - 2:
            rows = (m - 2 - s) * m
            later = torch.index_select(gram, 0, next_index[s, s + 1 :].reshape(-1), out=scratch[:rows])
            dots[s + 1 :].addcmul_(w.unsqueeze(0), later.view(m - 2 - s, m, num_blocks))

    # coefficients[l] = 1 (each p_i starts as g_i) + every w added to a p_i along g_l.
    coef = torch.ones((m, num_blocks), dtype=dtype, device=device)
    coef.index_add_(0, visits.reshape(-1), weights.view(-1, num_blocks))
    # the EMA (1 - beta) t + beta phi, in buffers the loop is done with
    ema = torch.mul(t_all, 1.0 - beta, out=gj_sq).add_(torch.mul(phis, beta, out=gj_norm))
    new_targets = old_targets.index_copy_(0, pair_index, ema.view(-1, num_blocks))
    # pair_index lists every pair (i, j != i) exactly once (row i of order is a permutation of the
    # others), so the copies below overwrite every row but the diagonal ones, set first.
    cosines = torch.empty((m * m, num_blocks), dtype=dtype, device=device)
    cosines[:: m + 1].fill_(1.0)  # the diagonal pairs (a, a)
    cosines.index_copy_(0, pair_index, phis.view(-1, num_blocks))
    corrected = torch.empty((m * m, num_blocks), dtype=torch.bool, device=device)
    corrected[:: m + 1].fill_(False)
    corrected.index_copy_(0, pair_index, applied.view(-1, num_blocks))
    return GradVacStepResult(
        coef.T.contiguous(), blocks_first(new_targets), blocks_first(cosines), blocks_first(corrected)
    )
