"""DDP benchmark: GradVac-DDP against DDP baselines on 2 gloo ranks (127.0.0.1).

    python -m benchmarks ddp               # full run (about half a minute on 2 idle cores)
    python -m benchmarks ddp --quick       # smoke run, < 30 s
    python -m benchmarks ddp --markdown bench_ddp.md --profile
    python -m benchmarks ddp --goals       # the step-time goal's five cases side by side (about a minute)
    python -m benchmarks ddp --per-task    # per-task data: each task's loss on its own 1/m of the batch
    python -m benchmarks ddp --link 1gbit  # the 2 ranks in two network namespaces over a 1 Gbit/s link (root)
    torchrun --nproc_per_node 1 -m benchmarks ddp --device cuda --variants abde   # NCCL, one GPU per rank

Side by side in one run (one process group; the variants interleaved round by round so that a
shared machine's load drifts over all of them alike), m=3 tasks, an MLP of about 2.4M parameters
(a shared trunk and 3 heads), float32, one thread per rank. Reported: the median over the timed
steps of the slowest rank's step time (forward, backward pass(es), SGD step) for

  (a) the same m backward passes with DDP's own all-reduce and no GradVac
      (``reducer.prepare_for_backward`` before each pass, ``find_unused_parameters=True``);
  (b) plain DDP on the summed loss, one backward pass;
  (c) a naive distributed GradVac: local per-task gradients without DDP (m ``autograd.grad``
      passes), ``all_gather`` of every rank's ``[m, n]`` matrix, rank mean, then LibMTL's per-pair
      vector loop (:class:`benchmarks.core.PlainLoopGradVac`) on every rank;
  (d) GradVac-DDP, strategy ``"replicated"`` and (e) ``"sharded"`` (:func:`gradvac_dist.gradvac_hook`).

Step-time goal (against the m-pass DDP step): a GradVac-DDP step <= 1.05x (a), <= 1.15x on one rank, where no communication
hides anything. Bytes each rank sends per step, three ways: the payload
handed to the collectives (``GradVacState.counters``; for DDP's own buckets and the naive
all-gather the same quantity counted here) turned into ring-algorithm bytes; the documented cost
formula; and MEASURED around N steps of each variant, two ways: the loopback interface's transmit
counter (``/proc/net/dev``, ``lo``) divided by ranks and steps, which counts all of the machine's
loopback traffic (clean only on an otherwise idle machine), and the bytes each rank's process wrote
to its sockets (``wchar`` of ``/proc/self/io``), which counts that rank alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gradvac_dist import GradVacState, gradvac_hook
from gradvac_dist import backward as gradvac_backward

from ._spawn import spawn_by_world
from ._timing import Report, Table, machine_line, pass_fail, release_and_reset_peak, rss_bytes
from .core import PlainLoopGradVac

__all__ = ["Config", "Summary", "main", "run"]

MAX_RATIO_TO_M_PASS = 1.05  # GradVac-DDP / (a), W >= 2
MAX_RATIO_TO_M_PASS_ONE_RANK = 1.15  # the same at W = 1


MAX_RATIO_TO_M_PASS_PER_TASK = 1.10  # the same with per-task data (--per-task), W >= 2
# On a rate-limited link (--link), where the wire is the bottleneck: (e) against (a), and against the
# floor of sending the sharded strategy's bytes, (m+1)/2 times plain DDP's, at the link's rate
MAX_RATIO_TO_M_PASS_ON_LINK = 0.75
MAX_RATIO_TO_WIRE_FLOOR = 1.15
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate such as ``1gbit`` or ``200mbit`` (tc's units are powers of 1000)."""
    text = rate.strip().lower()
    for unit in sorted(_RATE_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * _RATE_UNITS[unit]
            except ValueError:
                break
    raise ValueError(f"a link rate is a number and one of {', '.join(_RATE_UNITS)} (as tc writes it), got {rate!r}")


def goal(world: int, per_task: bool = False) -> float:
    """The time goal for GradVac-DDP / (a) at this world size (and data regime)."""
    if world == 1:
        return MAX_RATIO_TO_M_PASS_ONE_RANK
    return MAX_RATIO_TO_M_PASS_PER_TASK if per_task else MAX_RATIO_TO_M_PASS


M = 3
VARIANTS = ("a", "b", "c", "d", "e", "f")
# the phases GradVacState.counters times (see gradvac_dist._comm.CommCounters); "step" is inside "hook"
PHASES = ("hook", "step", "gramians", "gramian_all_reduce", "coefficients", "combine")
LABELS = {
    "a": "(a) m-pass DDP, no GradVac",
    "b": "(b) DDP, summed loss",
    "c": "(c) naive GradVac, all_gather",
    "d": "(d) GradVac-DDP replicated",
    "e": "(e) GradVac-DDP sharded",
    "f": "(f) UPGrad-DDP sharded (TorchJD's weighting)",
}
#: the variants that run gradvac_dist's DDP hook
HOOKED = ("d", "e", "f")


#: --size: (in_dim, hidden, head_hidden) of the benchmark's MLP; parameters at m=3
SIZES = {"2.4M": (512, 1024, 192), "0.1M": (128, 192, 48)}
#: --goals: the cases of the speed goal, (size, batch per rank, world size), and the timed steps of
#: each size by default (the small model's steps are short and noisier: more of them)
GOAL_CASES = (("2.4M", 32, 2), ("2.4M", 64, 2), ("0.1M", 32, 2), ("2.4M", 32, 1), ("0.1M", 32, 1))
GOAL_STEPS = {"2.4M": 30, "0.1M": 150}


@dataclass
class Config:
    world: int = 2
    m: int = M  # tasks (heads)
    batch: int = 64  # per rank
    in_dim: int = 512
    hidden: int = 1024
    head_hidden: int = 192
    check_steps: int = 3  # first steps: GradVac-DDP's .grad compared with (c)'s
    warmup: int = 2
    steps: int = 20  # timed steps per variant
    per_round: int = 2  # consecutive steps of one variant before the next variant's turn
    traffic_steps: int = 5
    bucket_cap_mb: float = 25.0
    profile: bool = False
    timeout: float = 600.0
    variants: tuple[str, ...] = VARIANTS
    memory_steps: int = 0  # > 0: first, each variant alone for this many steps, its peak RSS and stash measured
    per_task: bool = False  # per-task data: the batch split into m slices, task i's loss on slice i only
    device: str = "cpu"  # "cuda": this rank's current CUDA device (under torchrun with NCCL: --torchrun)
    link: str = ""  # "" : spawned ranks on 127.0.0.1; a tc rate (e.g. "1gbit"): one rank per namespace (_link.py)


@dataclass
class RankResult:
    times: dict[str, list[float]] = field(default_factory=dict)  # seconds, per timed step
    lo_tx: dict[str, float] = field(default_factory=dict)  # bytes per rank per step (rank 0 reads lo)
    socket_tx: dict[str, float] = field(default_factory=dict)  # bytes this rank's process wrote, per step
    payload: dict[str, dict[str, int]] = field(default_factory=dict)  # per step: collective -> bytes
    calls: dict[str, dict[str, float]] = field(default_factory=dict)  # per step: collective -> count
    diff: dict[str, float] = field(default_factory=dict)  # max rel. |.grad - (c)'s| over the check steps
    corrections: dict[str, int] = field(default_factory=dict)  # GradVac corrections in the check steps
    profile: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> phase -> ms/step
    num_params: int = 0
    num_buckets: int = 0
    # memory probe (cfg.memory_steps > 0): bytes per variant
    stash_bytes: dict[str, int] = field(default_factory=dict)  # per-task gradients kept: GradVac stash, naive buffers
    scratch_bytes: dict[str, int] = field(default_factory=dict)  # GradVac's all-gather buffer (sharded)
    rss_base: dict[str, float] = field(default_factory=dict)  # resident set before the variant is built
    rss_peak: dict[str, float] = field(default_factory=dict)  # peak resident set while it is built and stepped


# ---------------------------------------------------------------------------------------------
# Model and variants (inside each rank)
# ---------------------------------------------------------------------------------------------


class MultiTaskMLP(nn.Module):
    """A shared trunk and one small head per task (2.40M parameters with the defaults)."""

    def __init__(self, in_dim: int, hidden: int, head_hidden: int, m: int = M) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, in_dim)
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Linear(in_dim, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1))
            for _ in range(m)
        )

        # Heads 0 and 1 start equal and get opposed targets: their trunk gradients conflict, so
        # GradVac has corrections to make from the first step on.
        self.heads[1].load_state_dict(self.heads[0].state_dict())

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]


def _losses(outs: list[Tensor], ys: Tensor) -> list[Tensor]:
    return [((outs[i] - ys[i]) ** 2).mean() for i in range(len(outs))]


class _Variant:
    """One training setup on an identically initialised model: ``grads()`` fills ``.grad``."""

    def __init__(self, key: str, cfg: Config, x: Tensor, ys: Tensor) -> None:
        self.key, self.x, self.ys = key, x, ys
        self.per_task = cfg.per_task
        self.world = dist.get_world_size()
        self.m = m = cfg.m
        torch.manual_seed(0)
        module = MultiTaskMLP(cfg.in_dim, cfg.hidden, cfg.head_hidden, m).to(x.device)
        ids = {"device_ids": [x.device.index]} if x.device.type == "cuda" else {}
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.n = sum(p.numel() for p in self.params)
        self.state: GradVacState | None = None
        self.payload: dict[str, int] = {}  # counted here for the variants without a GradVacState
        self.model: nn.Module
        if key in ("a", *HOOKED):
            self.model = DistributedDataParallel(
                module, find_unused_parameters=True, bucket_cap_mb=cfg.bucket_cap_mb, **ids
            )
        elif key == "b":
            self.model = DistributedDataParallel(module, bucket_cap_mb=cfg.bucket_cap_mb, **ids)
        else:
            self.model = module
            self.loop = PlainLoopGradVac(m, [self.n], seed=0)
            self.gathered = torch.empty(self.world, m, self.n)
        if key in HOOKED:
            weighting = None
            if key == "f":
                from torchjd.aggregation import UPGradWeighting  # an optional extra of the library

                weighting = UPGradWeighting()
            strategy = "replicated" if key == "d" else "sharded"
            self.state = GradVacState(num_tasks=m, seed=0, strategy=strategy, weighting=weighting)
            self.model.register_comm_hook(self.state, gradvac_hook)
        self.optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)

    def _per_task_losses(self) -> list[Tensor]:
        """Per-task data: one forward per task on its own slice of the batch (docs/usage.md, "Per-task data")."""
        xs, yss = self.x.chunk(self.m), self.ys.chunk(self.m, dim=1)
        return [((self.model(x)[i] - ys[i]) ** 2).mean() for i, (x, ys) in enumerate(zip(xs, yss))]

    def grads(self) -> None:
        m = self.m
        if self.per_task and self.key == "a":  # m forward + backward pairs, each all-reduced by DDP
            for i, (x, ys) in enumerate(zip(self.x.chunk(m), self.ys.chunk(m, dim=1))):
                ((self.model(x)[i] - ys[i]) ** 2).mean().backward()
            self._count("ddp_all_reduce", m * self.n * 4)
            return
        if self.per_task and self.key == "b":  # plain DDP: one forward, each sample's loss for its own task
            outs = self.model(self.x)
            rows = [torch.arange(self.x.shape[0]).chunk(m)[i] for i in range(m)]
            sum(((outs[i][r] - self.ys[i][r]) ** 2).mean() for i, r in enumerate(rows)).backward()
            self._count("ddp_all_reduce", self.n * 4)
            return
        losses = self._per_task_losses() if self.per_task else _losses(self.model(self.x), self.ys)
        if self.key == "a":
            for i, loss in enumerate(losses):
                self.model.reducer.prepare_for_backward([loss])
                loss.backward(retain_graph=i < m - 1)
            self._count("ddp_all_reduce", m * self.n * 4)  # DDP all-reduces every bucket in every pass
        elif self.key == "b":
            torch.stack(losses).sum().backward()
            self._count("ddp_all_reduce", self.n * 4)
        elif self.key in HOOKED:
            gradvac_backward(self.model, losses)
        else:
            jac = torch.empty(m, self.n)
            for i, loss in enumerate(losses):
                gs = torch.autograd.grad(loss, self.params, retain_graph=i < m - 1, allow_unused=True)
                flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, self.params)]
                torch.cat(flat, out=jac[i])
            dist.all_gather(list(self.gathered.unbind(0)), jac)
            self._count("naive_all_gather", self.gathered.numel() * 4)
            aggregated = self.loop(self.gathered.mean(0))
            offset = 0
            for p in self.params:
                p.grad = aggregated[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()

    def _count(self, name: str, nbytes: int) -> None:
        self.payload[name] = self.payload.get(name, 0) + nbytes

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()  # torch's default, set_to_none=True: every variant starts with no .grad

    def step(self) -> None:
        self.grads()
        self.update()

    def flat_grad(self) -> Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.params])

    def reset_counts(self) -> None:
        self.payload.clear()
        if self.state is not None:
            self.state.counters.reset()

    def memory(self) -> tuple[int, int]:
        """Bytes of the per-task gradients this variant keeps (GradVac's stash; the naive variant's
        gathered ``[W, m, n]`` and local ``[m, n]``), and of GradVac's all-gather scratch."""
        if self.key == "c":
            return (self.gathered.numel() + self.m * self.n) * 4, 0
        buffers = self.state.buffer_bytes() if self.state is not None else {}
        return buffers.get("stash", 0), buffers.get("scratch", 0)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        if self.state is not None:
            return dict(self.state.counters.bytes), dict(self.state.counters.calls)
        return dict(self.payload), {}


def _written_bytes() -> int | None:
    """Bytes this process has written so far (``wchar`` of /proc/self/io): gloo's socket writes.

    Counts this rank alone, unlike ``lo``; file writes count too, and the timed loops make none.
    """
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key == "wchar":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def _lo_tx_bytes(interface: str = "lo") -> int | None:
    """Bytes transmitted so far on ``interface`` (default loopback), or None where /proc/net/dev lacks it."""
    try:
        with open("/proc/net/dev") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name.strip() == interface:
                    return int(rest.split()[8])
    except (OSError, IndexError, ValueError):
        pass
    return None


def _probe_memory(cfg: Config, x: Tensor, ys: Tensor, out: RankResult) -> None:
    """Each variant alone, lightest first: built, stepped ``cfg.memory_steps`` times, peak RSS read, freed.

    A throwaway variant runs first, so that one-time allocations (gloo, autograd's engine, DDP's
    first reducer) are not charged to the first variant measured.
    """
    warm = _Variant(cfg.variants[0], cfg, x, ys)
    warm.step()
    dist.barrier()
    del warm
    for k in ("b", "a", "e", "f", "d", "c"):
        if k not in cfg.variants:
            continue
        release_and_reset_peak()
        base = rss_bytes()
        v = _Variant(k, cfg, x, ys)
        for _ in range(cfg.memory_steps):
            v.step()
        peak = rss_bytes(peak=True)
        if base is not None and peak is not None:
            out.rss_base[k], out.rss_peak[k] = base, peak
        out.stash_bytes[k], out.scratch_bytes[k] = v.memory()
        dist.barrier()
        del v
    release_and_reset_peak()


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def _rank_main(rank: int, cfg: Config) -> RankResult:
    world = cfg.world
    gen = torch.Generator().manual_seed(1234)
    x_all = torch.randn(world * cfg.batch, cfg.in_dim, generator=gen)
    ys_all = torch.randn(cfg.m, world * cfg.batch, generator=gen)
    ys_all[1] = -ys_all[0] + 0.5 * ys_all[1]  # opposed to task 0: conflicting gradients
    rows = slice(rank * cfg.batch, (rank + 1) * cfg.batch)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    x, ys = x_all[rows].contiguous().to(device), ys_all[:, rows].contiguous().to(device)

    out = RankResult()
    if cfg.memory_steps > 0:
        _probe_memory(cfg, x, ys, out)
    variants = {k: _Variant(k, cfg, x, ys) for k in cfg.variants}
    out.num_params = next(iter(variants.values())).n

    # The first steps check that GradVac-DDP computes what the naive GradVac computes (same init,
    # same data, same orders): a benchmark of a wrong result would be worthless.
    checked = [k for k in ("c", "d", "e") if k in variants]
    for _ in range(cfg.check_steps if "c" in variants else 0):
        reference = None
        for k in checked:
            v = variants[k]
            v.grads()
            flat = v.flat_grad()
            if reference is None:
                reference = flat
            else:
                rel = float((flat - reference).abs().max() / reference.abs().max())
                out.diff[k] = max(out.diff.get(k, 0.0), rel)
                assert v.state is not None and v.state.last_result is not None
                out.corrections[k] = out.corrections.get(k, 0) + int(v.state.last_result.corrected.sum())
            v.update()
    for v in variants.values():
        for _ in range(cfg.warmup):
            v.step()

    # Timed steps, interleaved: each round runs `per_round` steps of every variant in turn, the
    # order rotated by one each round so that no variant always follows the same one.
    out.times = {k: [] for k in variants}
    order = list(variants)
    done = 0
    while done < cfg.steps:
        count = min(cfg.per_round, cfg.steps - done)
        for k in order:
            v = variants[k]
            dist.barrier()
            for _ in range(count):
                start = time.perf_counter()
                v.step()
                _sync(device)  # an accelerator's step ends when its queued work does
                out.times[k].append(time.perf_counter() - start)
        done += count
        order = order[1:] + order[:1]

    # Bytes per step: payload counters, and the interface's transmit counter around `traffic_steps`:
    # loopback carries every rank's traffic; on a link each rank's namespace has its own veth end.
    interface = os.environ.get("GLOO_SOCKET_IFNAME", "lo") if cfg.link else "lo"
    sharing = 1 if cfg.link else world
    for k, v in variants.items():
        v.reset_counts()
        dist.barrier()
        before, written = _lo_tx_bytes(interface), _written_bytes()
        for _ in range(cfg.traffic_steps):
            v.step()
        dist.barrier()  # every byte of the steps has been received once the barrier returns
        after, written_after = _lo_tx_bytes(interface), _written_bytes()
        if written is not None and written_after is not None:
            out.socket_tx[k] = (written_after - written) / cfg.traffic_steps
        nbytes, calls = v.counts()
        out.payload[k] = {name: b // cfg.traffic_steps for name, b in nbytes.items()}
        out.calls[k] = {name: c / cfg.traffic_steps for name, c in calls.items()}
        if rank == 0 and before is not None and after is not None:
            out.lo_tx[k] = (after - before) / sharing / cfg.traffic_steps
        driver = getattr(v.state, "_driver", None)
        if driver is not None:  # the hook's own count (at W=1 no reduction is issued to count them by)
            out.num_buckets = driver.num_buckets or 0

    if cfg.profile:  # the library's own phase clocks (GradVacState.counters with timing on)
        for k in HOOKED:
            if k not in variants:
                continue
            state = variants[k].state
            assert state is not None
            counters = state.counters
            counters.reset()
            counters.timing = True
            dist.barrier()
            start = time.perf_counter()
            for _ in range(cfg.steps):
                variants[k].step()
            total = time.perf_counter() - start
            counters.timing = False
            ms = {phase: 1e3 * counters.seconds[phase] / cfg.steps for phase in PHASES}
            ms["total"] = 1e3 * total / cfg.steps
            out.profile[k] = ms
    return out


# ---------------------------------------------------------------------------------------------
# Launch: spawned gloo ranks, file rendezvous (no port), loopback only, os._exit at the end
# ---------------------------------------------------------------------------------------------


def _rank_result(rank: int, cfg: Config) -> dict[str, Any]:
    return asdict(_rank_main(rank, cfg))


def _under_torchrun(cfg: Config) -> list[dict[str, Any]] | None:
    """This process as one torchrun rank (NCCL with ``device="cuda"``, else gloo): every rank's result
    on rank 0, ``None`` on the others."""
    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout))
    rank, cfg.world = dist.get_rank(), dist.get_world_size()
    result = _rank_result(rank, cfg)
    gathered: list[Any] = [None] * cfg.world
    dist.all_gather_object(gathered, result)
    return gathered if rank == 0 else None


def _launch_many(cfgs: list[Config]) -> tuple[list[list[dict[str, Any]]], dict[int, float]]:
    """Every rank's result per configuration (one group of spawned ranks per world size, one start-up
    for all its configurations), and each group's wall time in seconds."""
    if any(cfg.link for cfg in cfgs):
        from ._link import launch_on_link

        return [launch_on_link(cfg) for cfg in cfgs], {}
    return spawn_by_world(_rank_result, cfgs, threads=lambda world: 1, prefix="gradvac_bench_ddp_")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def ring_bytes(payload: dict[str, int], world: int) -> float:
    """Bytes a rank sends with ring algorithms, from the payload handed to each collective.

    All-reduce of P bytes: ``2 P (W-1)/W``; reduce-scatter (P = padded input) and all-gather
    (P = gathered output): ``P (W-1)/W``.
    """
    total = 0.0
    for name, p in payload.items():
        if "all_reduce" in name:
            total += 2 * p * (world - 1) / world
        elif "reduce_scatter" in name or "all_gather" in name:
            total += p * (world - 1) / world
        else:
            raise ValueError(f"unknown collective in the counters: {name!r}")
    return total


def formula_bytes(key: str, n: int, world: int, m: int = M, num_blocks: int = 1) -> float:
    """The documented cost per rank and step in bytes: float32 gradients, and the float64 all-reduce of
    K m^2 Gramian entries, m non-finite flags and the 4 entries of the rank fingerprint, and the
    all-reduce of the W input-check flags; a Gramian
    weighting (f) adds the all-reduce of its K m weights and W failure flags (the first rank's
    weights, shared)."""
    f = (world - 1) / world
    gram = 2 * (num_blocks * m * m + m + 4) * 8 * f
    weights = 2 * (num_blocks * m + world) * 8 * f
    inputs = 2 * world * 8 * f  # every rank's input-check flag, before a step's passes
    return {
        "a": m * 2 * n * f * 4,  # m all-reduces of n
        "b": 2 * n * f * 4,  # one all-reduce of n
        "c": m * n * (world - 1) * 4,  # all-gather of every rank's m x n
        "d": 2 * m * n * f * 4 + gram + inputs,  # ~2mn(W-1)/W
        "e": (m + 1) * n * f * 4 + gram + inputs,  # ~(m+1)n(W-1)/W
        "f": (m + 1) * n * f * 4 + gram + inputs + weights,  # the transport of (e), and the shared weights
    }[key]


@dataclass
class Summary:
    """The numbers of one configuration, per variant key (what reports and plots are made of).

    Times are the median (min, max) over the timed steps of the slowest rank's step, in ms; bytes are
    per rank per step; memory is the maximum over ranks (present when ``cfg.memory_steps > 0``).
    """

    world: int
    m: int
    n: int
    steps: int
    median_ms: dict[str, float]
    min_ms: dict[str, float]
    max_ms: dict[str, float]
    paired: dict[str, float]  # median over rounds of the ratio to (a)'s step of the same round; {} without (a)
    ring_bytes: dict[str, float]  # payload counters turned into ring-algorithm bytes
    formula_bytes: dict[str, float]  # the documented cost formula
    rank_bytes: dict[str, float]  # measured: bytes each rank's process wrote to its sockets, mean over ranks
    lo_bytes: dict[str, float]  # measured: the loopback interface's tx counter / ranks (whole machine)
    stash_bytes: dict[str, int]
    scratch_bytes: dict[str, int]
    rss_base: dict[str, float]
    rss_peak: dict[str, float]
    diff: dict[str, float]
    corrections: dict[str, int]
    num_buckets: int


def summarize(cfg: Config, results: list[dict[str, Any]]) -> Summary:
    """The numbers of one configuration from every rank's result."""
    world, r0 = cfg.world, results[0]
    n = r0["num_params"]
    keys = [k for k in VARIANTS if k in cfg.variants]
    # A step is over when the slowest rank is: per-step maximum over ranks, then the median.
    per_step = {k: [max(r["times"][k][i] for r in results) * 1e3 for i in range(cfg.steps)] for k in keys}
    # Step i of every variant ran in the same round: the median of the per-step ratios is robust to drift.
    paired = (
        {k: statistics.median(t / a for t, a in zip(per_step[k], per_step["a"])) for k in keys}
        if "a" in per_step
        else {}
    )

    def mean_over_ranks(name: str) -> dict[str, float]:
        return {k: statistics.mean(r[name][k] for r in results) for k in keys if all(k in r[name] for r in results)}

    def max_over_ranks(name: str) -> dict[str, Any]:
        return {k: max(r[name][k] for r in results) for k in keys if all(k in r[name] for r in results)}

    return Summary(
        world=world,
        m=cfg.m,
        n=n,
        steps=cfg.steps,
        median_ms={k: statistics.median(v) for k, v in per_step.items()},
        min_ms={k: min(v) for k, v in per_step.items()},
        max_ms={k: max(v) for k, v in per_step.items()},
        paired=paired,
        ring_bytes={k: ring_bytes(r0["payload"][k], world) for k in keys},
        formula_bytes={k: formula_bytes(k, n, world, cfg.m) for k in keys},
        rank_bytes=mean_over_ranks("socket_tx"),
        lo_bytes=dict(r0["lo_tx"]),
        stash_bytes=max_over_ranks("stash_bytes"),
        scratch_bytes=max_over_ranks("scratch_bytes"),
        rss_base=max_over_ranks("rss_base"),
        rss_peak=max_over_ranks("rss_peak"),
        diff=dict(r0["diff"]),
        corrections=dict(r0["corrections"]),
        num_buckets=r0["num_buckets"],
    )


def run(cfgs: list[Config]) -> list[Summary]:
    """Runs the configurations, one group of spawned gloo ranks per world size; summaries in their order."""
    results, _ = _launch_many(cfgs)
    return [summarize(cfg, r) for cfg, r in zip(cfgs, results)]


def _report(cfg: Config, results: list[dict[str, Any]], elapsed: float) -> tuple[Report, bool]:
    world, r0 = cfg.world, results[0]
    n = r0["num_params"]
    keys = [k for k in VARIANTS if k in cfg.variants]
    summary = summarize(cfg, results)
    med, paired = summary.median_ms, summary.paired
    base = med.get("a")
    mb = 1e6
    table = Table(
        f"GradVac-DDP vs DDP: {world} {'NCCL' if cfg.device == 'cuda' else 'gloo'} ranks "
        f"{f'in 2 network namespaces, a {cfg.link} link between them' if cfg.link else 'on one machine'}, "
        f"1 thread each, m={cfg.m}, MLP {n / 1e6:.2f}M params, "
        f"batch {cfg.batch}/rank{' (per-task data: 1/m of it per task)' if cfg.per_task else ''}, "
        f"{cfg.steps} timed steps; bytes = MB sent per rank per step",
        [
            "variant",
            "median ms",
            "min..max ms",
            "vs (a)",
            "paired",
            "vs (b)",
            "counters->ring MB",
            "formula MB",
            "link MB" if cfg.link else "lo MB",
            "rank MB",
        ],
    )
    for k in keys:
        lo = r0["lo_tx"].get(k)
        written = [r["socket_tx"][k] for r in results if k in r["socket_tx"]]
        table.add_row(
            [
                LABELS[k],
                f"{med[k]:.1f}",
                f"{summary.min_ms[k]:.0f}..{summary.max_ms[k]:.0f}",
                f"{med[k] / base:.2f}x" if base else "-",
                f"{paired[k]:.2f}x" if base else "-",
                f"{med[k] / med['b']:.2f}x" if med.get("b") else "-",
                f"{ring_bytes(r0['payload'][k], world) / mb:.2f}",
                f"{formula_bytes(k, n, world, cfg.m) / mb:.2f}",
                "-" if lo is None else f"{lo / mb:.2f}",
                f"{statistics.mean(written) / mb:.2f}" if written else "-",
            ]
        )
    ok = True
    table.notes.append(
        "vs (a), vs (b): ratio of the medians; paired: median over steps of the ratio to (a)'s step of the same round. "
        + (
            "Measured bytes: link = rank 0's end of the link, its tx counter; "
            if cfg.link
            else "Measured bytes: lo = the loopback interface's tx counter / ranks (the whole machine's traffic); "
        )
        + "rank = bytes each rank's process wrote to its sockets (/proc/self/io), mean over ranks."
    )
    if cfg.link and base and "e" in med:
        wire = 1e3 * formula_bytes("e", n, world, cfg.m) * 8 / rate_bits(cfg.link)
        to_a, to_floor = med["e"] / base, med["e"] / wire
        ok = to_a <= MAX_RATIO_TO_M_PASS_ON_LINK and to_floor <= MAX_RATIO_TO_WIRE_FLOOR
        table.notes.append(
            f"{pass_fail(to_a <= MAX_RATIO_TO_M_PASS_ON_LINK)}: on the {cfg.link} link, {LABELS['e']} {med['e']:.1f} ms "
            f"= {to_a:.2f}x (a) (paired {paired['e']:.2f}x), goal <= {MAX_RATIO_TO_M_PASS_ON_LINK}x"
        )
        table.notes.append(
            f"{pass_fail(to_floor <= MAX_RATIO_TO_WIRE_FLOOR)}: the wire floor of (e), its formula bytes at {cfg.link}: "
            f"{wire:.1f} ms ((m+1)/2 = {(cfg.m + 1) / 2:g} times plain DDP's {1e3 * formula_bytes('b', n, world) * 8 / rate_bits(cfg.link):.1f} ms); "
            f"(e) = {to_floor:.2f}x it, goal <= {MAX_RATIO_TO_WIRE_FLOOR}x"
        )
    for k in ("d", "e"):
        if base and k in med and not cfg.link:
            limit = goal(cfg.world, cfg.per_task)
            passed = med[k] <= limit * base
            ok = ok and passed
            table.notes.append(
                f"{pass_fail(passed)}: {LABELS[k]} {med[k]:.1f} ms = {med[k] / base:.2f}x (a) "
                f"(paired {paired[k]:.2f}x), goal <= {limit}x at W={cfg.world}"
                + (" with per-task data" if cfg.per_task else "")
            )
    if base and "f" in med:  # no goal: UPGrad's own QP per block is the weighting's cost, not the transport's
        table.notes.append(f"{LABELS['f']}: {med['f']:.1f} ms = {med['f'] / base:.2f}x (a) (paired {paired['f']:.2f}x)")
    for k in keys:
        if r0["calls"].get(k):
            table.notes.append(
                f"collectives per step, {LABELS[k]}: "
                + ", ".join(f"{name} {c:g}" for name, c in sorted(r0["calls"][k].items()))
            )
    table.notes.append(f"DDP buckets: {r0['num_buckets']} (bucket_cap_mb={cfg.bucket_cap_mb:g})")
    for k in ("d", "e"):
        if k in r0["diff"]:
            table.notes.append(
                f"check, first {cfg.check_steps} steps: {LABELS[k]} .grad vs (c): max rel diff "
                f"{r0['diff'][k]:.1e}, {r0['corrections'][k]} GradVac corrections applied"
            )
    for k, p in r0["profile"].items():
        waits = p["step"] - p["gramians"] - p["gramian_all_reduce"] - p["coefficients"] - p["combine"]
        table.notes.append(
            f"profile rank 0, {LABELS[k]}, ms/step: total {p['total']:.2f}; hook {p['hook']:.2f} = per-pass work "
            f"{p['hook'] - p['step']:.2f} + step {p['step']:.2f} (waits on task reductions {waits:.2f}, Gramians "
            f"{p['gramians']:.2f}, Gramian all-reduce {p['gramian_all_reduce']:.2f}, coefficients "
            f"{p['coefficients']:.2f}, combine{' + all-gather' if k != 'd' else ''} {p['combine']:.2f})"
        )
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        table.notes.append("the machine was busy (load average > cores): ratios are noisy, rerun on an idle machine")
    table.notes.append(f"wall time {elapsed:.1f} s")
    return Report(machine_line(), [table]), ok


def goal_configs(
    steps: int | None = None, quick: bool = False, bucket_cap_mb: float = 25.0, timeout: float = 600.0
) -> list[Config]:
    """The configurations of :data:`GOAL_CASES` with variants (a) and (e), profiled, in that order."""
    cfgs = []
    for size, batch, world in GOAL_CASES:
        in_dim, hidden, head_hidden = SIZES[size]
        cfg = Config(
            world=world,
            batch=batch,
            in_dim=in_dim,
            hidden=hidden,
            head_hidden=head_hidden,
            steps=GOAL_STEPS[size] if steps is None else steps,
            bucket_cap_mb=bucket_cap_mb,
            profile=True,
            timeout=timeout,
            variants=("a", "e"),
        )
        if quick:
            cfg.check_steps, cfg.warmup, cfg.steps, cfg.traffic_steps = 1, 1, 4, 1
        cfgs.append(cfg)
    return cfgs


def _goals_report(cfgs: list[Config], results: list[list[dict[str, Any]]], elapsed: float) -> tuple[Report, bool]:
    """One row per goal case: (a) and GradVac-DDP sharded (e) side by side, the verdict, and where
    GradVac's step after the last pass spends its time (rank 0's phase clocks)."""
    table = Table(
        "Step-time goal: GradVac-DDP sharded (e) against the m-pass DDP step (a), m=3, 1 thread per rank, "
        "gloo on 127.0.0.1",
        [
            "case",
            "steps",
            "(a) ms",
            "(e) ms",
            "vs (a)",
            "paired",
            "goal",
            "verdict",
            "per-pass work ms",
            "after the last pass ms: Gramians / all-reduce / coefficients / combine",
        ],
    )
    ok = True
    for cfg, ranks in zip(cfgs, results):
        summary = summarize(cfg, ranks)
        med, paired = summary.median_ms, summary.paired
        a, e = med["a"], med["e"]
        passed = e <= goal(cfg.world) * a and paired["e"] <= goal(cfg.world)  # both: one alone can be luck
        ok = ok and passed
        prof = ranks[0]["profile"]["e"]
        phases = " / ".join(
            "-" if cfg.world == 1 and name == "gramian_all_reduce" else f"{prof[name]:.2f}"
            for name in ("gramians", "gramian_all_reduce", "coefficients", "combine")
        )
        table.add_row(
            [
                f"n={summary.n / 1e6:.2f}M, batch {cfg.batch}, W={cfg.world}",
                str(cfg.steps),
                f"{a:.1f}",
                f"{e:.1f}",
                f"{e / a:.2f}x",
                f"{paired['e']:.2f}x",
                f"<= {goal(cfg.world)}x",
                pass_fail(passed),
                f"{prof['hook'] - prof['step']:.2f}",
                phases,
            ]
        )
    table.notes += [
        "(a), (e): median over the timed steps of the slowest rank's step (forward, m backward passes, SGD step); "
        "vs (a): ratio of the medians; paired: median over rounds of the ratio to (a)'s step of the same round; "
        "PASS when both ratios are within the goal",
        "per-pass work: rank 0 inside the hook before the last bucket of the last pass; the Gramians column includes "
        "waiting for the last task's reduction; combine includes the all-gather at W=2; one rank communicates nothing",
        f"wall time {elapsed:.1f} s",
    ]
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        table.notes.append("the machine was busy (load average > cores): ratios are noisy, rerun on an idle machine")
    return Report(machine_line(), [table]), ok


def _parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks ddp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 30 s): 5 timed steps, too few for a report")
    ap.add_argument("--steps", type=int, help="timed steps per variant (default 20; >= 10 for a report)")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant after the check steps (default 2)")
    ap.add_argument("--batch", type=int, default=64, help="batch size per rank (default 64)")
    ap.add_argument("--world", type=int, default=2, help="gloo ranks (default 2; 1: no communication to hide)")
    ap.add_argument(
        "--size", choices=sorted(SIZES), default="2.4M", help="the MLP: 2.4M (default) or 0.1M parameters (at m=3)"
    )
    ap.add_argument("--traffic-steps", type=int, help="steps per variant for the byte counters (default 5)")
    ap.add_argument("--variants", default="".join(VARIANTS), help="letters of the variants to run (default abcdef)")
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket_cap_mb (default 25)")
    ap.add_argument("--profile", action="store_true", help="time the step's phases on rank 0 (extra steps)")
    ap.add_argument(
        "--link",
        metavar="RATE",
        default="",
        help="run the 2 ranks in two network namespaces joined by a veth pair limited to RATE with tc's tbf "
        "(e.g. 1gbit, 200mbit; launch/two_nodes.sh; needs root)",
    )
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: under torchrun only, one GPU per rank, NCCL (variants without (c), whose loop runs on the CPU)",
    )
    ap.add_argument(
        "--per-task",
        action="store_true",
        help="per-task data: each task's loss on its own 1/m of the batch, one forward per task ((b): one forward)",
    )
    ap.add_argument("--markdown", metavar="PATH", help="also write the report as markdown to PATH")
    ap.add_argument("--json", metavar="PATH", help="also write the run's numbers (benchmarks.ddp.Summary) as JSON")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when the goal is missed")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before the run is abandoned")
    ap.add_argument(
        "--goals",
        action="store_true",
        help="run the speed goal's five cases (n=2.4M at batch 32 and 64, n=0.1M; W=2 and 1) with (a) and (e), "
        f"profiled, one table (--size, --batch, --world, --variants are then fixed; --steps default {GOAL_STEPS})",
    )
    args = ap.parse_args(argv)
    in_dim, hidden, head_hidden = SIZES[args.size]
    cfg = Config(
        world=args.world,
        batch=args.batch,
        in_dim=in_dim,
        hidden=hidden,
        head_hidden=head_hidden,
        bucket_cap_mb=args.bucket_cap_mb,
        profile=args.profile,
        timeout=args.timeout,
        per_task=args.per_task,
        link=args.link,
        device=args.device,
    )
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.device == "cuda" and not (under_torchrun and torch.cuda.is_available()):
        ap.error(
            "--device cuda runs under torchrun on a machine with CUDA: torchrun --nproc_per_node N -m benchmarks ddp ..."
        )
    if args.device == "cuda" and "c" in args.variants:
        ap.error("--device cuda: leave out (c), the naive GradVac runs its loop on the CPU (e.g. --variants abde)")
    if under_torchrun and (args.goals or args.link):
        ap.error("under torchrun the benchmark runs one configuration on the launched ranks (no --goals, no --link)")
    if args.link and (args.world != 2 or args.goals):
        ap.error("--link runs exactly 2 ranks, one per namespace (no --world, no --goals)")
    if args.link:
        try:
            rate_bits(args.link)
        except ValueError as err:
            ap.error(f"--link: {err}")
    if args.per_task and args.batch % cfg.m:
        ap.error(f"--per-task splits the batch among the {cfg.m} tasks: --batch must be a multiple of {cfg.m}")
    if args.quick:
        cfg.check_steps, cfg.warmup, cfg.steps, cfg.traffic_steps = 2, 1, 5, 1
    cfg.steps = cfg.steps if args.steps is None else args.steps
    cfg.warmup = cfg.warmup if args.warmup is None else args.warmup
    cfg.traffic_steps = cfg.traffic_steps if args.traffic_steps is None else args.traffic_steps
    if not args.variants or set(args.variants) - set(VARIANTS):
        ap.error(f"--variants takes letters of {''.join(VARIANTS)!r}, got {args.variants!r}")
    cfg.variants = tuple(k for k in VARIANTS if k in args.variants)
    if cfg.steps < 1 or cfg.traffic_steps < 1 or cfg.warmup < 0 or cfg.batch < 1 or cfg.world < 1:
        ap.error("--steps, --traffic-steps, --batch and --world must be >= 1, --warmup >= 0")
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark, prints the report; returns 0 (1 with ``--strict`` when the goal is missed)."""
    cfg, args = _parse(argv)
    start = time.perf_counter()
    if args.goals:
        cfgs = goal_configs(args.steps, args.quick, cfg.bucket_cap_mb, cfg.timeout)
        report, ok = _goals_report(cfgs, _launch_many(cfgs)[0], time.perf_counter() - start)
        results = None
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun started this process
        results = _under_torchrun(cfg)
        if results is None:
            _leave_torchrun_rank(0)
            return 0
        report, ok = _report(cfg, results, time.perf_counter() - start)
        _write_outputs(args, cfg, results, report)
        _leave_torchrun_rank(0 if ok or not args.strict else 1)
    else:
        results = _launch_many([cfg])[0][0]
        report, ok = _report(cfg, results, time.perf_counter() - start)
    _write_outputs(args, cfg, None if args.goals else results, report)
    return 0 if ok or not args.strict else 1


def _write_outputs(args: argparse.Namespace, cfg: Config, results: list[dict[str, Any]] | None, report: Report) -> None:
    print(report.to_text(), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(report.to_markdown())
    if args.json and results is not None:
        with open(args.json, "w") as fh:
            json.dump({"config": asdict(cfg), "summary": asdict(summarize(cfg, results))}, fh, indent=1)


def _leave_torchrun_rank(code: int) -> None:
    """Ends a torchrun rank without the process group's destructor (gloo can deadlock there, pytorch#56297)."""
    if dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
