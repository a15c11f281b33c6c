"""Gramian weightings: any map from a block's Gramian ``[m, m]`` to task weights ``[m]``, as the
coefficient stage in place of GradVac's.

GradVac decides its update from the per-block Gramians alone, and so does every method of the
*Gramian weighting* family: UPGrad, MGDA, PCGrad, DualProj, IMTL-G, Aligned-MTL, ... (TorchJD's
``*Weighting`` classes of that kind map a Gramian to weights, and its aggregators are
``A(J) = w(J J^T) @ J``). So the machinery built for GradVac carries them unchanged: per-task
reductions, partial Gramians, ONE all-reduce, an identical computation on every rank, a combine.
With a grouping, the weighting is applied to each block's Gramian on its own.

What can run on every rank with the same result:

- a weighting with no state: it is called on identical float64 Gramians, on the host;
- one that draws random numbers from torch's global CPU generator (TorchJD's PCGrad): every step
  it runs inside ``torch.random.fork_rng`` seeded from the state's own generator, so the draws are
  identical on every rank, do not disturb the user's generator, and resume from a checkpoint.

What cannot, and is refused with an error saying why: a weighting with state of its own (TorchJD's
``Stateful`` ones, such as its GradVacWeighting; any ``nn.Module`` with parameters or buffers),
whose state the ranks would keep apart; and a weighting that needs the Jacobian itself (TorchJD's
matrix weightings), which the Gramians cannot give. TorchJD is never imported: its objects are
recognised by their classes' names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Weighting", "check_weighting", "weigh_blocks", "weighting_name"]

Weighting = Callable[[Tensor], Tensor]


def _class_names(obj: Any) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def check_weighting(weighting: Any) -> Weighting:
    """The Gramian weighting to use for ``weighting`` (a TorchJD Gramian-weighted aggregator gives
    its weighting); raises ``ValueError`` for what cannot run identically on every rank."""
    names = _class_names(weighting)
    inner = getattr(weighting, "gramian_weighting", None)
    if "GramianWeightedAggregator" in names and inner is not None:
        weighting, names = inner, _class_names(inner)
    if "_MatrixWeighting" in names or "MatrixWeighting" in names:
        raise ValueError(
            f"{type(weighting).__name__} weighs the Jacobian itself, not its Gramian; GradVac's machinery reduces "
            "each block to its m x m Gramian (that is what makes one small all-reduce enough), so only Gramian "
            "weightings can run here (UPGrad, MGDA, PCGrad, DualProj, IMTL-G, Aligned-MTL, ...)."
        )
    if "Aggregator" in names:
        raise ValueError(
            f"{type(weighting).__name__} is an aggregator without a Gramian weighting; pass a Gramian weighting "
            "(a callable from an [m, m] Gramian to [m] weights), e.g. torchjd.aggregation.UPGradWeighting()."
        )
    if "Stateful" in names or callable(getattr(weighting, "reset", None)):
        raise ValueError(
            f"{type(weighting).__name__} keeps state between steps, which each rank would update on its own and "
            "which no checkpoint of gradvac_dist would hold. Use a stateless weighting; for GradVac itself, leave "
            "weighting=None (GradVac's EMA targets are kept in the state, identical on every rank)."
        )
    if isinstance(weighting, nn.Module) and weighting.state_dict():
        raise ValueError(
            f"{type(weighting).__name__} has parameters or buffers ({', '.join(list(weighting.state_dict())[:3])}): "
            "state the ranks would keep apart. Use a stateless weighting."
        )
    if not callable(weighting):
        raise ValueError(
            f"weighting must be a callable from a Gramian [m, m] to weights [m], got {type(weighting).__name__}."
        )
    return weighting


def weighting_name(weighting: Weighting | None) -> str:
    """What the rank agreement compares: the weighting's qualified name, the same in every process.

    A function (or lambda) is named by its own module and qualified name, any other callable by its
    class's. Never by ``repr``, which holds a memory address for functions and for objects without
    a ``__repr__`` of their own. Two ranks with weightings of one class but other arguments agree
    here; the weights themselves are then made identical on every rank (see ``_engine``).
    """
    if weighting is None:
        return "GradVac"
    named = weighting if hasattr(weighting, "__qualname__") and not isinstance(weighting, type) else type(weighting)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', type(weighting).__qualname__)}"


def weigh_blocks(weighting: Weighting, gramians: Tensor, generator: torch.Generator) -> Tensor:
    """``[K, m]`` float64 weights, ``weighting`` applied to each block's Gramian ``[m, m]`` on the host.

    Any random draw the weighting makes comes from torch's CPU generator seeded from ``generator``
    (advanced by one draw a step, the same on every rank), inside ``fork_rng``.
    """
    num_blocks, m = gramians.shape[0], gramians.shape[1]
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    host = gramians.detach().to(device="cpu", dtype=torch.float64)
    out = torch.empty((num_blocks, m), dtype=torch.float64)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for k in range(num_blocks):
            weights = weighting(host[k])
            if not isinstance(weights, Tensor) or tuple(weights.shape) != (m,):
                desc = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
                raise ValueError(
                    f"the weighting {type(weighting).__name__} must return a tensor of m={m} weights for an "
                    f"[m, m] Gramian, got {desc}."
                )
            out[k] = weights.to(torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"the weighting {type(weighting).__name__} returned non-finite weights for finite Gramians "
            f"(block {int((~torch.isfinite(out)).any(1).nonzero()[0, 0])})."
        )
    return out
