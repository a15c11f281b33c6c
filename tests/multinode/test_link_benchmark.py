"""``python -m benchmarks ddp --link RATE``: the DDP benchmark's 2 ranks in two network namespaces over a
tbf-limited veth pair (launch/two_nodes.sh). Checks the run is exact (GradVac-DDP against the naive
GradVac), counts the bytes the formula says, and reports the link's goals; the times themselves are
the benchmark's to print, not a test's to judge."""

from __future__ import annotations

import re
import shutil

import pytest

from benchmarks.ddp import main, rate_bits
from tests.multinode.test_two_nodes import _why_not


@pytest.fixture(scope="module", autouse=True)
def _namespaces_and_tc():
    why = _why_not() or (None if shutil.which("tc") else "the link benchmark needs iproute2's `tc`")
    if why is not None:
        pytest.skip(why)


def test_link_benchmark_is_exact_and_counts_the_formula_bytes(tmp_path, capsys):
    markdown = tmp_path / "link.md"
    assert main(
        ["--quick", "--size", "0.1M", "--link", "200mbit", "--variants", "abce", "--markdown", str(markdown)]
    ) in (0, 1)
    out = capsys.readouterr().out
    assert "2 gloo ranks in 2 network namespaces, a 200mbit link between them" in out
    checks = re.findall(r"max rel diff ([0-9.e+-]+), (\d+) GradVac corrections", out)
    assert len(checks) == 1 and float(checks[0][0]) < 1e-3 and int(checks[0][1]) > 0
    assert re.search(r"^  (PASS|FAIL): on the 200mbit link, \(e\) .* goal <= 0.75x$", out, re.M), out
    assert re.search(r"^  (PASS|FAIL): the wire floor of \(e\), its formula bytes at 200mbit: ", out, re.M), out
    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| (")]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        counted, formula, link, written = cells[6], cells[7], cells[8], cells[9]
        assert counted == formula, row
        # rank 0's end of the link: the payload and the TCP/IP headers and acknowledgements
        assert float(formula) <= float(link) <= 1.10 * float(formula), row
        assert abs(float(written) - float(formula)) <= 0.05 * float(formula), row


def test_rates_read_as_tc_writes_them():
    assert rate_bits("1gbit") == 1e9 and rate_bits("200mbit") == 2e8 and rate_bits("512kbit") == 512e3
    with pytest.raises(ValueError, match="as tc writes it"):
        rate_bits("fast")
