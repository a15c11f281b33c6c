"""Smoke test of the benchmarks (``python -m benchmarks core --quick``) and their baseline."""

from __future__ import annotations

import torch

from benchmarks.__main__ import main
from benchmarks._timing import Table
from benchmarks.core import QUICK_CASES, PlainLoopGradVac
from gradvac_dist import draw_order
from tests.reference import gradvac_reference


def test_core_quick_prints_the_table_and_writes_markdown(capsys, tmp_path):
    markdown = tmp_path / "core.md"
    assert main(["core", "--quick", "--markdown", str(markdown)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    assert "torch " + torch.__version__ in out
    for header in ("GradVac core: median ms", "Gramians", "step", "combine", "vs loop", "GV/sum", "TorchJD", "Goals"):
        assert header in out
    for case in QUICK_CASES:
        assert case.label in out
    assert out.count("PASS") + out.count("FAIL") == sum(len(case.goals) for case in QUICK_CASES)
    text = markdown.read_text()
    assert "| case | GradVac |" in text
    assert all(case.label in text for case in QUICK_CASES)


def test_plain_loop_baseline_is_gradvac():
    """The loop the benchmark times computes GradVac (the design notes' vector form), step after step."""
    m, sizes, seed = 4, [5, 3, 7], 3
    gen = torch.Generator().manual_seed(0)
    loop = PlainLoopGradVac(m, sizes, seed=seed)
    orders = torch.Generator().manual_seed(seed)
    targets = torch.zeros(len(sizes), m, m, dtype=torch.float64)
    for _ in range(3):
        jac = torch.randn(m, sum(sizes), generator=gen) + torch.randn(sum(sizes), generator=gen)
        expected, targets = gradvac_reference(jac.double(), sizes, targets, draw_order(m, orders))
        torch.testing.assert_close(loop(jac).double(), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loop.targets.permute(2, 0, 1).double(), targets, rtol=1e-4, atol=1e-5)


def test_table_renders_text_and_markdown():
    table = Table("T", ["case", "ms"], notes=["a note"])
    table.add_row(["a", "1.00"])
    table.add_row(["longer", "10.0"])
    assert table.to_text().splitlines() == [
        "T",
        "case      ms",
        "------  ----",
        "a       1.00",
        "longer  10.0",
        "  a note",
    ]
    assert "| a | 1.00 |" in table.to_markdown()


def test_dispatch_reaches_the_distributed_benchmarks(capsys):
    import pytest

    for name in ("ddp", "fsdp"):
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert f"python -m benchmarks {name}" in capsys.readouterr().out
