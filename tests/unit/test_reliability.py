"""Single-process reliability: non-finite gradients, GradScaler, half precision, checkpoint files."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import gradvac_dist
from gradvac_dist import GradVac, GradVacState, NonFiniteGradientError
from gradvac_dist._checkpoint import load_checkpoint, save_checkpoint
from tests.settings import DTYPE, randn_


def jac(m=3, n=40, seed=0):
    return randn_(m, n, generator=torch.Generator().manual_seed(seed))


class TestNonFinite:
    def test_raise_names_task_and_block_and_leaves_state(self):
        agg = GradVac()
        agg(jac(seed=1), [20, 20])
        before = agg.state_dict()
        bad = jac(seed=2)
        bad[2, 25] = math.nan
        with pytest.raises(NonFiniteGradientError, match="task 2's gradient is not finite") as info:
            agg(bad, [20, 20])
        assert info.value.task == 2 and "block 1" in str(info.value)
        after = agg.state_dict()
        assert after["step"] == before["step"] == 1 and torch.equal(after["targets"], before["targets"])
        assert torch.equal(after["generator_state"], before["generator_state"])

    def test_skip_returns_nonfinite_sum_and_leaves_state(self):
        agg = GradVac(on_nonfinite="skip")
        agg(jac(seed=1))
        targets = agg.targets.clone()
        bad = jac(seed=2)
        bad[0, 3] = math.inf
        out = agg(bad)
        assert not torch.isfinite(out).all(), "a GradScaler must see the inf to skip the step"
        assert agg.step == 1 and agg.skipped_steps == 1 and torch.equal(agg.targets, targets)
        agg(jac(seed=3))
        assert agg.step == 2

    def test_backward_names_the_parameter(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)
        out = model(randn_(8, 4))
        losses = [out[:, 0].mean(), out[:, 1].mean() * math.inf]
        with pytest.raises(NonFiniteGradientError, match="task 1's gradient is not finite") as info:
            gradvac_dist.backward(model, losses, GradVac(), grouping="parameter")
        assert info.value.where in {n for n, _ in model.named_parameters()}

    def test_backward_nonfinite_outside_shared_params(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)
        agg = GradVac(on_nonfinite="skip")
        out = model(randn_(8, 4))
        head_bias = model[2].bias
        losses = [out[:, 0].mean() + head_bias.sum() * math.inf, out[:, 1].mean()]
        gradvac_dist.backward(model, losses, agg, shared_params=list(model[0].parameters()))
        assert agg.skipped_steps == 1 and agg.step == 0
        assert not torch.isfinite(head_bias.grad).all()

    def test_bad_option(self):
        with pytest.raises(ValueError, match="on_nonfinite must be one of"):
            GradVac(on_nonfinite="ignore")
        with pytest.raises(ValueError, match="on_nonfinite must be one of"):
            GradVacState(num_tasks=2, on_nonfinite=None)


def test_grad_scaler_on_cpu_matches_unscaled():
    def run(use_scaler):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(DTYPE)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        agg = GradVac(eps=0.0, on_nonfinite="skip")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if use_scaler else None
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(16, 6, generator=g, dtype=DTYPE), torch.randn(16, 3, generator=g, dtype=DTYPE)
            y[:, 1] = -y[:, 0]
            out = model(x)
            losses = [((out[:, i] - y[:, i]) ** 2).mean() for i in range(3)]
            if scaler:
                losses = [scaler.scale(loss) for loss in losses]
            gradvac_dist.backward(model, losses, agg)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), agg.targets

    (p0, t0), (p1, t1) = run(False), run(True)
    tol = 1e-10 if DTYPE == torch.float64 else 1e-4
    assert torch.allclose(p1, p0, rtol=tol, atol=tol) and torch.allclose(t1, t0, atol=tol, rtol=0)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_gradients(half):
    full = jac(m=4, n=300, seed=5).float()
    expected = GradVac()(full, [100, 200])
    got = GradVac()(full.to(half), [100, 200])
    assert got.dtype == half and torch.isfinite(got).all()
    assert (got.float() - expected).norm() / expected.norm() < 2e-2


class TestCheckpointFiles:
    def state_after_steps(self, steps=2, **kwargs):
        agg = GradVac(**kwargs)
        for s in range(steps):
            agg(jac(seed=s), [10, 30])
        return agg

    def test_round_trip_and_resume(self, tmp_path):
        agg = self.state_after_steps()
        path = tmp_path / "ckpt" / "gradvac.pt"
        save_checkpoint({"gradvac": agg.state_dict()}, path)
        resumed = GradVac()
        resumed.load_state_dict(load_checkpoint(path)["gradvac"])
        assert torch.equal(resumed(jac(seed=9), [10, 30]), agg(jac(seed=9), [10, 30]))
        assert [p.name for p in path.parent.iterdir()] == ["gradvac.pt"], "no temporary file left behind"

    def test_truncated_and_corrupt_files_are_refused(self, tmp_path):
        path = tmp_path / "c.pt"
        save_checkpoint({"gradvac": self.state_after_steps().state_dict()}, path)
        data = path.read_bytes()
        (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
        (tmp_path / "noise.pt").write_bytes(b"\x00\x13garbage" * 50)
        for name in ("trunc.pt", "noise.pt"):
            with pytest.raises(ValueError, match="truncated, corrupt"):
                load_checkpoint(tmp_path / name)
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            load_checkpoint(tmp_path / "missing.pt")

    def test_code_in_a_checkpoint_is_never_executed(self, tmp_path):
        path = tmp_path / "evil.pt"
        torch.save({"gradvac": os.system}, path)  # a pickle that would call a function if trusted
        with pytest.raises(ValueError, match="weights_only=True"):
            load_checkpoint(path)

    def test_failed_write_keeps_the_previous_file(self, tmp_path, monkeypatch):
        path = tmp_path / "c.pt"
        save_checkpoint({"step": 1}, path)

        def broken_save(obj, f):
            f.write(b"partial")
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint({"step": 2}, path)
        monkeypatch.undo()
        assert load_checkpoint(path) == {"step": 1}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]

    def test_checkpoint_of_another_configuration_is_refused(self):
        src = self.state_after_steps().state_dict()
        other_m = GradVac()
        other_m(jac(m=4), [10, 30])
        with pytest.raises(ValueError, match="checkpoint is for 3 tasks"):
            other_m.load_state_dict(src)
        other_blocks = GradVacState(num_tasks=3, grouping="parameter")
        with pytest.raises(ValueError, match="grouping 'whole' differs"):
            other_blocks.load_state_dict(dict(src, grouping="whole"))
        # a model with other blocks: loads (blocks are unknown before the first step), then refuses to step
        agg = GradVac()
        agg.load_state_dict(src)
        with pytest.raises(ValueError, match="blocks changed between steps"):
            agg(jac(), [20, 20])
        with pytest.raises(ValueError, match="save_checkpoint expects a dict"):
            save_checkpoint([1, 2], "x.pt")


def test_fingerprint_depends_on_the_targets_values_not_their_layout():
    """Ranks compare trajectories by fingerprint: a rank holding its targets in the stage's
    blocks-last layout and one holding a packed copy (a checkpoint just loaded) must agree."""
    from gradvac_dist._agreement import CHANNELS, write_fingerprint

    def fingerprint(targets):
        out = torch.zeros(2 * CHANNELS, dtype=torch.float64)
        write_fingerprint(out, targets, torch.Generator().manual_seed(3), 7, 24)
        return out

    packed = torch.rand(5, 4, 4, dtype=torch.float64) * 2 - 1
    blocks_last = packed.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # same values, other strides
    assert not blocks_last.is_contiguous()
    assert torch.equal(fingerprint(packed), fingerprint(blocks_last))
    changed = packed.clone()
    changed[4, 1, 2] = torch.nextafter(changed[4, 1, 2], torch.tensor(2.0, dtype=torch.float64))
    assert not torch.equal(fingerprint(packed), fingerprint(changed))
