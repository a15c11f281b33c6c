"""Benchmark: GradVac under FSDP2 against the same m-pass FSDP step without it.

    python -m benchmarks fsdp                 # 2 spawned gloo ranks on 127.0.0.1 (about a minute)
    python -m benchmarks fsdp --quick         # smoke run, a few seconds of timing
    torchrun --nproc_per_node 2 -m benchmarks fsdp      # under torchrun (CUDA + NCCL when present)

Every variant trains its own copy of the same residual multi-task MLP, sharded with ``fully_shard``
(each encoder block, then the root), on the same data; the variants run interleaved, a few steps
of each in turn, so machine noise hits them alike. The number quoted is the median over the timed
steps of the slowest rank's step time (forward, backward passes, optimizer step):

  (a) ``m-pass FSDP``: one forward, m backward passes accumulating into ``.grad``, with the same
      all-gather avoidance as GradVac (no reshard and no backward finalisation between passes):
      the same compute and the same FSDP communication as (d), without GradVac;
  (b) ``m-pass FSDP, FSDP defaults``: the same m passes with FSDP's per-pass behaviour, which
      re-all-gathers resharded parameters in every pass (what a naive loop does);
  (c) ``FSDP summed loss``: one backward pass on the summed loss (for scale);
  (d) ``GradVac-FSDP``: :func:`gradvac_dist.register_fsdp` + ``gradvac_dist.backward``.

Step-time goal (against the m-pass FSDP step): (d) <= 1.05x (a). Memory per rank: the stash GradVac allocates against ``m * n/W``
elements, and the peak resident set (``resource.getrusage``; torch's CPU allocator is not
tracked otherwise) or, on CUDA, ``torch.cuda.max_memory_allocated``, of (a) then (d) on one model.
Collectives per step are counted in each rank by ``torch.distributed.tensor.debug.CommDebugMode``
(public: it sees every c10d collective through the dispatcher, FSDP2's all-gathers and
reduce-scatters and GradVac's all-reduce alike), around one untimed step of each variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from ._spawn import spawn_by_world
from ._timing import release_and_reset_peak, rss_bytes

__all__ = ["Config", "Summary", "main", "run"]

MAX_RATIO_TO_M_PASS = 1.05  # step-time goal: GradVac-FSDP / m-pass FSDP
VARIANTS = ("a", "b", "c", "d")
LABELS = {
    "a": "(a) m-pass FSDP, no GradVac",
    "b": "(b) m-pass FSDP, FSDP defaults",
    "c": "(c) FSDP on summed loss",
    "d": "(d) GradVac-FSDP",
}
KINDS = ("all_gather", "reduce_scatter", "all_reduce")


@dataclass
class Config:
    world: int = 2
    m: int = 3
    batch: int = 64  # per rank
    in_dim: int = 256
    hidden: int = 768
    depth: int = 4
    warmup: int = 2
    steps: int = 30  # timed steps per variant
    per_round: int = 1  # consecutive steps of one variant before the next
    reshard_after_forward: bool = True
    device: str = "cpu"
    timeout: float = 900.0
    timed: bool = True  # False: the memory probe only (no timed variants, no counts)


@dataclass
class RankResult:
    times: dict[str, list[float]] = field(default_factory=dict)  # seconds per timed step
    calls: dict[str, dict[str, float]] = field(default_factory=dict)  # per step: kind (KINDS, ...) -> count
    n: int = 0
    stash_bytes: int = 0
    element_size: int = 4
    peak_a: float = 0.0  # bytes: RSS peak (CPU) or CUDA max allocated, after (a)
    peak_d: float = 0.0  # the same after (d) on the same model
    rss_base: float = 0.0  # CPU: resident set before the probe model is built (0 where unknown)
    memory_kind: str = "rss"


class ResidualMultiTask(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Linear(cfg.in_dim, cfg.hidden)
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
            for _ in range(cfg.depth)
        )
        self.heads = nn.ModuleList(nn.Linear(cfg.hidden, 1) for _ in range(cfg.m))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.embed(x)
        for block in self.encoder:
            z = z + block(z)
        return [head(z).sum(-1) for head in self.heads]


def _losses(outs: list[Tensor], ys: Tensor) -> list[Tensor]:
    return [((out - y) ** 2).mean() for out, y in zip(outs, ys)]


def _counted_step(step: Callable[[], None]) -> dict[str, float]:
    """Runs ``step()`` and returns the c10d collectives it issued on this rank, by kind."""
    from torch.distributed.tensor.debug import CommDebugMode

    mode = CommDebugMode()
    with warnings.catch_warnings():
        # CommDebugMode's module tracker puts full backward hooks on every module, which makes their
        # outputs views (FSDP warns; no output is modified in place here), fire with inputs that need
        # no grad, and skip the list outputs: torch warns about each, in this step only
        for message in ("Full backward hook is firing", "For backward hooks to be called", ".*returned a view"):
            warnings.filterwarnings("ignore", message=message)
        with mode:
            step()
    counts: dict[str, float] = {}
    for op, count in mode.get_comm_counts().items():
        name = str(op).rsplit(".", 1)[-1].replace("_", "")  # e.g. c10d._allgather_base_ -> allgatherbase
        kind = next((k for k in KINDS if k.replace("_", "") in name), str(op))
        counts[kind] = counts.get(kind, 0.0) + count
    return counts


def _bench_state(cfg: Config) -> Any:
    import gradvac_dist

    # "skip": a step whose gradients overflow is timed like any other instead of ending the run
    return gradvac_dist.GradVacState(num_tasks=cfg.m, seed=0, on_nonfinite="skip")


class _Variant:
    def __init__(self, key: str, cfg: Config, mesh: Any, device: torch.device, x: Tensor, ys: Tensor) -> None:
        from torch.distributed.fsdp import fully_shard

        import gradvac_dist

        self.key, self.cfg, self.x, self.ys = key, cfg, x, ys
        torch.manual_seed(0)
        model = ResidualMultiTask(cfg).to(device)
        self.n = sum(p.numel() for p in model.parameters())
        for block in model.encoder:
            fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
        self.model = model
        self.handle = None
        if key == "d":
            self.handle = gradvac_dist.register_fsdp(model, _bench_state(cfg))
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def grads(self) -> None:
        import gradvac_dist

        losses = _losses(self.model(self.x), self.ys)
        m = len(losses)
        if self.key == "c":
            torch.stack(losses).sum().backward()
        elif self.key == "d":
            gradvac_dist.backward(self.model, losses)
        else:
            model = cast(FSDPModule, self.model)
            for i, loss in enumerate(losses):
                last = i == m - 1
                if self.key == "a":  # the all-gather avoidance GradVac-FSDP uses, without GradVac
                    model.set_reshard_after_backward(last)
                    model.set_is_last_backward(last)
                loss.backward(retain_graph=not last)

    def step(self) -> None:
        self.grads()
        self.optimizer.step()
        self.optimizer.zero_grad()


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    peak = rss_bytes(peak=True)  # VmHWM: reset by release_and_reset_peak, unlike ru_maxrss
    return peak if peak is not None else float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


def _rank_main(rank: int, world: int, cfg: Config, device: torch.device) -> RankResult:
    from torch.distributed.device_mesh import init_device_mesh

    import gradvac_dist

    mesh = init_device_mesh(device.type, (world,))
    gen = torch.Generator().manual_seed(1234)
    x_all = torch.randn(world * cfg.batch, cfg.in_dim, generator=gen)
    ys_all = torch.randn(cfg.m, world * cfg.batch, generator=gen)
    ys_all[1] = -ys_all[0] + 0.5 * ys_all[1]  # conflicting tasks: GradVac has corrections to make
    rows = slice(rank * cfg.batch, (rank + 1) * cfg.batch)
    x, ys = x_all[rows].to(device), ys_all[:, rows].to(device)
    out = RankResult(memory_kind="cuda max allocated" if device.type == "cuda" else "peak RSS")

    # Memory first, on one fresh model: (a) steps, then GradVac registered on the same model.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # earlier configurations of this process do not count
        release_and_reset_peak()
        out.rss_base = rss_bytes() or 0.0
    probe = _Variant("a", cfg, mesh, device, x, ys)
    for _ in range(3):
        probe.step()
    _sync(device)
    out.peak_a = _peak(device)
    probe.key = "d"
    probe.handle = gradvac_dist.register_fsdp(probe.model, _bench_state(cfg))
    for _ in range(3):
        probe.step()
    _sync(device)
    out.peak_d = _peak(device)
    out.stash_bytes = probe.handle.stash_bytes
    out.element_size = next(probe.model.parameters()).element_size()  # the stash holds the parameters' dtype
    out.n = probe.n
    probe.handle.remove()
    del probe
    if not cfg.timed:
        return out

    variants = {k: _Variant(k, cfg, mesh, device, x, ys) for k in VARIANTS}
    for v in variants.values():
        for _ in range(cfg.warmup):
            v.step()
        out.calls[v.key] = _counted_step(v.step)

    out.times = {k: [] for k in variants}
    done = 0
    while done < cfg.steps:
        count = min(cfg.per_round, cfg.steps - done)
        for k, v in variants.items():
            dist.barrier()
            for _ in range(count):
                _sync(device)
                start = time.perf_counter()
                v.step()
                _sync(device)
                out.times[k].append(time.perf_counter() - start)
        done += count
    return out


# ---------------------------------------------------------------------------------------------
# Launch: under torchrun (env), or spawned gloo ranks with a file rendezvous on 127.0.0.1
# ---------------------------------------------------------------------------------------------


def _init_threads(world: int) -> None:
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, world)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def _rank_result(rank: int, cfg: Config) -> dict[str, Any]:
    return asdict(_rank_main(rank, cfg.world, cfg, torch.device("cpu")))


def _spawn_many(cfgs: list[Config]) -> tuple[list[list[dict[str, Any]]], dict[int, float]]:
    """Every rank's result per configuration (one group of spawned ranks per world size, one start-up
    for all its configurations), and each group's wall time in seconds."""

    def threads(world: int) -> int:
        return max(1, (os.cpu_count() or 1) // world)

    return spawn_by_world(_rank_result, cfgs, threads=threads, prefix="gradvac_bench_fsdp_")


def _under_torchrun(cfg: Config) -> list[dict[str, Any]] | None:
    """Runs this process as one torchrun rank; returns every rank's result on rank 0, None elsewhere."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        _init_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.timeout))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        cfg.world = world
        result = asdict(_rank_main(rank, world, cfg, device))
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        return gathered if rank == 0 else None
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _median_ms(results: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    per_step = [max(r["times"][key][i] for r in results) for i in range(len(results[0]["times"][key]))]
    return 1e3 * statistics.median(per_step), 1e3 * min(per_step), 1e3 * max(per_step)


@dataclass
class Summary:
    """The numbers of one configuration: times per variant key (median over the timed steps of the
    slowest rank, ms; empty when ``cfg.timed`` is False) and memory per rank (maximum over ranks)."""

    world: int
    m: int
    n: int
    median_ms: dict[str, float]
    ratio: float | None  # (d) / (a), medians
    paired: float | None  # median over rounds of (d)'s step / (a)'s
    calls: dict[str, dict[str, float]]  # rank 0, per step: collective -> count
    stash_bytes: int
    formula_bytes: float  # m * n / W elements
    rss_base: float
    peak_a: float
    peak_d: float
    memory_kind: str


def summarize(cfg: Config, results: list[dict[str, Any]]) -> Summary:
    """The numbers of one configuration from every rank's result."""
    first, world = results[0], len(results)
    med = {k: _median_ms(results, k)[0] for k in VARIANTS if first["times"].get(k)}
    ratio = paired = None
    if "a" in med and "d" in med:
        ratio = med["d"] / med["a"]
        paired = statistics.median(
            max(r["times"]["d"][i] for r in results) / max(r["times"]["a"][i] for r in results)
            for i in range(len(first["times"]["a"]))
        )
    return Summary(
        world=world,
        m=cfg.m,
        n=first["n"],
        median_ms=med,
        ratio=ratio,
        paired=paired,
        calls=first["calls"],
        stash_bytes=max(r["stash_bytes"] for r in results),
        formula_bytes=cfg.m * first["n"] / world * first["element_size"],
        rss_base=max(r["rss_base"] for r in results),
        peak_a=max(r["peak_a"] for r in results),
        peak_d=max(r["peak_d"] for r in results),
        memory_kind=first["memory_kind"],
    )


def run(cfgs: list[Config]) -> list[Summary]:
    """Runs the configurations on spawned gloo ranks, one group per world size; summaries in their order."""
    results, _ = _spawn_many(cfgs)
    return [summarize(cfg, r) for cfg, r in zip(cfgs, results)]


def report(cfg: Config, results: list[dict[str, Any]], device: str) -> tuple[str, bool]:
    """The printed report and whether the time goal is met."""
    first = results[0]
    n, m, world = first["n"], cfg.m, len(results)
    lines = [
        f"FSDP2 benchmark: {world} ranks ({device}), m={m} tasks, n={n / 1e6:.2f}M parameters "
        f"(float32), batch {cfg.batch}/rank, depth {cfg.depth}, hidden {cfg.hidden}, "
        f"reshard_after_forward={cfg.reshard_after_forward}; torch {torch.__version__}, "
        f"{os.cpu_count()} cores",
        "",
        f"{'variant':34s} {'median ms':>10s} {'min..max':>16s} {'vs (a)':>7s}  "
        f"{'all-gathers':>11s} {'red-scatters':>12s} {'all-reduces':>11s}",
    ]
    med = {k: _median_ms(results, k) for k in VARIANTS}
    for k in VARIANTS:
        ag, rs, ar = (first["calls"][k].get(kind, 0) for kind in KINDS)
        lines.append(
            f"{LABELS[k]:34s} {med[k][0]:10.1f} {f'{med[k][1]:.1f}..{med[k][2]:.1f}':>16s} "
            f"{med[k][0] / med['a'][0]:6.3f}x  {ag:11.0f} {rs:12.0f} {ar:11.0f}"
        )
    ratio = med["d"][0] / med["a"][0]
    paired = statistics.median(
        max(r["times"]["d"][i] for r in results) / max(r["times"]["a"][i] for r in results)
        for i in range(len(first["times"]["a"]))
    )
    ok = ratio <= MAX_RATIO_TO_M_PASS
    lines += [
        "",
        f"time goal: GradVac-FSDP / m-pass FSDP = {ratio:.3f}x (goal <= {MAX_RATIO_TO_M_PASS:.2f}x): {'PASS' if ok else 'FAIL'}; "
        f"median of the per-round ratios {paired:.3f}x",
    ]
    lines.append("memory per rank (stash = m x local shard, formula m*n/W elements):")
    for rank, r in enumerate(results):
        formula = m * n / world * r["element_size"]
        lines.append(
            f"  rank {rank}: stash {r['stash_bytes'] / 2**20:.2f} MiB = {r['stash_bytes'] / formula:.3f} x m*n/W "
            f"({formula / 2**20:.2f} MiB); {r['memory_kind']} (a) {r['peak_a'] / 2**20:.1f} MiB -> (d) "
            f"{r['peak_d'] / 2**20:.1f} MiB (+{(r['peak_d'] - r['peak_a']) / 2**20:.2f} MiB)"
        )
    total = sum(r["stash_bytes"] for r in results)
    lines.append(f"  all ranks: stash {total / 2**20:.2f} MiB = {total / (m * n * first['element_size']):.3f} x m*n")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    """Runs the FSDP2 benchmark and prints its report; returns 0 (1 if the time goal is missed with --strict)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks fsdp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few steps (a smoke run)")
    ap.add_argument("--world", type=int, default=2, help="spawned gloo ranks (ignored under torchrun)")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-reshard-after-forward", action="store_true")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="under torchrun only")
    ap.add_argument("--strict", action="store_true", help="exit 1 if the time goal is missed")
    ap.add_argument("--json", metavar="PATH", help="also write the medians (ms per step, by variant) as JSON")
    args = ap.parse_args(argv)
    cfg = Config(world=args.world, m=args.tasks, reshard_after_forward=not args.no_reshard_after_forward)
    cfg.device = args.device
    if args.quick:
        cfg.hidden, cfg.depth, cfg.batch, cfg.steps, cfg.warmup = 128, 2, 16, 6, 1
    for name in ("batch", "hidden", "depth", "steps"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        results = _under_torchrun(cfg)
        if results is None:
            return 0
        device = "cuda/nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu/gloo"
    else:
        results = _spawn_many([cfg])[0][0]
        device = "cpu/gloo"
    text, ok = report(cfg, results, device)
    print(text, flush=True)
    if args.json:
        medians = {k: _median_ms(results, k)[0] for k in VARIANTS if results[0]["times"].get(k)}
        with open(args.json, "w") as fh:
            json.dump({"device": device, "world": len(results), "n": results[0]["n"], "m": cfg.m,
                       "median_ms": medians, "labels": LABELS}, fh, indent=1)  # fmt: skip
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
