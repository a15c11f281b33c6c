"""The plain vector form of GradVac and PCGrad, written from the formulas in the design notes.

Deliberately naive: Python loops over tasks, visits and blocks, on explicit vectors. It is the
yardstick the vectorised Gramian implementation is tested against, so keep it obviously right.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gradvac_reference(
    grads: Tensor, block_sizes: list[int], targets: Tensor, order: Tensor, beta: float = 0.5, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """One GradVac step. grads [m, n]; targets [K, m, m] (not mutated); order [m, m-1].

    Returns (aggregated gradient [n], new targets [K, m, m]).
    """
    m = grads.shape[0]
    T = targets.clone()
    bounds = []
    start = 0
    for size in block_sizes:
        bounds.append((start, start + size))
        start += size
    out = torch.zeros_like(grads[0])
    for i in range(m):
        p = grads[i].clone()
        for j in order[i].tolist():
            for k, (b, e) in enumerate(bounds):
                pk, gk = p[b:e], grads[j, b:e]
                phi = torch.dot(pk, gk) / (pk.norm() * gk.norm() + eps)
                t = T[k, i, j]
                if phi < t:
                    w = (
                        pk.norm()
                        * (t * torch.sqrt(1 - phi**2) - phi * torch.sqrt(1 - t**2))
                        / (gk.norm() * torch.sqrt(1 - t**2) + eps)
                    )
                    p[b:e] = pk + w * gk
                T[k, i, j] = (1 - beta) * t + beta * phi
        out += p
    return out, T


def pcgrad_reference(grads: Tensor, order: Tensor) -> Tensor:
    """PCGrad (Yu et al., 2020) on the whole vector with the given visiting orders."""
    m = grads.shape[0]
    out = torch.zeros_like(grads[0])
    for i in range(m):
        p = grads[i].clone()
        for j in order[i].tolist():
            g = grads[j]
            d = torch.dot(p, g)
            if d < 0:
                p = p - d / torch.dot(g, g) * g
        out += p
    return out
