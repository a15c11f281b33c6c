"""Smoke test of the DDP benchmark (``python -m benchmarks ddp --quick``), < 30 s."""

from __future__ import annotations

import re

from benchmarks.ddp import LABELS, formula_bytes, main, ring_bytes

PROFILE = re.compile(
    r"profile rank 0, (\(.\)) .*: total ([0-9.]+); hook ([0-9.]+) = per-pass work ([0-9.-]+) \+ step ([0-9.]+) "
    r"\(waits on task reductions ([0-9.-]+), Gramians ([0-9.]+), Gramian all-reduce ([0-9.]+), "
    r"coefficients ([0-9.]+), combine[ +a-z-]* ([0-9.]+)\)"
)


def test_quick_run_prints_the_table_and_writes_markdown(tmp_path, capsys):
    markdown = tmp_path / "ddp.md"
    assert main(["--quick", "--profile", "--markdown", str(markdown)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    for label in LABELS.values():
        assert label in out
    assert len(re.findall(r"^  (PASS|FAIL): \(", out, re.M)) == 2  # replicated and sharded vs (a)
    # GradVac-DDP computed what the naive all_gather GradVac computed, with corrections applied.
    checks = re.findall(r"max rel diff ([0-9.e+-]+), (\d+) GradVac corrections", out)
    assert len(checks) == 2
    for diff, corrections in checks:
        assert float(diff) < 1e-3 and int(corrections) > 0
    assert "gramian_all_reduce 1, input_all_reduce 1, task_all_reduce 3" in out
    # the result is combined and all-gathered in pieces, and on gloo each task's reduce-scatter goes in the
    # same pieces (at most 4 per bucket: gradvac_dist._ddp.PIPELINE_PIECE)
    pieces = re.search(
        r"gramian_all_reduce 1, input_all_reduce 1, result_all_gather ([1-4]), task_reduce_scatter (\d+)", out
    )
    assert pieces and int(pieces.group(2)) == 3 * int(pieces.group(1)), out
    assert "DDP buckets: 1 (bucket_cap_mb=25)" in out
    # The library's phase clocks (counters.timing): every phase ran, and the nested ones fit in their parent.
    profiles = PROFILE.findall(out)
    assert [p[0] for p in profiles] == ["(d)", "(e)", "(f)"], out
    for _, *numbers in profiles:
        total, hook, per_pass, step, waits, *inner = map(float, numbers)
        assert total >= hook >= step > 0 and all(t > 0 for t in inner)
        assert per_pass >= -0.01 and waits >= -0.01  # printed to 0.01 ms: a parent minus its parts

    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| (")]
    assert len(rows) == 6
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        median, counted, formula, lo, written = float(cells[1]), cells[6], cells[7], cells[8], cells[9]
        assert cells[5].endswith("x")  # vs (b), plain DDP on the summed loss
        assert median > 0
        assert counted == formula, row  # every collective is accounted for by the documented formula (docs/usage.md)
        assert lo == "-" or float(lo) > 0  # lo counts the whole machine's loopback traffic: no exact check
        # What each rank's process wrote to its sockets matches the ring formula, (e) included: its
        # reduce-scatter is an all_to_all_single on gloo (gloo's own reduce-scatter: 1.75x the formula here, m=3).
        if written != "-":
            assert abs(float(written) - float(formula)) <= 0.05 * float(formula), row


def test_per_task_data_run_checks_exactness_and_its_own_goal(capsys):
    assert main(["--quick", "--per-task", "--batch", "24", "--variants", "abce"]) == 0
    out = capsys.readouterr().out
    assert "batch 24/rank (per-task data: 1/m of it per task)" in out
    assert re.search(r"^  (PASS|FAIL): \(e\) .* goal <= 1.1x at W=2 with per-task data$", out, re.M), out
    checks = re.findall(r"max rel diff ([0-9.e+-]+), (\d+) GradVac corrections", out)
    assert len(checks) == 1 and float(checks[0][0]) < 1e-3 and int(checks[0][1]) > 0


def test_ring_bytes_and_formulas_agree():
    n, w = 1000, 4
    assert ring_bytes({"task_all_reduce": 3 * 4 * n}, w) == formula_bytes("a", n, w)
    sharded = {
        "task_reduce_scatter": 3 * 4 * n,
        "result_all_gather": 4 * n,
        "gramian_all_reduce": (9 + 3 + 4) * 8,
        "input_all_reduce": w * 8,
    }
    assert ring_bytes(sharded, w) == formula_bytes("e", n, w)
    weighted = {**sharded, "weights_all_reduce": (3 + w) * 8}  # the first rank's K m weights and W flags
    assert ring_bytes(weighted, w) == formula_bytes("f", n, w)
    assert ring_bytes({"naive_all_gather": w * 3 * 4 * n}, w) == formula_bytes("c", n, w)


def test_goal_cases_print_one_row_each_with_a_verdict(tmp_path, capsys):
    markdown = tmp_path / "goals.md"
    assert main(["--goals", "--quick", "--markdown", str(markdown)]) == 0  # no --strict: a missed goal is printed
    out = capsys.readouterr().out
    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| n=")]
    assert [r.split("|")[1].strip() for r in rows] == [
        f"n={n}, batch {b}, W={w}"
        for n, b, w in [("2.40M", 32, 2), ("2.40M", 64, 2), ("0.11M", 32, 2), ("2.40M", 32, 1), ("0.11M", 32, 1)]
    ]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # the cells are rounded (ms to 0.1, ratios to 0.01): compare within what rounding allows
        a, e, ratio, paired = float(cells[2]), float(cells[3]), float(cells[4].rstrip("x")), float(cells[5].rstrip("x"))
        assert a > 0.05 and e > 0
        assert (e - 0.05) / (a + 0.05) - 0.005 <= ratio <= (e + 0.05) / (a - 0.05) + 0.005, row
        target = 1.15 if cells[0].endswith("W=1") else 1.05
        assert cells[6] == f"<= {target}x"
        # PASS needs both ratios within the goal; at the boundary either verdict is consistent with the rounding
        if max(ratio, paired) > target + 0.005:
            assert cells[7] == "FAIL", row
        elif max(ratio, paired) < target - 0.005:
            assert cells[7] == "PASS", row
        phases = cells[9].split(" / ")
        assert len(phases) == 4 and (phases[1] == "-") == cells[0].endswith("W=1")
    assert "Step-time goal: GradVac-DDP sharded (e)" in out
