"""Rank bodies of the Gramian-weighting tests: TorchJD's weightings under DDP and FSDP2.

The reference is TorchJD's own aggregator (``A(J)``) applied to the rank-mean Jacobian, computed
independently from a plain copy of the model: on the whole Jacobian, or, per block, on each block's
columns with one aggregator call per block in block order (TorchJD's grouping recipe), the other
columns summed. PCGrad draws a random order: the library seeds torch's CPU generator for the
weighting from its own generator, one draw a step (``seed = randint(0, 2**62)``), and the
reference repeats that protocol.
"""

from __future__ import annotations

import copy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gradvac_dist
from gradvac_dist import GradVacState, gradvac_hook, register_fsdp
from tests.distributed import fsdp_bodies
from tests.distributed.ddp_bodies import _step_both, batch, block_columns, local_jacobian, make_model, task_losses

SEED = 11


def aggregators():
    import torchjd.aggregation as A

    return {
        "UPGrad": (A.UPGradWeighting, A.UPGrad),
        "MGDA": (A.MGDAWeighting, A.MGDA),
        "PCGrad": (A.PCGradWeighting, A.PCGrad),
        "DualProj": (A.DualProjWeighting, A.DualProj),
        "IMTL-G": (A.IMTLGWeighting, A.IMTLG),
        "Aligned-MTL": (A.AlignedMTLWeighting, A.AlignedMTL),
    }


def reference(aggregator, jac: torch.Tensor, cols, sizes, generator: torch.Generator) -> torch.Tensor:
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    out = jac.sum(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        start = 0
        for size in sizes:
            block = cols[start : start + size]
            out[block] = aggregator(jac[:, block])
            start += size
    return out


def ddp_body(rank, world, names, grouping, shared, steps=2):
    """DDP, every named weighting: max relative error of .grad against TorchJD, per weighting."""
    table = aggregators()
    out = {}
    for name in names:
        weighting_cls, aggregator_cls = table[name]
        model = make_model()
        plain = copy.deepcopy(model)
        ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.002)
        state = GradVacState(num_tasks=3, seed=SEED, grouping=grouping, shared_params=shared, weighting=weighting_cls())
        ddp.register_comm_hook(state, gradvac_hook)
        cols, sizes = block_columns(plain, grouping, shared)
        ref_gen = torch.Generator().manual_seed(SEED)
        opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.SGD(plain.parameters(), lr=0.05)
        errs = []
        for step in range(steps):
            x, ys = batch(step, rank, world)
            local = local_jacobian(plain, x, ys)
            gathered = [torch.empty_like(local) for _ in range(world)]
            torch.distributed.all_gather(gathered, local)
            expected = reference(aggregator_cls(), torch.stack(gathered).mean(0), cols, sizes, ref_gen)
            gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
            errs.append(_step_both(model, plain, expected, opt, ref_opt))
        out[name] = {
            "err": max(errs),
            "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
            "generator": state.trajectory.generator.get_state(),
            "step": state.step,
            "calls": dict(state.counters.calls),
        }
    return out


def fsdp_body(rank, world, names, grouping, shared, steps=2):
    """FSDP2, every named weighting: max relative error of .grad against TorchJD, per weighting."""
    table = aggregators()
    out = {}
    for name in names:
        weighting_cls, aggregator_cls = table[name]
        plain = fsdp_bodies.make_model()
        model = fsdp_bodies.shard(copy.deepcopy(plain), world)
        state = GradVacState(num_tasks=fsdp_bodies.M, seed=SEED, grouping=grouping, shared_params=shared,
                             weighting=weighting_cls())  # fmt: skip
        register_fsdp(model, state)
        cols, sizes = block_columns(plain, grouping, shared)
        ref_gen = torch.Generator().manual_seed(SEED)
        errs = []
        for step in range(steps):
            x, ys = fsdp_bodies.batch(step, rank, world)
            mean_jac = fsdp_bodies.rank_mean_jacobian(plain, x, ys, world)
            expected = reference(aggregator_cls(), mean_jac, cols, sizes, ref_gen)
            gradvac_dist.backward(model, fsdp_bodies.task_losses(model(x), ys))
            got = fsdp_bodies.full_grad(model)
            errs.append(float((got - expected).norm() / expected.norm()))
            model.zero_grad(set_to_none=True)
        out[name] = {"err": max(errs), "step": state.step}
    return out


def refused_body(rank, world):
    """A weighting with state of its own, or one that needs the Jacobian: refused at construction."""
    import torchjd.aggregation as A

    out = {}
    for name, weighting in {"stateful": A.GradVacWeighting(), "matrix": A.MeanWeighting()}.items():
        try:
            GradVacState(num_tasks=3, weighting=weighting)
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    return out


def uniform_weights(gramian: torch.Tensor) -> torch.Tensor:
    """A plain function as a weighting (its repr holds a memory address, different on every rank)."""
    return torch.ones(gramian.shape[0], dtype=gramian.dtype)


def rank_weights(gramian: torch.Tensor) -> torch.Tensor:
    """A weighting that gives every rank other weights: rank r weighs task l by (l + 1) (r + 1)."""
    m = gramian.shape[0]
    return torch.arange(1, m + 1, dtype=gramian.dtype) * (1 + torch.distributed.get_rank())


def python_random_weights(gramian: torch.Tensor) -> torch.Tensor:
    """A weighting drawing from Python's own generator, which the library does not seed (and a rank's
    differs): every rank must still combine with one set of weights."""
    import random

    return torch.tensor([random.random() for _ in range(gramian.shape[0])], dtype=gramian.dtype)


def fails_on_rank_one(gramian: torch.Tensor) -> torch.Tensor:
    if torch.distributed.get_rank() == 1:
        raise ValueError("this weighting fails on rank 1")
    return torch.ones(gramian.shape[0], dtype=gramian.dtype)


def any_callable_body(rank, world, steps=2):
    """Plain callables as weightings under DDP (a function, a lambda, a rank-dependent one, one drawing
    from Python's random): .grad equals the first rank's weights applied to the rank-mean Jacobian,
    bit-identical on every rank; a weighting that raises on one rank raises on every rank."""
    import random

    random.seed(1234 + rank)  # each rank's Python generator differs, as in a real job
    out = {}
    cases = {
        "function": (uniform_weights, lambda m: torch.ones(m, dtype=torch.float64)),
        "lambda": (lambda g: torch.full((g.shape[0],), 2.0, dtype=g.dtype), lambda m: torch.full((m,), 2.0)),
        "rank_dependent": (rank_weights, lambda m: torch.arange(1, m + 1, dtype=torch.float64)),
        "python_random": (python_random_weights, None),
    }
    for name, (weighting, rank0_weights) in cases.items():
        model = make_model()
        plain = copy.deepcopy(model)
        ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.002)
        state = GradVacState(num_tasks=3, seed=SEED, weighting=weighting)
        ddp.register_comm_hook(state, gradvac_hook)
        opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.SGD(plain.parameters(), lr=0.05)
        errs, grads = [], []
        for step in range(steps):
            x, ys = batch(step, rank, world)
            local = local_jacobian(plain, x, ys)
            gathered = [torch.empty_like(local) for _ in range(world)]
            torch.distributed.all_gather(gathered, local)
            mean = torch.stack(gathered).mean(0)
            gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
            grads.append(
                torch.cat(
                    [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()]
                )
            )
            if rank0_weights is not None:
                expected = rank0_weights(3).to(mean.dtype) @ mean
                errs.append(_step_both(model, plain, expected, opt, ref_opt))
            else:
                opt.step()
                opt.zero_grad()
        out[name] = {"err": max(errs) if errs else None, "grads": torch.stack(grads), "step": state.step}
    model = make_model()
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.002)
    state = GradVacState(num_tasks=3, seed=SEED, weighting=fails_on_rank_one)
    ddp.register_comm_hook(state, gradvac_hook)
    x, ys = batch(0, rank, world)
    try:
        gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
        out["failing"] = None
    except (ValueError, RuntimeError) as err:
        out["failing"] = (type(err).__name__, str(err))
    out["failing_state"] = (state.step, state.trajectory.generator.get_state())
    return out
