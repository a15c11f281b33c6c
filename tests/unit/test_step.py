"""gradvac_step and draw_order against the plain vector form, edge cases and bad input."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradvac_dist._step as step_module
from gradvac_dist import draw_order, gradvac_step
from gradvac_dist._blocks import contiguous_segments, partial_gramians
from gradvac_dist._step import StepWorkspace
from tests.reference import gradvac_reference, pcgrad_reference
from tests.settings import DTYPE, RTOL, randn_


@pytest.fixture(autouse=True, params=["scalar", "vectorised"])
def stage(request, monkeypatch):
    """Every test of the step runs on both implementations: the Python-float loop for small problems
    and the vectorised torch loop (``SCALAR_STAGE_MAX_VISITS`` moved so that one of them always runs)."""
    monkeypatch.setattr(step_module, "SCALAR_STAGE_MAX_VISITS", 10**9 if request.param == "scalar" else -1)
    return request.param


def conflicting_grads(m: int, n: int, seed: int, conflict: float = 0.6) -> torch.Tensor:
    """Task gradients with a shared component and pairwise conflicts (so corrections happen)."""
    g = torch.Generator().manual_seed(seed)
    base = randn_(n, generator=g)
    signs = torch.where(torch.arange(m) % 2 == 0, 1.0, -1.0).to(DTYPE)
    return randn_(m, n, generator=g) + conflict * signs[:, None] * base


def gramians_of(grads: torch.Tensor, block_sizes: list[int]) -> torch.Tensor:
    return partial_gramians(grads, contiguous_segments(block_sizes), len(block_sizes))


def aggregate(grads, block_sizes, coefficients):
    parts, start = [], 0
    for k, size in enumerate(block_sizes):
        parts.append(coefficients[k].to(grads.dtype) @ grads[:, start : start + size])
        start += size
    return torch.cat(parts)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("m", [2, 3, 5, 10, 32])
@pytest.mark.parametrize("beta", [0.5, 0.1, 1.0])
def test_matches_vector_form_over_steps(m, beta):
    block_sizes = [4 * m, 7 * m + 3, 5 * m]
    n = sum(block_sizes)
    gen = torch.Generator().manual_seed(1234 + m)
    targets = torch.zeros(len(block_sizes), m, m, dtype=torch.float64)
    ref_targets = targets.clone()
    corrections = 0
    for step in range(4):
        grads = conflicting_grads(m, n, seed=100 * m + step)
        order = draw_order(m, gen)
        res = gradvac_step(gramians_of(grads, block_sizes), targets, order, beta=beta)
        ref_out, ref_targets = gradvac_reference(grads.double(), block_sizes, ref_targets, order, beta=beta)
        out = aggregate(grads, block_sizes, res.coefficients)
        assert rel_err(out, ref_out) <= RTOL * (10 if m == 32 else 1)
        assert torch.allclose(res.targets, ref_targets, rtol=0, atol=RTOL * 10)
        targets = res.targets
        corrections += int(res.corrected.sum())
    assert corrections > 0, "inputs should create conflicts, else the test proves little"


def test_all_zero_targets_is_pcgrad():
    m, n = 6, 200
    grads = conflicting_grads(m, n, seed=7, conflict=1.5)
    order = draw_order(m, torch.Generator().manual_seed(3))
    res = gradvac_step(gramians_of(grads, [n]), torch.zeros(1, m, m, dtype=torch.float64), order, eps=0.0)
    out = aggregate(grads, [n], res.coefficients)
    assert res.corrected.any()
    assert rel_err(out, pcgrad_reference(grads.double(), order)) <= RTOL


def test_inputs_not_mutated_and_result_fields():
    m, sizes = 4, [10, 20]
    grads = conflicting_grads(m, 30, seed=1)
    G = gramians_of(grads, sizes)
    T = torch.full((2, m, m), 0.3, dtype=torch.float64)
    G0, T0 = G.clone(), T.clone()
    res = gradvac_step(G, T, draw_order(m, torch.Generator().manual_seed(0)))
    assert torch.equal(G, G0) and torch.equal(T, T0)
    assert res.coefficients.shape == (2, m) and res.targets.shape == (2, m, m)
    assert res.cosines.shape == (2, m, m) and res.corrected.dtype == torch.bool
    assert torch.equal(torch.diagonal(res.targets, dim1=1, dim2=2), torch.diagonal(T, dim1=1, dim2=2))
    assert res.coefficients.dtype == torch.float64


def test_workspace_changes_no_result_and_aliases_none(stage):
    """Steps through one StepWorkspace give bit-identical results to fresh arrays whatever its buffers
    held before (other shapes, other values), and a later step never writes into an earlier result."""
    workspace = StepWorkspace()
    gen = torch.Generator().manual_seed(5)
    held = []
    for step, (m, sizes) in enumerate([(5, [12, 30, 9]), (5, [12, 30, 9]), (4, [8, 8]), (5, [12, 30, 9])]):
        grads = conflicting_grads(m, sum(sizes), seed=40 + step)
        T = torch.rand(len(sizes), m, m, generator=gen, dtype=torch.float64) * 1.6 - 0.8
        if step == 1:  # the no-correction cases too: a zero task gradient in a block, a target of exactly 1
            grads[2, : sizes[0]] = 0.0
            T[1, 0, 3] = 1.0
        G = gramians_of(grads, sizes)
        order = draw_order(m, gen)
        fresh = gradvac_step(G, T, order)
        for buf in workspace._buffers.values():  # garbage in every kept buffer: none may be read unwritten
            buf.fill_(True if buf.dtype == torch.bool else math.nan)
        reused = gradvac_step(G, T, order, workspace=workspace)
        assert all(torch.equal(a, b) for a, b in zip(fresh, reused)), step
        assert reused.corrected.any(), "inputs should create corrections, else the test proves little"
        held.append((reused, [t.clone() for t in reused]))
    for result, snapshot in held:
        assert all(torch.equal(a, b) for a, b in zip(result, snapshot))
    if stage == "vectorised":
        buffers = dict(workspace._buffers)
        assert workspace.nbytes == sum(b.numel() * b.element_size() for b in buffers.values()) > 0
        gradvac_step(G, T, order, workspace=workspace)  # same shape as the last step: the same storage
        assert {n: b.data_ptr() for n, b in workspace._buffers.items()} == {n: b.data_ptr() for n, b in buffers.items()}
    else:
        assert workspace.nbytes == 0  # the scalar stage has no arrays to keep
    assert pickle.loads(pickle.dumps(workspace)).nbytes == 0 and copy.deepcopy(workspace).nbytes == 0
    workspace.clear()
    assert workspace.nbytes == 0


def test_single_task_returns_gradient_unchanged():
    G = torch.tensor([[[4.0]]], dtype=DTYPE)
    res = gradvac_step(G, torch.zeros(1, 1, 1), torch.zeros(1, 0, dtype=torch.long))
    assert torch.equal(res.coefficients, torch.ones(1, 1, dtype=torch.float64))


def test_no_host_synchronisation():
    """With checks off, the step runs on the meta device: any .item() or bool() on a value would raise."""
    m, K = 5, 3
    G = torch.empty(K, m, m, device="meta")
    res = gradvac_step(
        G,
        torch.empty(K, m, m, device="meta"),
        torch.empty(m, m - 1, dtype=torch.long, device="meta"),
        check_inputs=False,
    )
    assert res.coefficients.device.type == "meta" and res.coefficients.shape == (K, m)


def test_incremental_work_per_visit():
    """The visit loop must not recompute A @ G (an m x m x m bmm) per visit: count matmuls."""
    m, K = 8, 2
    grads = conflicting_grads(m, 64, seed=5)
    G = gramians_of(grads, [32, 32])
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        gradvac_step(G, torch.zeros(K, m, m, dtype=torch.float64), draw_order(m, torch.Generator()))
    assert counter.get_total_flops() == 0, "the step should use elementwise O(K m^2) updates, not matmuls"


def test_scalar_and_vectorised_stages_agree():
    """The two implementations of the step, on the same inputs, agree to rounding in every output,
    including no-correction cases (zero rows, targets of +-1, eps = 0). Blocks wider than m keep the
    problem well conditioned (a 1-element block amplifies a rounding difference to ~1e-10; the
    degenerate cases run on both stages in TestDegenerate)."""
    gen = torch.Generator().manual_seed(11)
    for m, sizes, eps, fill in [
        (2, [5], 1e-8, 0.0),
        (3, [5, 7, 6], 1e-8, 0.3),
        (5, [9, 9], 0.0, -0.2),
        (7, [10] * 4, 1e-8, 1.0),
    ]:
        grads = conflicting_grads(m, sum(sizes), seed=m, conflict=1.2).double()
        grads[m - 1, : sizes[0]] = 0
        G = gramians_of(grads, sizes)
        T = torch.full((len(sizes), m, m), fill, dtype=torch.float64)
        T[0, 0, 1] = -1.0
        order = draw_order(m, gen)
        step_module.SCALAR_STAGE_MAX_VISITS = 10**9
        a = gradvac_step(G, T, order, beta=0.3, eps=eps)
        step_module.SCALAR_STAGE_MAX_VISITS = -1
        b = gradvac_step(G, T, order, beta=0.3, eps=eps)
        assert torch.allclose(a.coefficients, b.coefficients, rtol=1e-12, atol=1e-12)
        assert torch.allclose(a.targets, b.targets, rtol=0, atol=1e-12)
        assert torch.allclose(a.cosines, b.cosines, rtol=0, atol=1e-12)
        assert torch.equal(a.corrected, b.corrected)
        assert a.coefficients.dtype == b.coefficients.dtype and a.targets.shape == b.targets.shape


class TestDrawOrder:
    def test_rows_are_permutations_of_the_others(self):
        for m in (1, 2, 3, 7):
            order = draw_order(m, torch.Generator().manual_seed(m))
            assert order.shape == (m, m - 1) and order.dtype == torch.long
            for i in range(m):
                assert sorted(order[i].tolist()) == [j for j in range(m) if j != i]

    def test_documented_recipe_and_reproducibility(self):
        m = 6
        g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        order = draw_order(m, g1)
        keys = torch.rand((m, m - 1), generator=g2, dtype=torch.float64)
        perm = keys.argsort(dim=1, stable=True)
        expected = perm + (perm >= torch.arange(m)[:, None]).long()
        assert torch.equal(order, expected)
        assert torch.equal(g1.get_state(), g2.get_state())

    @pytest.mark.parametrize("m", [1, 2, 3, 5, 9])
    def test_scalar_stage_draw_is_draw_order(self, m):
        """The scalar stage draws its orders as lists (Python's stable sort): the same orders as
        draw_order's stable argsort, and the generator left in the same state, draw after draw."""
        g1, g2 = torch.Generator().manual_seed(m), torch.Generator().manual_seed(m)
        for _ in range(50):
            assert step_module._draw_visits(m, g1) == draw_order(m, g2).tolist()
            assert torch.equal(g1.get_state(), g2.get_state())

    def test_step_with_drawn_order_is_gradvac_step(self, stage):
        """What a trajectory runs (order drawn in the stage's form) equals gradvac_step on draw_order."""
        m, sizes = 4, [3, 5]
        g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        t1 = t2 = torch.zeros(len(sizes), m, m, dtype=torch.float64)
        for step in range(5):
            grads = torch.randn(m, sum(sizes), dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            G = partial_gramians(grads, contiguous_segments(sizes), len(sizes))
            mine = step_module.step_with_drawn_order(G, t1, g1, beta=0.3, eps=1e-8, check_inputs=False, workspace=None)
            ref = gradvac_step(G, t2, draw_order(m, g2), beta=0.3, eps=1e-8)
            for a, b in zip(mine, ref):
                assert torch.equal(a, b)
            t1, t2 = mine.targets, ref.targets

    def test_orders_vary_between_draws(self):
        g = torch.Generator().manual_seed(0)
        draws = {tuple(draw_order(5, g).flatten().tolist()) for _ in range(10)}
        assert len(draws) > 1

    @pytest.mark.parametrize("m", [0, -1, 2.0, True])
    def test_bad_m(self, m):
        with pytest.raises(ValueError, match="m must be an int >= 1"):
            draw_order(m, torch.Generator())

    def test_bad_generator(self):
        with pytest.raises(ValueError, match="CPU torch.Generator"):
            draw_order(3, None)


class TestBadInput:
    m = 3

    def good(self):
        G = gramians_of(conflicting_grads(self.m, 12, seed=0), [12])
        return G, torch.zeros(1, self.m, self.m, dtype=torch.float64), draw_order(self.m, torch.Generator())

    def test_gramians_shape(self):
        G, T, o = self.good()
        for bad in (G[0], G[:, :, :2], torch.zeros(1, 0, 0)):
            with pytest.raises(ValueError, match="gramians"):
                gradvac_step(bad, T, o)

    def test_asymmetric(self):
        G, T, o = self.good()
        G[0, 0, 1] += 1.0
        with pytest.raises(ValueError, match="symmetric"):
            gradvac_step(G, T, o)

    def test_non_finite(self):
        G, T, o = self.good()
        G[0, 1, 1] = math.inf
        with pytest.raises(ValueError, match="inf or NaN"):
            gradvac_step(G, T, o)
        G, T, o = self.good()
        T[0, 0, 1] = math.nan
        with pytest.raises(ValueError, match="targets contain inf or NaN"):
            gradvac_step(G, T, o)

    def test_targets_shape(self):
        G, T, o = self.good()
        with pytest.raises(ValueError, match="targets must have the shape"):
            gradvac_step(G, T[:, :2], o)

    def test_order(self):
        G, T, o = self.good()
        with pytest.raises(ValueError, match="LongTensor of shape"):
            gradvac_step(G, T, o.float())
        with pytest.raises(ValueError, match="LongTensor of shape"):
            gradvac_step(G, T, o[:, :1])
        bad = o.clone()
        bad[0] = torch.tensor([0, 1])  # row 0 contains task 0 itself
        with pytest.raises(ValueError, match="permutation of the tasks other than i"):
            gradvac_step(G, T, bad)
        bad = o.clone()
        bad[1] = torch.tensor([0, 0])
        with pytest.raises(ValueError, match="permutation"):
            gradvac_step(G, T, bad)

    @pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan, "0.5"])
    def test_beta(self, beta):
        with pytest.raises(ValueError, match="beta must be a number in"):
            gradvac_step(*self.good(), beta=beta)

    @pytest.mark.parametrize("eps", [-1e-8, math.nan])
    def test_eps(self, eps):
        with pytest.raises(ValueError, match="eps must be a number >= 0"):
            gradvac_step(*self.good(), eps=eps)


def _check_safe(grads: torch.Tensor, block_sizes: list[int], steps: int = 3, beta: float = 0.5) -> None:
    m = grads.shape[0]
    gen = torch.Generator().manual_seed(0)
    targets = torch.zeros(len(block_sizes), m, m, dtype=torch.float64)
    for _ in range(steps):
        G = gramians_of(grads, block_sizes)
        res = gradvac_step(G, targets, draw_order(m, gen), beta=beta)
        out = aggregate(grads, block_sizes, res.coefficients)
        assert torch.isfinite(res.coefficients).all() and torch.isfinite(out).all()
        assert (res.targets.abs() <= 1).all()
        assert (res.cosines.abs() <= 1).all()
        targets = res.targets


class TestDegenerate:
    def test_blocks_smaller_than_task_count(self):
        m = 10
        grads = conflicting_grads(m, 3 + 1 + 1 + 40, seed=2, conflict=2.0)
        _check_safe(grads, [3, 1, 1, 40], steps=6)

    def test_cancelling_block_is_finite(self):
        """A 1-element block where tasks cancel exactly: p_i cancels to ~0, the trap in the notes."""
        m = 6
        grads = torch.zeros(m, 2, dtype=DTYPE)
        grads[:, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=DTYPE) * 3.3
        grads[:, 1] = torch.arange(m, dtype=DTYPE) - 2.5
        _check_safe(grads, [1, 1], steps=8, beta=1.0)

    def test_zero_task_rows(self):
        m = 4
        grads = conflicting_grads(m, 50, seed=3)
        grads[1] = 0
        grads[3, :25] = 0
        gen = torch.Generator().manual_seed(0)
        T = torch.full((2, m, m), 0.5, dtype=torch.float64)
        res = gradvac_step(gramians_of(grads, [25, 25]), T, draw_order(m, gen))
        assert not res.corrected[:, :, 1].any(), "a zero gradient must never be added"
        assert not res.corrected[0, :, 3].any()
        assert torch.isfinite(res.coefficients).all()
        # the target update follows the formula with phi = 0
        assert torch.allclose(res.targets[:, 0, 1], torch.full((2,), 0.25, dtype=torch.float64))

    def test_rank_one_jacobian(self):
        v = randn_(64, generator=torch.Generator().manual_seed(4))
        grads = torch.stack([v, -2 * v, 0.5 * v, -v])
        _check_safe(grads, [64], steps=5)
        _check_safe(grads, [32, 31, 1], steps=5)

    @pytest.mark.parametrize("scale", [1e-20, 1e-10, 1.0, 1e10, 1e15, 1e20])
    def test_scales(self, scale):
        grads = conflicting_grads(5, 40, seed=9) * scale
        if DTYPE == torch.float32 and scale > 1e15:
            # Products of float32 entries above ~1e19 leave float32's range: refused loudly, never silently.
            G = gramians_of(grads, [20, 19, 1])
            with pytest.raises(ValueError, match="inf or NaN"):
                gradvac_step(G, torch.zeros(3, 5, 5, dtype=torch.float64), draw_order(5, torch.Generator()))
            return
        _check_safe(grads, [20, 19, 1], steps=4)

    def test_target_of_exactly_one_makes_no_correction(self):
        """beta=1 and parallel gradients put targets at exactly +-1; rounding then puts phi a hair below
        t, and the formula's w would divide by eps alone (|p|/eps): no correction there, outputs finite.
        (Found by the property test below in float32: coefficients of 3.6e40 at the second step.)"""
        g = torch.Generator().manual_seed(0)
        low = randn_(5, 1, generator=g) @ randn_(1, 2, generator=g)
        _check_safe(low * 1e9, [2], steps=3, beta=1.0)
        G = torch.tensor([[[4.0, 2.0 - 1e-9], [2.0 - 1e-9, 1.0]]], dtype=torch.float64)  # phi just below 1
        res = gradvac_step(G, torch.ones(1, 2, 2, dtype=torch.float64), draw_order(2, torch.Generator()))
        assert not res.corrected.any() and torch.equal(res.coefficients, torch.ones(1, 2, dtype=torch.float64))

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(
        m=st.integers(2, 7),
        sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
        log_scale=st.floats(-20, 15),
        rank=st.integers(1, 3),
        seed=st.integers(0, 2**16),
        beta=st.floats(0.0, 1.0),
    )
    def test_property_finite_and_bounded(self, m, sizes, log_scale, rank, seed, beta):
        g = torch.Generator().manual_seed(seed)
        n = sum(sizes)
        low = randn_(m, rank, generator=g) @ randn_(rank, n, generator=g)
        _check_safe(low * 10.0**log_scale, sizes, steps=3, beta=beta)


@pytest.mark.parametrize("layout", ["packed", "blocks_last_view", "transposed_view"])
def test_blocks_last_copy_is_the_permutation_whatever_the_input_layout(layout):
    num_blocks, m = 5, 4
    packed = randn_(num_blocks, m, m)
    x = {
        "packed": packed,
        "blocks_last_view": packed.permute(1, 2, 0).contiguous().permute(2, 0, 1),  # what a step returns
        "transposed_view": packed.transpose(1, 2).contiguous().transpose(1, 2),  # neither of the above
    }[layout]
    assert torch.equal(x, packed)
    out = torch.full((m, m, num_blocks), float("nan"), dtype=packed.dtype)
    assert step_module._blocks_last(x, out) is out
    assert torch.equal(out, packed.permute(1, 2, 0))
