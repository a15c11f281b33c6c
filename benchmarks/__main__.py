"""Command line of the benchmarks.

    python -m benchmarks core [--quick] [--threads N] [--markdown PATH]
    python -m benchmarks ddp  [--quick] [--markdown PATH] ...   (2 gloo ranks)
    python -m benchmarks fsdp [--quick] ...                      (2 gloo ranks)
    python -m benchmarks report [--quick] [--out DIR]            (all of them + sweeps)
    python -m benchmarks scale                                   (bytes per step at W = 8..1024, on paper)
    python -m benchmarks gpu-check [--device cpu] [--out FILE]   (tests/gpu and the benchmarks on NCCL: one table)

Each prints medians side by side from one run, their ratios, and PASS/FAIL against its goals;
``report`` runs every benchmark and sweeps over m, n and W, and writes DIR/report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import core


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches ``argv`` (default: the process arguments) to a benchmark; returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("ddp", "fsdp"):
        from . import ddp, fsdp

        return {"ddp": ddp.main, "fsdp": fsdp.main}[args[0]](args[1:])
    if args and args[0] == "gpu-check":
        from . import gpu_check

        return gpu_check.main(args[1:])
    if args and args[0] == "scale":
        from . import scale

        return scale.main(args[1:])
    if args and args[0] == "report":
        from . import report

        return report.main(args[1:])
    return _core_main(args)


def _core_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, help="core, ddp, fsdp or report")
    core_parser = sub.add_parser("core", help="single-process GradVac vs plain loop, summation and TorchJD")
    core_parser.add_argument("--quick", action="store_true", help="small sizes (a few seconds), for smoke tests")
    core_parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the report as markdown")
    core_parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch intra-op threads (default: torch's); 1 resists other processes' load on a shared machine",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    report = core.run(quick=args.quick, progress=_progress)
    print(report.to_text(), flush=True)
    if args.markdown is not None:
        args.markdown.write_text(report.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
