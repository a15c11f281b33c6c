"""Rank bodies of the reliability tests: non-finite gradients, GradScaler, desync, faults."""

from __future__ import annotations

import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gradvac_dist
from gradvac_dist import GradVacState, NonFiniteGradientError, gradvac_hook
from tests.distributed.ddp_bodies import M, batch, make_model, task_losses


def nonfinite_body(rank, world, strategy, on_nonfinite, bad_rank=1, bad_task=1):
    """Step 0 clean, step 1 poisons one task's loss on one rank, step 2 clean again."""
    model = make_model()
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.002)
    state = GradVacState(num_tasks=M, grouping="parameter", strategy=strategy, on_nonfinite=on_nonfinite)
    ddp.register_comm_hook(state, gradvac_hook)
    out = {}
    for step in range(3):
        x, ys = batch(step, rank, world)
        if step == 1 and rank == bad_rank:
            ys = ys.clone()
            ys[bad_task, 0] = math.inf
        before = (
            state.step,
            state.trajectory.targets.clone() if state.trajectory.targets is not None else None,
            state.trajectory.generator.get_state(),
        )
        try:
            gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
            out[step] = ("ok", None)
        except NonFiniteGradientError as err:
            out[step] = ("error", (str(err), err.task, err.where))
        grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        out[f"finite{step}"] = grads_finite
        if step == 1:
            out["untouched"] = (
                state.step == before[0]
                and torch.equal(state.trajectory.targets, before[1])
                and torch.equal(state.trajectory.generator.get_state(), before[2])
            )
        for p in model.parameters():
            p.grad = None
    out["step"] = state.step
    out["targets"] = state.trajectory.targets.clone()
    return out


def scaler_body(rank, world, scale, eps):
    """GradVac through a GradScaler equals the unscaled computation (cosines are scale-invariant)."""
    results = []
    for use_scaler in (False, True):
        model = make_model()
        ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.002)
        state = GradVacState(num_tasks=M, grouping="module", eps=eps, on_nonfinite="skip")
        ddp.register_comm_hook(state, gradvac_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000) if use_scaler else None
        for step in range(3):
            x, ys = batch(step, rank, world)
            losses = task_losses(ddp(x), ys)
            if scaler is not None:
                losses = [scaler.scale(loss) for loss in losses]
            gradvac_dist.backward(ddp, losses)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        results.append(
            (
                torch.cat([p.detach().flatten() for p in model.parameters()]),
                state.trajectory.targets.clone(),
                state.step,
            )
        )
    return results


def desync_body(rank, world, check_sync_every=None, strategy=None):
    """Ranks whose targets drifted apart are caught at the next step, naming what differs."""
    model = make_model()
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.002)
    state = GradVacState(num_tasks=M, check_sync_every=check_sync_every, strategy=strategy)
    ddp.register_comm_hook(state, gradvac_hook)
    errors = []
    for step in range(4):
        if step == 2 and rank == 1:
            state.trajectory.targets[0, 0, 1] += 1e-3  # simulated corruption on one rank
        x, ys = batch(step, rank, world)
        try:
            gradvac_dist.backward(ddp, task_losses(ddp(x), ys))
        except RuntimeError as err:
            errors.append((step, str(err)))
            break
        for p in model.parameters():
            p.grad = None
    return errors


def dying_rank_body(rank, world, victim, started_path, strategy=None):
    """`victim` dies in the middle of step 1's backward; the others must fail, not hang."""
    model = make_model()
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.002)
    state = GradVacState(num_tasks=M, strategy=strategy)
    ddp.register_comm_hook(state, gradvac_hook)
    t0 = time.monotonic()
    try:
        for step in range(3):
            x, ys = batch(step, rank, world)
            losses = task_losses(ddp(x), ys)
            if step == 1 and rank == victim:
                open(started_path, "w").close()
                os._exit(3)  # a crash: no cleanup, no goodbye to the peers
            gradvac_dist.backward(ddp, losses)
    except Exception as err:  # the survivors must get here, quickly
        return ("raised", type(err).__name__, time.monotonic() - t0)
    return ("finished", None, time.monotonic() - t0)
