"""Smoke test of the FSDP2 benchmark (``python -m benchmarks fsdp --quick``): it runs, prints
every variant, and its counts show what the design promises (not a timed test)."""

from __future__ import annotations

import re

from benchmarks.fsdp import LABELS, main
from tests.settings import needs_fsdp_on_cpu

pytestmark = needs_fsdp_on_cpu


def test_quick_run_prints_ratios_counts_and_memory(capsys):
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for key, label in LABELS.items():
        line = next(line for line in out.splitlines() if line.startswith(label))
        rows[key] = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", line[len(label) :])]
    # columns: median, min, max, ratio vs (a), all-gathers, reduce-scatters, all-reduces
    assert all(row[0] > 0 for row in rows.values())
    assert rows["d"][4] == rows["a"][4] == rows["c"][4]  # GradVac all-gathers what one plain step does
    assert rows["b"][4] > rows["a"][4]  # FSDP's per-pass defaults re-all-gather
    assert rows["d"][5] == rows["a"][5] == 3 * rows["c"][5]  # one reduce-scatter per task pass
    # the one Gramian all-reduce, and the input-check flags before the passes (a later step's)
    assert rows["d"][6] == 2 and rows["a"][6] == 0
    assert re.search(r"time goal: GradVac-FSDP / m-pass FSDP = [0-9.]+x \(goal <= 1.05x\)", out)
    assert "all ranks: stash" in out and "= 1.000 x m*n" in out
