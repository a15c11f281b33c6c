"""Smoke test of the benchmark report (``python -m benchmarks report --quick``), < 60 s.

It runs every benchmark at smoke sizes (core in-process, DDP and FSDP on spawned gloo ranks) and
checks that report.md, results.json and every PNG are written and parse; the numbers are not judged.
"""

from __future__ import annotations

import json
import re
import struct

import pytest

from benchmarks.__main__ import main
from tests.settings import needs_fsdp_on_cpu

pytestmark = needs_fsdp_on_cpu

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_quick_writes_markdown_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["report", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()

    text = (out / "report.md").read_text()
    assert text.startswith("# gradvac_dist benchmark report")
    assert f"python -m benchmarks report --quick --out {out}" in text
    for needle in ("Machine: `machine: ", "cores", "torch ", "gloo", "Load average", "oversubscribes"):
        assert needle in text
    for heading in ("## Sweeps over m, n and W", "## Memory per rank", "## FSDP2", "## Core (single process)"):
        assert heading in text
    for label in ("(a) m-pass DDP", "(b) DDP summed loss", "(c) naive all-gather GradVac", "GradVac-DDP sharded"):
        assert label in text
    # every markdown table is well formed: each row has as many cells as its header
    for block in re.split(r"\n\n+", text):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            assert len({line.count("|") for line in rows}) == 1, block

    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(images) == 5
    for name in images:
        path = out / name
        assert str(path) in printed
        width, height = _png_size(path.read_bytes())
        assert width > 500 and height > 300

    data = json.loads((out / "results.json").read_text())
    assert {name for name, _ in data["ddp"]} == {"center", "m", "n", "W"}
    for _, summary in data["ddp"]:
        assert set(summary["median_ms"]) == set("abcdef")
        if summary["world"] > 1:  # the counters agree with the documented formula (docs/usage.md)
            for key, counted in summary["ring_bytes"].items():
                assert counted == pytest.approx(summary["formula_bytes"][key], rel=1e-4)  # (e): shard padding
        assert summary["stash_bytes"]["d"] == 4 * summary["m"] * summary["n"]
    fsdp_center = next(s for name, s in data["fsdp"] if name == "center")
    assert fsdp_center["ratio"] > 0
    assert len(data["core"]) == 4
