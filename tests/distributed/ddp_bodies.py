"""Rank bodies of the DDP tests (module level, so the harness can pickle them).

Every body builds identical float64 models on all ranks, feeds each rank its own slice of a
global batch, and checks `.grad` against the single-process core applied to the rank-mean
per-task gradients, which the test computes on its own from a plain (non-DDP) copy of the model.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradvac_dist
from gradvac_dist import GradVac, GradVacState, gradvac_hook

M = 3
IN, HID = 6, 24
GLOBAL_BATCH = 12  # divisible by 2 and 3: the rank-mean gradient is the global-batch gradient


class MultiHead(nn.Module):
    def __init__(self, m: int = M, unused_head: bool = True, aux: bool = False):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, HID), nn.Tanh(), nn.Linear(HID, HID))
        self.gain = nn.Parameter(torch.ones(HID))  # owned by the root module, one element per feature
        self.heads = nn.ModuleList(nn.Linear(HID, 1) for _ in range(m))
        self.spare = nn.Linear(HID, 2) if unused_head else None  # reached by no task
        # task 0's extra branch, taken where use_aux is set (on some ranks only: a rank-dependent graph)
        self.aux = nn.Linear(HID, 1) if aux else None
        self.use_aux = False

    def forward(self, x):
        h = self.encoder(x) * self.gain
        outs = [head(h).squeeze(-1) for head in self.heads]
        if self.aux is not None and self.use_aux:
            outs[0] = outs[0] + self.aux(h).squeeze(-1)
        if self.spare is not None:
            outs.append(self.spare(h).sum(-1) * 0.0)
        return outs


def make_model(seed: int = 0, aux: bool = False) -> MultiHead:
    torch.manual_seed(seed)
    return MultiHead(aux=aux).double()


class ConvHeads(nn.Module):
    """A convolution kept channels_last (a weight whose memory order is not its logical order) and M heads;
    ``split``: only task 0 goes through the convolution, the others through a linear layer."""

    def __init__(self, m: int = M, split: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, (1, 2))  # on the IN=6 features seen as 2 channels of a 1x3 image
        self.lin = nn.Linear(IN, 8) if split else None
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(m))
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        h = torch.tanh(self.conv(x.view(-1, 2, 1, 3))).flatten(1)
        rest = h if self.lin is None else torch.tanh(self.lin(x))
        return [head(h if i == 0 else rest).squeeze(-1) for i, head in enumerate(self.heads)]


def make_conv_model(seed: int = 0, split: bool = False) -> ConvHeads:
    torch.manual_seed(seed)
    model = ConvHeads(split=split).double()
    assert model.conv.weight.stride() != model.conv.weight.contiguous().stride(), "the weight must be channels_last"
    return model


def batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g, dtype=torch.float64)
    ys = torch.randn(M, GLOBAL_BATCH, generator=g, dtype=torch.float64)
    ys[1] = -ys[0] + 0.3 * ys[1]  # conflicting tasks
    per = GLOBAL_BATCH // world
    sl = slice(rank * per, (rank + 1) * per)
    return x[sl], ys[:, sl]


def task_losses(outs, ys):
    return [((outs[i] - ys[i]) ** 2).mean() for i in range(M)]


def loss_jacobian(losses, params) -> torch.Tensor:
    """``[m, n]``: row ``i`` is loss ``i``'s gradient over ``params``, flattened (zeros where unused)."""
    rows = []
    for i, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)]))
    return torch.stack(rows)


def rank_mean(local: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of every rank's ``local`` (all-gathered, then averaged in rank order)."""
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return torch.stack(gathered).mean(0)


def local_jacobian(model: nn.Module, x, ys) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return loss_jacobian(task_losses(model(x), ys), params)


def mean_jacobian(plain: nn.Module, x, ys, world: int) -> torch.Tensor:
    """The rank mean of every rank's local Jacobian (one all-gather): the reference's input."""
    local = local_jacobian(plain, x, ys)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return torch.stack(gathered).mean(0)


def block_columns(model: nn.Module, grouping: str, shared: list[str] | None):
    """(column index of acted-on params in block order, block sizes), from names: the test's own view."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    numels = [p.numel() for n, p in model.named_parameters() if p.requires_grad]
    offsets = [sum(numels[:i]) for i in range(len(numels))]

    def acted(name):
        return shared is None or any(name == s or name.startswith(s + ".") for s in shared)

    def owner(name):
        return name.rsplit(".", 1)[0] if "." in name else ""

    keys: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if not acted(name):
            continue
        key = "all" if grouping == "whole" else (name if grouping == "parameter" else owner(name))
        keys.setdefault(key, []).append(i)
    cols, sizes = [], []
    for members in keys.values():
        for i in members:
            cols.append(torch.arange(offsets[i], offsets[i] + numels[i]))
        sizes.append(sum(numels[i] for i in members))
    return torch.cat(cols), sizes


def reference_grad(agg: GradVac, mean_jac: torch.Tensor, cols, sizes) -> torch.Tensor:
    out = mean_jac.sum(0)
    out[cols] = agg(mean_jac[:, cols], sizes)
    return out


def _step_both(model, plain, expected, opt, ref_opt) -> float:
    """Relative error of the model's .grad against the reference gradient; then both take a step
    (the reference model along the reference gradient), so the next step compares like with like."""
    got = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    err = float((got - expected).norm() / expected.norm())
    opt.step()
    opt.zero_grad()
    off = 0
    for p in plain.parameters():
        p.grad = expected[off : off + p.numel()].view_as(p).clone()
        off += p.numel()
    ref_opt.step()
    ref_opt.zero_grad()
    return err


def run_config(
    rank,
    world,
    grouping,
    strategy,
    shared=None,
    steps=3,
    bucket_cap_mb=0.002,
    seed=0,
    device="cpu",
    bucket_view=False,
    aux_ranks=None,
):
    """``aux_ranks``: the ranks where task 0 also goes through ``model.aux`` (none where not given)."""
    model = make_model(seed, aux=aux_ranks is not None).to(device)
    model.use_aux = aux_ranks is not None and rank in aux_ranks
    plain = copy.deepcopy(model)
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=bucket_view)
    state = GradVacState(num_tasks=M, seed=7, grouping=grouping, strategy=strategy, shared_params=shared)
    ddp.register_comm_hook(state, gradvac_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    ref_agg = GradVac(seed=7)
    cols, sizes = block_columns(plain, grouping, shared)
    max_err = 0.0
    for step in range(steps):
        x, ys = (t.to(device) for t in batch(step, rank, world))
        expected = reference_grad(ref_agg, mean_jacobian(plain, x, ys, world), cols, sizes)

        gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
        # as under plain DDP: a parameter no task on any rank reaches keeps no .grad; every other one
        # has one on every rank (the heads of the earlier tasks too, which the last pass does not reach,
        # and model.aux on the ranks where it is not used)
        no_grad = [n for n, p in model.named_parameters() if p.grad is None]
        assert no_grad == ["spare.weight", "spare.bias"], no_grad
        max_err = max(max_err, _step_both(model, plain, expected, opt, ref_opt))
    return {
        "max_rel_err": max_err,
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]).cpu(),
        "targets": state.trajectory.targets.cpu(),
        "ref_targets": ref_agg.targets.cpu(),
        "generator": state.trajectory.generator.get_state(),
        "calls": dict(state.counters.calls),
        "num_buckets": len(state._driver.plans),
        "buffers": state.buffer_bytes(),
        "numel": sum(p.numel() for p in model.parameters()),
        "step": state.step,
    }


def equivalence_body(rank, world, configs):
    return [run_config(rank, world, **cfg) for cfg in configs]


def cuda_equivalence_body(rank, world, configs):
    torch.cuda.set_device(rank)
    return [run_config(rank, world, device=f"cuda:{rank}", **cfg) for cfg in configs]


def _train(ddp, state, opt, steps, start, rank, world):
    for step in range(start, start + steps):
        x, ys = batch(step, rank, world)
        gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
        opt.step()
        opt.zero_grad()


def _setup(grouping="module", strategy=None, seed=0):
    model = make_model(seed)
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.002)
    state = GradVacState(num_tasks=M, seed=3, grouping=grouping, strategy=strategy)
    ddp.register_comm_hook(state, gradvac_hook)
    return model, ddp, state, torch.optim.SGD(ddp.parameters(), lr=0.05)


def checkpoint_body(rank, world, steps, start=0, checkpoint=None, strategy=None):
    """Trains `steps` steps from `start` (optionally resuming a checkpoint); returns a new checkpoint."""
    model, ddp, state, opt = _setup(strategy=strategy)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        state.load_state_dict(checkpoint["gradvac"])
    _train(ddp, state, opt, steps, start, rank, world)
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "gradvac": state.state_dict(),
    }


def _capture(fn):
    try:
        fn()
    except Exception as err:
        return type(err).__name__, str(err)
    return None


def misuse_body(rank, world):
    out = {}
    x, ys = batch(0, rank, world)

    def ddp_with(**kwargs):
        model = make_model()
        return DDP(model, bucket_cap_mb=0.002, **kwargs)

    def no_find_unused():
        ddp = ddp_with(find_unused_parameters=False)
        ddp.register_comm_hook(GradVacState(num_tasks=M), gradvac_hook)
        gradvac_dist.backward(ddp, task_losses(ddp(x), ys))

    def static_graph():
        ddp = ddp_with(find_unused_parameters=True, static_graph=True)
        ddp.register_comm_hook(GradVacState(num_tasks=M), gradvac_hook)
        gradvac_dist.backward(ddp, task_losses(ddp(x), ys))

    def plain_backward():
        ddp = ddp_with(find_unused_parameters=True)
        ddp.register_comm_hook(GradVacState(num_tasks=M), gradvac_hook)
        sum(task_losses(ddp(x), ys)).backward()

    def wrong_count():
        ddp = ddp_with(find_unused_parameters=True)
        ddp.register_comm_hook(GradVacState(num_tasks=M), gradvac_hook)
        gradvac_dist.backward(ddp, task_losses(ddp(x), ys)[:2])

    def not_registered():
        ddp = ddp_with(find_unused_parameters=True)
        gradvac_dist.backward(ddp, task_losses(ddp(x), ys))

    def registered_twice():
        ddp = ddp_with(find_unused_parameters=True)
        ddp.register_comm_hook(GradVacState(num_tasks=M), gradvac_hook)
        ddp.register_comm_hook(GradVacState(num_tasks=M), gradvac_hook)

    def shared_state():
        state = GradVacState(num_tasks=M)
        a, b = ddp_with(find_unused_parameters=True), ddp_with(find_unused_parameters=True)
        a.register_comm_hook(state, gradvac_hook)
        b.register_comm_hook(state, gradvac_hook)
        gradvac_dist.backward(a, task_losses(a(x), ys))
        gradvac_dist.backward(b, task_losses(b(x), ys))

    def aggregator_given():
        ddp = ddp_with(find_unused_parameters=True)
        ddp.register_comm_hook(GradVacState(num_tasks=M), gradvac_hook)
        gradvac_dist.backward(ddp, task_losses(ddp(x), ys), GradVac())

    for name, fn in list(locals().items()):
        if callable(fn) and name not in ("ddp_with",):
            out[name] = _capture(fn)
    return out


class _Twins(NamedTuple):
    """A hooked DDP model and its plain reference copy, each with its optimizer."""

    ddp: DDP
    state: GradVacState
    opt: torch.optim.Optimizer
    plain: nn.Module
    ref_agg: GradVac
    ref_opt: torch.optim.Optimizer
    cols: torch.Tensor
    sizes: list[int]


def _twins(model: nn.Module, strategy, bucket_cap_mb: float = 0.002) -> _Twins:
    """``model`` under DDP with GradVac's hook (grouping "module"), and the reference that checks it."""
    plain = copy.deepcopy(model)
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=bucket_cap_mb)
    state = GradVacState(num_tasks=M, grouping="module", strategy=strategy)
    ddp.register_comm_hook(state, gradvac_hook)
    cols, sizes = block_columns(plain, "module", None)
    return _Twins(
        ddp,
        state,
        torch.optim.SGD(ddp.parameters(), lr=0.05),
        plain,
        GradVac(),
        torch.optim.SGD(plain.parameters(), lr=0.05),
        cols,
        sizes,
    )


def accumulation_body(rank, world, strategy, micro=3, steps=2, conv=False):
    """`micro` micro-batches per step: GradVac once, on each task's gradient summed over them
    (``conv``: on a channels_last convolution, whose bucket slice is in memory order)."""
    model = make_conv_model() if conv else make_model()
    ddp, state, opt, plain, ref_agg, ref_opt, cols, sizes = _twins(model, strategy)
    errs, comm_during_accumulation = [], 0
    for step in range(steps):
        total_local = 0
        for k in range(micro):
            x, ys = batch(step * micro + k, rank, world)
            total_local = total_local + local_jacobian(plain, x, ys)
            before = sum(state.counters.calls.values())
            if k < micro - 1:
                with ddp.no_sync():
                    gradvac_dist.backward(ddp, task_losses(ddp(x), ys), sync=False)
                comm_during_accumulation += sum(state.counters.calls.values()) - before
            else:
                gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
        gathered = [torch.empty_like(total_local) for _ in range(world)]
        dist.all_gather(gathered, total_local)
        expected = reference_grad(ref_agg, torch.stack(gathered).mean(0), cols, sizes)
        errs.append(_step_both(model, plain, expected, opt, ref_opt))
    misuse = _capture(lambda: gradvac_dist.backward(ddp, task_losses(ddp(x), ys), sync=False))
    return {
        "errs": errs,
        "comm": comm_during_accumulation,
        "gramian": state.counters.calls["gramian_all_reduce"],
        "misuse": misuse,
    }


def first_task_conv_body(rank, world, strategy, through_module):
    """A channels_last convolution reached by task 0 alone: after the last pass (which does not reach
    it) its .grad is the aggregated gradient in the parameter's own layout, on every rank."""
    model = make_conv_model(split=True)
    ddp, state, opt, plain, ref_agg, ref_opt, cols, sizes = _twins(model, strategy, bucket_cap_mb=0.0001)
    forward = ddp.module if through_module else ddp
    errs, layouts = [], []
    for step in range(2):
        x, ys = batch(step, rank, world)
        expected = reference_grad(ref_agg, mean_jacobian(plain, x, ys, world), cols, sizes)
        gradvac_dist.backward(ddp, task_losses(forward(x), ys))
        weight = model.conv.weight
        layouts.append(weight.grad is not None and weight.grad.stride() == weight.stride())
        errs.append(_step_both(model, plain, expected, opt, ref_opt))
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"errs": errs, "layouts": layouts, "params": params, "buckets": len(state._driver.plans)}


def cuda_sync_count_body(rank, world):
    """Host synchronisations of one GradVac-DDP step beyond those of the same m-pass DDP step."""
    import warnings

    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"

    def count(gradvac: bool) -> int:
        model = make_model().to(device)
        ddp = DDP(model, device_ids=[rank], find_unused_parameters=True)
        if gradvac:
            ddp.register_comm_hook(GradVacState(num_tasks=M, grouping="module"), gradvac_hook)
        counts = []
        for step in range(3):  # the first steps bind, agree and build plans: count the last
            x, ys = (t.to(device) for t in batch(step, rank, world))
            losses = task_losses(ddp(x), ys)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    if gradvac:
                        gradvac_dist.backward(ddp, losses)
                    else:
                        for i, loss in enumerate(losses):
                            ddp.reducer.prepare_for_backward([loss])
                            loss.backward(retain_graph=i < M - 1)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
            model.zero_grad(set_to_none=True)
        return counts[-1]

    return {"plain": count(False), "gradvac": count(True)}


def pieces_body(rank, world, configs, piece):
    """The sharded configurations twice: as they are, then with gloo's all-to-all reduce-scatters in
    pipelined pieces (``PIPELINE_PIECE`` lowered so that this small model's shards split)."""
    from gradvac_dist import _ddp

    whole = [run_config(rank, world, **cfg) for cfg in configs]
    saved = _ddp.PIPELINE_PIECE
    _ddp.PIPELINE_PIECE = piece
    try:
        pieced = [run_config(rank, world, **cfg) for cfg in configs]
    finally:
        _ddp.PIPELINE_PIECE = saved
    return whole, pieced
