"""Rank bodies of the FSDP2 tests (module level, so the harness can pickle them).

Every body builds identical float64 models on all ranks, shards one copy with ``fully_shard``
(each encoder layer and each head, then the root) and feeds each rank its own slice of a global
batch. The reference is computed independently, from a plain (non-sharded) copy of the model:
each rank's local per-task Jacobian, all-gathered, averaged over ranks, and given to the core
single-process aggregator. Layer widths are odd (13, 11) and the heads have one output row, so
FSDP's dim-0 shards are uneven, padded, and empty on rank 1 for the heads.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import gradvac_dist
from gradvac_dist import GradVac, GradVacState, gradvac_hook, register_fsdp
from tests.distributed.ddp_bodies import _capture, block_columns, reference_grad

M = 3
IN, HID, HID2 = 6, 13, 11
DEVICE = torch.device("cpu")  # cuda_equivalence_body sets the rank's GPU
GLOBAL_BATCH = 12  # divisible by 2 and 4: rank means (and micro-batch sums) are exact


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, HID2), nn.Tanh())
        self.gain = nn.Parameter(torch.ones(HID2))  # owned by the root module
        self.heads = nn.ModuleList(nn.Linear(HID2, 1) for _ in range(M))  # 1 row: rank 1's shard is empty
        self.spare = nn.Linear(HID2, 2)  # reached by no task: its .grad stays None

    def forward(self, x):
        h = self.encoder(x) * self.gain
        return [head(h).sum(-1) for head in self.heads]


def make_model(seed: int = 0) -> MultiTask:
    torch.manual_seed(seed)
    return MultiTask().double().to(DEVICE)


def shard(
    model: MultiTask, world: int, reshard_after_forward: bool = True, mp: bool = False, hsdp: list | None = None
) -> MultiTask:
    """``fully_shard`` per layer and on the root; ``hsdp=[replicas, shards]``: HSDP on that 2-D mesh."""
    if hsdp:  # FSDP2 wants the dimensions named for HSDP
        mesh = init_device_mesh(DEVICE.type, tuple(hsdp), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(DEVICE.type, (world,))
    kwargs: dict = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float64)
    for module in (model.encoder[0], model.encoder[2], *model.heads):
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def batch(step: int, rank: int, world: int, part: int = 0, parts: int = 1):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g, dtype=torch.float64)
    ys = torch.randn(M, GLOBAL_BATCH, generator=g, dtype=torch.float64)
    ys[1] = -ys[0] + 0.3 * ys[1]  # conflicting tasks
    per = GLOBAL_BATCH // world // parts
    start = (rank * parts + part) * per
    return x[start : start + per].to(DEVICE), ys[:, start : start + per].to(DEVICE)


def task_losses(outs, ys):
    return [((outs[i] - ys[i]) ** 2).mean() for i in range(M)]


def local_jacobian(model: nn.Module, x, ys) -> torch.Tensor:
    params = list(model.parameters())
    losses = task_losses(model(x), ys)
    rows = []
    for i, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, params, retain_graph=i < M - 1, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)]))
    return torch.stack(rows).double()


def rank_mean_jacobian(model: nn.Module, x, ys, world: int) -> torch.Tensor:
    local = local_jacobian(model, x, ys)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return torch.stack(gathered).mean(0)


def full_grad(model: nn.Module) -> torch.Tensor:
    parts = []
    for p in model.parameters():
        g = p.grad
        if g is None:
            parts.append(torch.zeros(p.shape, dtype=torch.float64).flatten())
        else:
            parts.append((g.full_tensor() if isinstance(g, DTensor) else g).double().flatten().cpu())
    return torch.cat(parts)


def full_params(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            (p.full_tensor() if isinstance(p, DTensor) else p).detach().double().flatten().cpu()
            for p in model.parameters()
        ]
    )


class CollectiveCounter:
    """Counts calls of the c10d collectives by patching ``torch.distributed`` in this rank's process.

    FSDP2 calls ``dist.all_gather_single`` / ``dist.reduce_scatter_single`` through its default
    comm objects, and GradVac ``dist.all_reduce``: every gradient or parameter movement of a step
    goes through one of the names below.
    """

    NAMES = (
        "all_gather_single",
        "all_gather_into_tensor",
        "all_gather",
        "reduce_scatter_single",
        "reduce_scatter_tensor",
        "reduce_scatter",
        "all_reduce",
    )

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None or getattr(original, "_counted", False):
                continue
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            return original(*args, **kwargs)

        counted._counted = True
        return counted

    def take(self) -> dict[str, int]:
        out, self.counts = self.counts, {}
        return out


def _all_gathers(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k.startswith("all_gather"))


def _reduce_scatters(counts: dict[str, int]) -> int:
    # FSDP2 calls reduce_scatter_single from torch 2.13, reduce_scatter_tensor before
    return sum(v for k, v in counts.items() if k.startswith("reduce_scatter"))


def run_config(
    rank,
    world,
    counter,
    grouping="whole",
    raf=True,
    shared=None,
    mp=False,
    between=False,
    accum=1,
    ddp=False,
    prior=False,
    steps=3,
    hsdp=None,
):
    model = make_model()
    plain = copy.deepcopy(model)
    ddp_model = DDP(copy.deepcopy(model), find_unused_parameters=True, bucket_cap_mb=0.0005) if ddp else None
    shard(model, world, reshard_after_forward=raf, mp=mp, hsdp=hsdp)
    state = GradVacState(num_tasks=M, seed=7, grouping=grouping, shared_params=shared)
    handle = register_fsdp(model, state, reshard_between_passes=between)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    ref_agg = GradVac(seed=7)
    cols, sizes = block_columns(plain, grouping, shared)
    if ddp_model is not None:
        ddp_state = GradVacState(num_tasks=M, seed=7, grouping=grouping, shared_params=shared)
        ddp_model.register_comm_hook(ddp_state, gradvac_hook)
        ddp_opt = torch.optim.SGD(ddp_model.parameters(), lr=0.05)
    max_err = max_err_ddp = 0.0
    plain_counts, step_counts = [], []
    placements_ok = True
    for step in range(steps):
        # reference: core GradVac on the rank-mean per-task gradients (summed over micro-batches)
        ref_model = copy.deepcopy(plain).float() if mp else plain
        mean_jac = sum(
            rank_mean_jacobian(ref_model, *_cast(batch(step, rank, world, k, accum), mp), world) for k in range(accum)
        )
        expected = reference_grad(ref_agg, mean_jac, cols, sizes)

        # what one plain FSDP forward + backward communicates, for comparison
        x, ys = batch(step, rank, world)
        counter.take()
        sum(task_losses(model(x), ys)).backward()
        plain_counts.append(counter.take())
        opt.zero_grad(set_to_none=True)

        if prior:  # an existing .grad is accumulated onto, as loss.backward() does
            for p in model.parameters():
                p.grad = torch.ones_like(p) * 0.5
            expected = expected + 0.5
        for k in range(accum):  # FSDP2's own accumulation switch: no communication until the last micro-batch
            x, ys = batch(step, rank, world, k, accum)
            model.set_requires_gradient_sync(k == accum - 1)
            gradvac_dist.backward(model, task_losses(model(x), ys))
        step_counts.append(counter.take())
        for p in model.parameters():
            if p.grad is not None:
                same = p.grad.placements == p.placements and p.grad.to_local().shape == p.to_local().shape
                placements_ok = placements_ok and same and p.grad.dtype == p.dtype
        got = full_grad(model)
        max_err = max(max_err, float((got - expected.cpu()).norm() / expected.norm()))
        if ddp_model is not None:
            x, ys = batch(step, rank, world)
            gradvac_dist.backward(ddp_model, task_losses(ddp_model(x)[:M], ys))
            max_err_ddp = max(max_err_ddp, float((full_grad(ddp_model) - got).norm() / got.norm()))
            ddp_opt.step()
            ddp_opt.zero_grad()
        opt.step()
        opt.zero_grad()
        off = 0
        for p in plain.parameters():  # the reference model follows the reference gradient (and the prior)
            p.grad = expected[off : off + p.numel()].view_as(p).clone()
            off += p.numel()
        ref_opt.step()
        ref_opt.zero_grad()
    n = sum(p.numel() for p in plain.parameters())
    return {
        "max_rel_err": max_err,
        "max_rel_err_ddp": max_err_ddp,
        "params": full_params(model),
        "ref_params": full_params(plain),
        "targets": state.trajectory.targets.cpu(),
        "ref_targets": ref_agg.targets.cpu(),
        "generator": state.trajectory.generator.get_state(),
        "step": state.step,
        "calls": dict(state.counters.calls),
        "plain_counts": plain_counts,
        "step_counts": step_counts,
        "placements_ok": placements_ok,
        "stash_bytes": handle.stash_bytes,
        "formula_bytes": M * n * 8 // world,
        "n": n,
    }


def _cast(xy, mp):
    x, ys = xy
    return (x.float(), ys) if mp else (x, ys)


def misuse(rank, world) -> dict:
    out = {}
    x, ys = batch(0, rank, world)

    def sharded(**kwargs):
        return shard(make_model(), world, **kwargs)

    def fsdp1():
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(make_model(), device_id=torch.device("cpu"))
        register_fsdp(model, GradVacState(num_tasks=M))

    def fsdp1_backward():
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(make_model(), device_id=torch.device("cpu"))
        gradvac_dist.backward(model, task_losses(model(x), ys))

    def not_sharded():
        register_fsdp(make_model(), GradVacState(num_tasks=M))

    def not_registered():
        model = sharded()
        gradvac_dist.backward(model, task_losses(model(x), ys))

    def registered_twice():
        model = sharded()
        register_fsdp(model, GradVacState(num_tasks=M))
        register_fsdp(model, GradVacState(num_tasks=M))

    def shared_state():
        state = GradVacState(num_tasks=M)
        register_fsdp(sharded(), state)
        register_fsdp(sharded(), state)

    def wrong_count():
        model = sharded()
        register_fsdp(model, GradVacState(num_tasks=M))
        gradvac_dist.backward(model, task_losses(model(x), ys)[:2])

    def aggregator_given():
        model = sharded()
        register_fsdp(model, GradVacState(num_tasks=M))
        gradvac_dist.backward(model, task_losses(model(x), ys), GradVac())

    def sync_contradicts_switch():
        model = sharded()
        register_fsdp(model, GradVacState(num_tasks=M))
        model.set_requires_gradient_sync(False)
        gradvac_dist.backward(model, task_losses(model(x), ys), sync=True)

    def not_root():
        model = sharded()
        register_fsdp(model.encoder[0], GradVacState(num_tasks=M))
        gradvac_dist.backward(model.encoder[0], task_losses(model(x), ys))

    def replicated_strategy():
        register_fsdp(sharded(), GradVacState(num_tasks=M, strategy="replicated"))

    def nonfinite_raise():
        model = sharded()
        register_fsdp(model, GradVacState(num_tasks=M))
        losses = task_losses(model(x), ys)
        losses[1] = losses[1] * float("nan")
        gradvac_dist.backward(model, losses)

    for name, fn in list(locals().items()):
        if callable(fn) and name != "sharded":
            out[name] = _capture(fn)

    # a plain backward on a registered model is plain FSDP: the stash hooks stay inert
    model = sharded()
    register_fsdp(model, GradVacState(num_tasks=M))
    gradvac_dist.backward(model, task_losses(model(x), ys))
    for p in model.parameters():
        p.grad = None
    sum(task_losses(model(x), ys)).backward()
    out["plain_backward_grads"] = sum(p.grad is not None for p in model.parameters())

    # on_nonfinite="skip": the state is untouched, .grad holds the non-finite plain sum (a GradScaler skips)
    model = sharded()
    state = GradVacState(num_tasks=M, on_nonfinite="skip")
    register_fsdp(model, state)
    losses = task_losses(model(x), ys)
    losses[2] = losses[2] * float("inf")
    gradvac_dist.backward(model, losses)
    grads_finite = all(bool(torch.isfinite(p.grad.to_local()).all()) for p in model.parameters() if p.grad is not None)
    out["skip"] = (state.step, state.counters.calls["skipped_step"], grads_finite, state.trajectory.targets is None)
    # the model is usable afterwards: the next step is a normal one
    gradvac_dist.backward(model, task_losses(model(x), ys))
    out["after_skip_step"] = state.step
    return out


def equivalence_body(rank, world, configs):
    torch.use_deterministic_algorithms(True)
    counter = CollectiveCounter()
    results = [run_config(rank, world, counter, **cfg) for cfg in configs]
    return {"configs": results, "misuse": misuse(rank, world)}


# -- checkpoints through torch.distributed.checkpoint ---------------------------------------------------


def _setup(world, seed=0, grouping="module", hsdp=None):
    model = shard(make_model(seed), world, hsdp=hsdp)
    state = GradVacState(num_tasks=M, seed=3, grouping=grouping)
    handle = register_fsdp(model, state)
    return model, state, handle, torch.optim.SGD(model.parameters(), lr=0.05)


def _train(model, opt, rank, world, start, stop):
    for step in range(start, stop):
        x, ys = batch(step, rank, world)
        gradvac_dist.backward(model, task_losses(model(x), ys))
        opt.step()
        opt.zero_grad()


def _gradvac_snapshot(state):
    traj = state.trajectory
    return {"targets": traj.targets.clone(), "generator": traj.generator.get_state(), "step": traj.step}


def checkpoint_body(rank, world, folder, hsdp=None):
    out = {}
    # A: 4 steps straight
    model_a, state_a, _, opt_a = _setup(world, hsdp=hsdp)
    _train(model_a, opt_a, rank, world, 0, 4)
    out["straight"] = {"params": full_params(model_a), **_gradvac_snapshot(state_a)}

    # B: 2 steps, then a DCP checkpoint of the model and GradVac (the handle is Stateful)
    model_b, state_b, handle_b, opt_b = _setup(world, hsdp=hsdp)
    _train(model_b, opt_b, rank, world, 0, 2)
    saved = os.path.join(folder, "step2")
    dcp.save({"model": get_model_state_dict(model_b), "gradvac": handle_b}, checkpoint_id=saved)
    out["saved"] = _gradvac_snapshot(state_b)

    # C: a fresh model (another init) and a fresh handle load the checkpoint, then run steps 2..3
    model_c, state_c, handle_c, opt_c = _setup(world, seed=1, hsdp=hsdp)
    to_load = {"model": get_model_state_dict(model_c), "gradvac": handle_c}
    dcp.load(to_load, checkpoint_id=saved)
    set_model_state_dict(model_c, to_load["model"])
    out["loaded"] = _gradvac_snapshot(state_c)
    _train(model_c, opt_c, rank, world, 2, 4)
    out["resumed"] = {"params": full_params(model_c), **_gradvac_snapshot(state_c)}

    # A checkpoint taken before any step round-trips too (no targets yet)
    handle_d = _setup(world, hsdp=hsdp)[2]
    fresh = os.path.join(folder, "fresh")
    dcp.save({"gradvac": handle_d}, checkpoint_id=fresh)
    dcp.load({"gradvac": handle_c}, checkpoint_id=fresh)
    out["fresh_loaded"] = (state_c.step, state_c.trajectory.targets is None)

    # Another grouping's checkpoint is refused with a clear error, leaving the state unchanged
    _, state_e, handle_e, _ = _setup(world, grouping="whole", hsdp=hsdp)
    out["wrong_grouping"] = _capture(lambda: dcp.load({"gradvac": handle_e}, checkpoint_id=saved))
    out["wrong_grouping_step"] = state_e.step
    return out


def resume_body(rank, world, start, stop, load_from=None, save_to=None):
    """Trains steps start..stop on `world` ranks, optionally from / into a DCP checkpoint."""
    model, state, handle, opt = _setup(world, seed=0 if load_from is None else 1)
    if load_from is not None:
        to_load = {"model": get_model_state_dict(model), "gradvac": handle}
        dcp.load(to_load, checkpoint_id=load_from)
        set_model_state_dict(model, to_load["model"])
    _train(model, opt, rank, world, start, stop)
    if save_to is not None:
        dcp.save({"model": get_model_state_dict(model), "gradvac": handle}, checkpoint_id=save_to)
    return {"params": full_params(model), **_gradvac_snapshot(state)}


def cuda_equivalence_body(rank, world, configs):
    """The equivalence configurations on this rank's GPU with NCCL (tests/gpu)."""
    global DEVICE
    torch.cuda.set_device(rank)
    DEVICE = torch.device("cuda", rank)
    counter = CollectiveCounter()
    return [run_config(rank, world, counter, **cfg) for cfg in configs]


def refused_without_cpu_streams_body(rank, world, hide):
    model = shard(make_model(), world)
    saved = getattr(torch.cpu.Stream, "record_event", None)
    if hide:
        del torch.cpu.Stream.record_event
    try:
        return _capture(lambda: register_fsdp(model, GradVacState(num_tasks=M)))
    finally:
        if saved is not None and not hasattr(torch.cpu.Stream, "record_event"):
            torch.cpu.Stream.record_event = saved


def squared_norm_weights(gramian: torch.Tensor) -> torch.Tensor:
    """A weighting that sees the Gramian's scale (GradVac's cosines do not): task l weighs |g_l|^2."""
    return gramian.diagonal().clone()


def hsdp_gramian_body(rank, world, hsdp):
    """Under HSDP every element must enter the Gramians exactly once (replicas hold the same shards):
    a weighting of the squared norms gives ``sum_l |g_l|^2 g_l``, which double counting would scale."""
    plain = make_model()
    model = shard(copy.deepcopy(plain), world, hsdp=hsdp)
    register_fsdp(model, GradVacState(num_tasks=M, weighting=squared_norm_weights))
    x, ys = batch(0, rank, world)
    jac = rank_mean_jacobian(plain, x, ys, world)
    expected = (jac * (jac * jac).sum(1, keepdim=True)).sum(0)
    gradvac_dist.backward(model, task_losses(model(x), ys))
    got = full_grad(model)
    return float((got - expected).norm() / expected.norm())
