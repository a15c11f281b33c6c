"""StepDiagnostics against the plainest reading of a GradVacStepResult (Python loops over the visits)."""

from __future__ import annotations

import math

import pytest
import torch

from gradvac_dist import GradVac, GradVacState, StepDiagnostics
from tests.settings import randn_


def _plain(result, k):
    m = result.cosines.shape[-1]
    visits = [(i, j) for i in range(m) for j in range(m) if i != j]
    cos = [float(result.cosines[k, i, j]) for i, j in visits]
    corr = [bool(result.corrected[k, i, j]) for i, j in visits]
    tgt = [float(result.targets[k, i, j]) for i, j in visits]
    return {
        "mean_cosine": sum(cos) / len(cos),
        "corrected_fraction": sum(corr) / len(corr),
        "target_min": min(tgt),
        "target_max": max(tgt),
    }


def _blocky_step(m=4, sizes=(3, 5, 2), steps=3):
    agg = GradVac(beta=0.3, seed=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        jac = randn_(m, sum(sizes), generator=g)
        jac[1] = -jac[0] + 0.2 * jac[1]
        agg(jac, block_sizes=list(sizes))
    return agg


def test_per_block_and_summary_match_the_visits():
    agg = _blocky_step()
    d = agg.diagnostics
    assert isinstance(d, StepDiagnostics) and d.step == 3 and d.num_blocks == 3 and d.num_tasks == 4
    per_block = d.per_block()
    assert list(per_block) == ["0", "1", "2"]
    for k, block in enumerate(per_block):
        expected = _plain(agg.last_result, k)
        for name, value in expected.items():
            assert type(per_block[block][name]) is float
            assert per_block[block][name] == pytest.approx(value, rel=1e-6, abs=1e-6)
    summary = d.summary()
    assert all(type(v) is float for v in summary.values())
    rows = [_plain(agg.last_result, k) for k in range(3)]
    assert summary["step"] == 3.0
    assert summary["mean_cosine"] == pytest.approx(sum(r["mean_cosine"] for r in rows) / 3, rel=1e-6, abs=1e-6)
    assert summary["corrected_fraction"] == pytest.approx(sum(r["corrected_fraction"] for r in rows) / 3)
    assert summary["target_min"] == pytest.approx(min(r["target_min"] for r in rows), rel=1e-6, abs=1e-6)
    assert summary["target_max"] == pytest.approx(max(r["target_max"] for r in rows), rel=1e-6, abs=1e-6)
    assert 0 < summary["corrected_fraction"] <= 1  # the conflicting pair was corrected


def test_building_and_tensor_views_read_no_data():
    """On meta tensors (no data at all) the view and its tensor properties work: nothing is read."""
    agg = _blocky_step()
    r = agg.last_result
    meta = type(r)(*(t.to("meta") for t in r))
    d = StepDiagnostics(meta, step=3)
    for name in ("mean_cosine", "corrected_fraction", "target_min", "target_max"):
        t = getattr(d, name)
        assert t.device.type == "meta" and t.shape == (3,) and t.dtype == torch.float64
    with pytest.raises(NotImplementedError):  # only the float readers touch data
        d.summary()


def test_read_only_and_none_before_a_step():
    agg = GradVac()
    assert agg.diagnostics is None
    assert GradVacState(num_tasks=2).diagnostics is None
    d = _blocky_step().diagnostics
    with pytest.raises(AttributeError, match="read-only"):
        d.step = 7
    with pytest.raises(ValueError, match="2 names for 3 blocks"):
        StepDiagnostics(_blocky_step().last_result, 1, ("a", "b"))


def test_one_task_has_no_visits():
    agg = GradVac()
    agg(randn_(1, 4))
    s = agg.diagnostics.summary()
    assert math.isnan(s["mean_cosine"]) and math.isnan(s["target_min"]) and s["corrected_fraction"] == 0.0
