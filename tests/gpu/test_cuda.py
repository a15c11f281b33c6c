"""CUDA and NCCL: the same code paths as on CPU/gloo, checked on a real GPU."""

from __future__ import annotations

import torch

import gradvac_dist
from gradvac_dist import GradVac, draw_order, gradvac_step
from gradvac_dist._blocks import contiguous_segments, partial_gramians
from tests.distributed import ddp_bodies
from tests.distributed.harness import run_distributed


def test_aggregator_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(10, 1_000_003, generator=g)
    jac[1] -= 0.8 * jac[0]
    sizes = [400_000, 1000, 599_003]
    on_cpu, on_gpu = GradVac(seed=1), GradVac(seed=1)
    for j in (jac, jac.roll(1, dims=0)):  # two steps: targets carried, a second order drawn
        a, b = on_cpu(j, sizes), on_gpu(j.cuda(), sizes)
        assert b.device.type == "cuda"
        assert (b.cpu() - a).norm() / a.norm() < 1e-4
    assert on_gpu.targets.device.type == "cuda"
    assert torch.allclose(on_gpu.targets.cpu(), on_cpu.targets, atol=1e-5, rtol=0)


def test_step_never_synchronises_with_the_host():
    m, k = 16, 50
    jac = torch.randn(m, 4096, device="cuda")
    gram = partial_gramians(jac, contiguous_segments([4096 // k] * (k - 1) + [4096 - (4096 // k) * (k - 1)]), k)
    targets = torch.zeros(k, m, m, dtype=torch.float64, device="cuda")
    order = draw_order(m, torch.Generator()).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = gradvac_step(gram, targets, order, check_inputs=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(res.coefficients).all()


def test_ddp_step_adds_exactly_one_host_synchronisation():
    """The whole DDP step (hook, Gramians, all-reduce, coefficient stage, combine) against the same
    m-pass DDP step: exactly the documented synchronisations more (the finiteness decision, and on
    several ranks the read of the input-check flags before the passes)."""
    world = torch.cuda.device_count()
    for res in run_distributed(ddp_bodies.cuda_sync_count_body, world, backend="nccl", timeout=300):
        assert res["gradvac"] - res["plain"] == (1 if world == 1 else 2), res


def test_ddp_hook_with_nccl_matches_core():
    world = torch.cuda.device_count()
    configs = [{"grouping": g, "strategy": s} for g in ("whole", "module") for s in ("replicated", "sharded")]
    results = run_distributed(ddp_bodies.cuda_equivalence_body, world, configs, backend="nccl", timeout=300)
    for c, cfg in enumerate(configs):
        for r in range(world):
            res = results[r][c]
            assert res["max_rel_err"] < 1e-10, (cfg, res["max_rel_err"])
            assert res["calls"]["gramian_all_reduce"] == 3
            assert torch.equal(res["params"], results[0][c]["params"])


def test_backward_plain_module_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).cuda()
    out = model(torch.randn(64, 8, device="cuda"))
    gradvac_dist.backward(model, [out[:, i].pow(2).mean() for i in range(3)], GradVac(), grouping="module")
    assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters())


def test_grad_scaler_on_cuda_with_fp16_autocast_matches_unscaled():
    """CUDA GradScaler + fp16 autocast: GradVac's result equals the unscaled computation, and a
    step the scaler skips (inf gradients) leaves the GradVac state untouched."""

    def run(use_scaler: bool, poison_step: int | None = None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        agg = GradVac(eps=0.0, on_nonfinite="skip")
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=1000) if use_scaler else None
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            x, y = torch.randn(32, 16, generator=g).cuda(), torch.randn(32, 3, generator=g).cuda()
            y[:, 1] = -y[:, 0]
            with torch.autocast("cuda", dtype=torch.float16):
                out = model(x)
            losses = [((out[:, i].float() - y[:, i]) ** 2).mean() for i in range(3)]
            if step == poison_step:
                losses[2] = losses[2] * float("inf")
            if scaler is not None:
                losses = [scaler.scale(loss) for loss in losses]
            gradvac_dist.backward(model, losses, agg)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()]).cpu(), agg

    plain, agg0 = run(False)
    scaled, agg1 = run(True)
    assert agg0.step == agg1.step == 4
    assert torch.allclose(scaled, plain, rtol=1e-3, atol=1e-5)
    assert torch.allclose(agg1.targets.cpu(), agg0.targets.cpu(), atol=1e-3, rtol=0)
    _, skipped = run(True, poison_step=2)
    assert skipped.step == 3 and skipped.skipped_steps == 1
