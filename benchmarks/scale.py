"""Sizes at scale, on paper: per-step bytes and collectives of GradVac under DDP, from the formulas
the counters follow (``tests/distributed/test_scale.py`` checks them against ``state.counters`` at
W = 2, 3, 4), at world sizes and task counts this machine cannot run.

    python -m benchmarks scale              # the table of docs/scale.md
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

__all__ = ["main", "ring_bytes", "step_payload", "table"]

FLOAT64 = 8


def step_payload(n: int, m: int, num_blocks: int, world: int, strategy: str, grad_bytes: int = 4) -> dict[str, int]:
    """Payload bytes a rank hands to each kind of collective in one synchronising step after the first,
    for one DDP bucket of ``n`` gradient elements (what ``state.counters.bytes`` records).

    Sharded: m reduce-scatters of the bucket padded to ``W ceil(n/W)`` and one all-gather of as
    much; replicated: m all-reduces of ``n``. Both: the Gramian all-reduce of ``K m^2 + m + 4``
    float64 numbers (Gramians, non-finite flags, the rank fingerprint) and the input-check
    all-reduce of ``W`` float64 flags (the settings agreement replaces it at the first step).
    """
    padded = world * math.ceil(n / world)
    out = {"gramian_all_reduce": (num_blocks * m * m + m + 4) * FLOAT64, "input_all_reduce": world * FLOAT64}
    if strategy == "sharded":
        out["task_reduce_scatter"] = m * padded * grad_bytes
        out["result_all_gather"] = padded * grad_bytes
    elif strategy == "replicated":
        out["task_all_reduce"] = m * n * grad_bytes
    else:
        raise ValueError(f"strategy must be 'sharded' or 'replicated', got {strategy!r}")
    return out


def ring_bytes(payload: dict[str, int], world: int) -> float:
    """Bytes a rank sends with ring algorithms: all-reduce ``2 P (W-1)/W``, reduce-scatter and all-gather
    ``P (W-1)/W``."""
    f = (world - 1) / world
    return sum((2 if "all_reduce" in name else 1) * p * f for name, p in payload.items())


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}" if x >= 1e7 else f"{x / 1e9:.1e}"


def table(
    n: int = 10**9, worlds: Sequence[int] = (8, 64, 1024), ms: Sequence[int] = (3, 10, 64), blocks: int = 100
) -> str:
    """The markdown table of docs/scale.md (float32 gradients, ``blocks`` GradVac blocks)."""
    rows = [
        "| W | m | sharded: GB sent / rank / step | replicated | plain DDP (summed loss) | sharded / plain | "
        "Gramian all-reduce bytes sent | its share of sharded | input-check bytes sent | stash / rank, sharded (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for world in worlds:
        for m in ms:
            sharded = step_payload(n, m, blocks, world, "sharded")
            sent = ring_bytes(sharded, world)
            replicated = ring_bytes(step_payload(n, m, blocks, world, "replicated"), world)
            plain = 2 * n * 4 * (world - 1) / world
            gram = ring_bytes({"gramian_all_reduce": sharded["gramian_all_reduce"]}, world)
            flags = ring_bytes({"input_all_reduce": sharded["input_all_reduce"]}, world)
            stash = m * math.ceil(n / world) * 4
            rows.append(
                f"| {world} | {m} | {_gb(sent)} | {_gb(replicated)} | {_gb(plain)} | {sent / plain:.2f}x | "
                f"{gram:,.0f} | {gram / sent:.1e} | {flags:,.0f} | {_gb(stash)} |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__)
    ap.add_argument("--n", type=float, default=1e9, help="gradient elements (default 1e9)")
    ap.add_argument("--blocks", type=int, default=100, help="GradVac blocks K (default 100)")
    args = ap.parse_args(argv)
    print(table(int(args.n), blocks=args.blocks))
    return 0
