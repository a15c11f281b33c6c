"""Rank bodies of the usage-slip tests: what a hostile user does, exact or refused on every rank.

Each body returns, per case, either the relative error of ``.grad`` against the exact reference
(GradVac on the rank-mean per-task gradients, computed independently as in ``ddp_bodies``) or the
error every rank raised. Cases that would hang run under the harness deadline, so a hang fails.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradvac_dist
from gradvac_dist import GradVac, GradVacState, gradvac_hook, register_fsdp
from tests.distributed import fsdp_bodies
from tests.distributed.ddp_bodies import (
    M,
    _capture,
    _step_both,
    batch,
    block_columns,
    loss_jacobian,
    make_model,
    mean_jacobian,
    rank_mean,
    reference_grad,
    task_losses,
)


def _grad(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def _ddp(model, bucket_view=False, **state_kwargs):
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.002, gradient_as_bucket_view=bucket_view)
    state = GradVacState(num_tasks=state_kwargs.pop("num_tasks", M), **state_kwargs)
    ddp.register_comm_hook(state, gradvac_hook)
    return ddp, state


def settings_differ_body(rank, world):
    """One setting differs on rank 1: every rank raises, naming the setting, before any gradient moves."""
    x, ys = batch(0, rank, world)
    cases = {
        "seed": ({"seed": 0}, {"seed": 1}),
        "beta": ({"beta": 0.5}, {"beta": 0.25}),
        "eps": ({"eps": 1e-8}, {"eps": 1e-6}),
        "shared_params": ({"shared_params": ["encoder"]}, {"shared_params": ["encoder", "gain"]}),
        "grouping": ({"grouping": "whole"}, {"grouping": "module"}),
        "strategy": ({"strategy": "sharded"}, {"strategy": "replicated"}),
        "on_nonfinite": ({"on_nonfinite": "raise"}, {"on_nonfinite": "skip"}),
        "check_sync_every": ({}, {"check_sync_every": 5}),
        "num_tasks": ({"num_tasks": M}, {"num_tasks": M - 1}),
    }
    out = {}
    for name, kwargs in cases.items():
        mine = dict(kwargs[rank % 2])
        ddp, state = _ddp(make_model(), **mine)
        losses = task_losses(ddp(x), ys)[: state.num_tasks]
        out[name] = _capture(lambda ddp=ddp, losses=losses: gradvac_dist.backward(ddp, losses))
        out[name + "/moved"] = sum(state.counters.calls[k] for k in state.counters.calls if k != "agreement_all_reduce")
    # a checkpoint loaded on one rank only: the next step refuses, naming the trajectory
    ddp, state = _ddp(make_model())
    gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
    if rank == 0:
        state.load_state_dict(GradVacState(num_tasks=M).state_dict())
    out["loaded_on_one_rank"] = _capture(lambda: gradvac_dist.backward(ddp, task_losses(ddp(x), ys)))
    # a rank whose own set-up fails (a shared_params name that rank's model lacks): every rank raises
    ddp, state = _ddp(make_model(), shared_params=["encoder"] if rank == 0 else ["no_such_module"])
    out["setup_fails_on_one_rank"] = _capture(lambda: gradvac_dist.backward(ddp, task_losses(ddp(x), ys)))
    return out


def _fsdp_state(rank, **kwargs):
    model = fsdp_bodies.shard(fsdp_bodies.make_model(), 2)
    state = GradVacState(num_tasks=fsdp_bodies.M, grouping="module", **kwargs)
    return model, state


def fsdp_settings_differ_body(rank, world):
    """The same under FSDP2: registration compares the settings across ranks."""
    out = {}
    for name, kwargs in {"seed": [{"seed": 0}, {"seed": 3}], "beta": [{"beta": 0.5}, {"beta": 0.1}]}.items():
        model, state = _fsdp_state(rank, **kwargs[rank])
        out[name] = _capture(lambda model=model, state=state: register_fsdp(model, state))
    model = fsdp_bodies.shard(fsdp_bodies.make_model(), 2)
    state = GradVacState(num_tasks=fsdp_bodies.M, shared_params=["encoder"] if rank == 0 else ["nothing"])
    out["setup_fails_on_one_rank"] = _capture(lambda: register_fsdp(model, state))
    return out


def autocast_body(rank, world):
    """backward(ddp, ...) inside an autocast region gives exactly the .grad it gives outside (the
    single-process path, which a job of several ranks refuses, is checked in tests/unit/test_local.py)."""
    base = make_model().float()
    x, ys = (t.float() for t in batch(0, rank, world))
    grads = {}
    for where in ("outside", "inside"):
        model = copy.deepcopy(base)
        target = _ddp(model, grouping="module")[0]
        losses = task_losses(target(x), ys)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "inside"):
            gradvac_dist.backward(target, losses)
        grads[where] = _grad(model)
    # before the fix: about 4e-3 relative (the passes and the Gramians lowered to bf16)
    return {"ddp": _rel(grads["inside"], grads["outside"])}


def accumulation_body(rank, world, micro=2):
    """`with ddp.no_sync(): backward(ddp, losses)` (sync unset) accumulates exactly; contradictions raise."""
    model = make_model()
    plain = copy.deepcopy(model)
    ddp, state = _ddp(model, grouping="module")
    ref = GradVac()
    cols, sizes = block_columns(plain, "module", None)
    total = 0
    for k in range(micro):
        x, ys = batch(k, rank, world)
        total = total + mean_jacobian(plain, x, ys, world)
        if k < micro - 1:
            with ddp.no_sync():
                gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
        else:
            gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
    out = {"err": _rel(_grad(model), reference_grad(ref, total, cols, sizes)), "steps": state.step}
    x, ys = batch(9, rank, world)
    with ddp.no_sync():
        out["sync_true_inside_no_sync"] = _capture(
            lambda: gradvac_dist.backward(ddp, task_losses(ddp(x), ys), sync=True)
        )
    out["sync_false_outside"] = _capture(lambda: gradvac_dist.backward(ddp, task_losses(ddp(x), ys), sync=False))
    return out


def forgotten_zero_grad_body(rank, world, strategy, bucket_view):
    """Two steps without zero_grad: .grad holds the sum of both steps' GradVac gradients, as after
    two plain loss.backward() calls (the same rule as the single-process and FSDP2 paths)."""
    model = make_model()
    plain = copy.deepcopy(model)
    ddp, _ = _ddp(model, bucket_view=bucket_view, grouping="parameter", strategy=strategy)
    ref = GradVac()
    cols, sizes = block_columns(plain, "parameter", None)
    expected = 0
    for step in range(2):
        x, ys = batch(step, rank, world)
        expected = expected + reference_grad(ref, mean_jacobian(plain, x, ys, world), cols, sizes)
        gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
    return _rel(_grad(model), expected)


def module_forward_body(rank, world, strategy, grouping):
    """Forward through ``ddp.module`` (as Lightning's DDP forward in effect gives): exact, heads included,
    and ``model.aux``, which task 0 reaches on rank 0 only, gets the same gradient on every rank."""
    model = make_model(aux=True)
    model.use_aux = rank == 0
    plain = copy.deepcopy(model)
    ddp, _ = _ddp(model, grouping=grouping, strategy=strategy)
    ref = GradVac()
    cols, sizes = block_columns(plain, grouping, None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    errs, head_errs, missing = [], [], []
    for step in range(2):
        x, ys = batch(step, rank, world)
        expected = reference_grad(ref, mean_jacobian(plain, x, ys, world), cols, sizes)
        gradvac_dist.backward(ddp, task_losses(ddp.module(x), ys))
        got = _grad(model)
        errs.append(_rel(got, expected))
        names = [n for n, _ in model.named_parameters()]
        offsets = [0]
        for p in model.parameters():
            offsets.append(offsets[-1] + p.numel())
        heads = [i for i, n in enumerate(names) if n.startswith("heads.0.")]
        head = torch.cat([got[offsets[i] : offsets[i + 1]] for i in heads])
        head_ref = torch.cat([expected[offsets[i] : offsets[i + 1]] for i in heads])
        head_errs.append(_rel(head, head_ref))
        missing.append([n for n, p in model.named_parameters() if p.grad is None])
        _step_both(model, plain, expected, opt, ref_opt)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"errs": errs, "head_errs": head_errs, "missing": missing, "params": params}


def wrapped_module_body(rank, world):
    """backward(ddp.module, losses, GradVac()) in a multi-rank job: refused, whichever way it is reached."""
    x, ys = batch(0, rank, world)
    ddp, _ = _ddp(make_model())
    out = {
        "forward_through_ddp": _capture(lambda: gradvac_dist.backward(ddp.module, task_losses(ddp(x), ys), GradVac()))
    }
    ddp, _ = _ddp(make_model())  # before any DDP step, the forward around DDP: nothing to see of DDP
    out["module_forward_first"] = _capture(
        lambda: gradvac_dist.backward(ddp.module, task_losses(ddp.module(x), ys), GradVac())
    )
    gradvac_dist.backward(ddp, task_losses(ddp(x), ys))  # a proper step binds the DDP module
    out["after_a_step"] = _capture(lambda: gradvac_dist.backward(ddp.module, task_losses(ddp.module(x), ys), GradVac()))
    return out


def frozen_after_wrap_body(rank, world):
    """A parameter frozen between DistributedDataParallel(...) and the first step: exact; unfrozen later: refused."""
    model = make_model()
    ddp, _ = _ddp(model, grouping="module")
    model.gain.requires_grad_(False)
    plain = copy.deepcopy(model)  # the reference has the same parameter frozen
    cols, sizes = block_columns(plain, "module", None)
    x, ys = batch(0, rank, world)
    expected = reference_grad(GradVac(), mean_jacobian(plain, x, ys, world), cols, sizes)
    gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
    got = torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters() if p.requires_grad]
    )
    out = {"err": _rel(got, expected), "frozen_grad_is_none": model.gain.grad is None}
    model.gain.requires_grad_(True)
    out["unfrozen"] = _capture(lambda: gradvac_dist.backward(ddp, task_losses(ddp(x), ys)))
    return out


def join_body(rank, world):
    """ddp.join() is refused on every rank before any collective of GradVac's."""
    ddp, state = _ddp(make_model())
    x, ys = batch(0, rank, world)
    with ddp.join():
        err = _capture(lambda: gradvac_dist.backward(ddp, task_losses(ddp(x), ys)))
    return {"join": err, "moved": sum(state.counters.calls.values())}


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder, self.gain = model.encoder, model.gain

    def forward(self, x):
        return self.encoder(x) * self.gain


class _Heads(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.heads = model.heads

    def forward(self, h):
        return [head(h).squeeze(-1) for head in self.heads]


def chained_body(rank, world, first_hooked):
    """B consumes A's output, two DDP modules: refused on every rank (A would reduce only the first pass)."""
    model = make_model()
    a = DDP(_Encoder(model), find_unused_parameters=True)
    if first_hooked:
        a.register_comm_hook(GradVacState(num_tasks=M), gradvac_hook)
    b, _ = _ddp(_Heads(model))
    x, ys = batch(0, rank, world)
    return _capture(lambda: gradvac_dist.backward(b, task_losses(b(a(x)), ys)))


def compiled_body(rank, world):
    """backward(torch.compile(ddp), losses): exact (the compiled wrapper is unwrapped)."""
    torch._dynamo.reset()
    model = make_model()
    plain = copy.deepcopy(model)
    ddp = DDP(model, find_unused_parameters=True)  # dynamo's DDP optimizer needs buckets of its default size
    ddp.register_comm_hook(GradVacState(num_tasks=M, grouping="parameter"), gradvac_hook)
    compiled = torch.compile(ddp, backend="eager")
    cols, sizes = block_columns(plain, "parameter", None)
    ref = GradVac()
    errs = []
    for step in range(2):
        x, ys = batch(step, rank, world)
        expected = reference_grad(ref, mean_jacobian(plain, x, ys, world), cols, sizes)
        gradvac_dist.backward(compiled, task_losses(compiled(x), ys))
        errs.append(_rel(_grad(model), expected))
        model.zero_grad()
    return errs


def register_ddp_body(rank, world):
    """register_ddp: idempotent with the same state, refused with another state or another hook."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    out = {}
    ddp = DDP(make_model(), find_unused_parameters=True)
    state = GradVacState(num_tasks=M)
    out["first"] = gradvac_dist.register_ddp(ddp, state) is state
    out["again"] = gradvac_dist.register_ddp(ddp, state) is state
    out["other_state"] = _capture(lambda: gradvac_dist.register_ddp(ddp, GradVacState(num_tasks=M)))
    other = DDP(make_model(), find_unused_parameters=True)
    other.register_comm_hook(dist.group.WORLD, allreduce_hook)
    out["other_hook"] = _capture(lambda: gradvac_dist.register_ddp(other, GradVacState(num_tasks=M)))
    out["not_ddp"] = _capture(lambda: gradvac_dist.register_ddp(make_model(), GradVacState(num_tasks=M)))
    x, ys = batch(0, rank, world)
    gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
    out["step"] = state.step
    return out


def sparse_body(rank, world):
    """An nn.Embedding(sparse=True) in the trunk under DDP: refused on every rank, naming the parameter."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(16, 4, sparse=True), "head": torch.nn.Linear(4, M)})
    ddp, _ = _ddp(model.double())
    tokens = torch.tensor([rank, rank + 3, 7])

    def step():
        out = ddp.module["head"](ddp.module["embed"](tokens)).sum(0)  # DDP's own forward does not apply here
        gradvac_dist.backward(ddp, [out[i] for i in range(M)])

    return _capture(step)


def one_rank_refuses_body(rank, world, first_step, fsdp=False):
    """Rank 1's inputs to a step fail a check (a task with no samples there returning a constant, a
    Python float, one loss too few); rank 0's pass. Every rank must raise promptly (rank 0 without
    waiting in the passes), and the job must go on: the next step is exact on both ranks."""
    import time

    if fsdp:
        plain = fsdp_bodies.make_model()
        model = fsdp_bodies.shard(copy.deepcopy(plain), world)
        state = GradVacState(num_tasks=fsdp_bodies.M)
        register_fsdp(model, state)
        forward, make_batch, losses_of = model, fsdp_bodies.batch, fsdp_bodies.task_losses
    else:
        model = make_model()
        ddp, state = _ddp(model)
        forward, make_batch, losses_of = ddp, batch, task_losses

    def losses(step, bad=None):
        x, ys = make_batch(step, rank, world)
        out = losses_of(forward(x), ys)
        if rank == 1 and bad == "constant":
            out[-1] = torch.tensor(0.0, dtype=torch.float64)
        elif rank == 1 and bad == "float":
            out[-1] = 0.0
        elif rank == 1 and bad == "too_few":
            out = out[:-1]
        return out

    if not first_step:
        gradvac_dist.backward(forward, losses(0))
        model.zero_grad(set_to_none=True)
    out = {}
    for bad in ("constant", "float", "too_few"):
        batch_losses = losses(1, bad)
        start = time.monotonic()
        out[bad] = (_capture(lambda ls=batch_losses: gradvac_dist.backward(forward, ls)), time.monotonic() - start)
        out[bad + "/step"] = state.step
        out[bad + "/grads"] = [n for n, p in model.named_parameters() if p.grad is not None]
    gradvac_dist.backward(forward, losses(2))  # the job goes on: a good step runs on every rank
    grads = [p.grad.full_tensor() if fsdp else p.grad for p in model.parameters() if p.grad is not None]
    out["after"] = (state.step, torch.cat([g.flatten() for g in grads]), state.trajectory.generator.get_state())
    return out


def per_task_data_body(rank, world, grouping, steps=2):
    """Per-task data (each sample belongs to one task, as in the GradVac paper's multilingual setting):
    one forward per task through ``ddp`` on that task's own samples, then ``backward(ddp, losses)``.
    Exact against GradVac on the rank-mean Jacobian whose row t is task t's gradient on its samples."""
    model = make_model()
    plain = copy.deepcopy(model)
    ddp, _ = _ddp(model, grouping=grouping)
    cols, sizes = block_columns(plain, grouping, None)
    ref = GradVac()
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.SGD(plain.parameters(), lr=0.05)
    params = [p for p in plain.parameters() if p.requires_grad]
    errs = []
    for step in range(steps):
        x, ys = batch(step, rank, world)
        per = x.shape[0] // M  # task t trains on its own third of the samples
        shares = [(x[t * per : (t + 1) * per], ys[t, t * per : (t + 1) * per]) for t in range(M)]
        local = loss_jacobian([((plain(xt)[t] - yt) ** 2).mean() for t, (xt, yt) in enumerate(shares)], params)
        expected = reference_grad(ref, rank_mean(local), cols, sizes)
        losses = [((ddp(xt)[t] - yt) ** 2).mean() for t, (xt, yt) in enumerate(shares)]  # one forward per task
        gradvac_dist.backward(ddp, losses)
        errs.append(_step_both(model, plain, expected, opt, ref_opt))
    return errs
