"""Command line of the benchmarks: ``python -m gradvac_dist.bench core [--quick] [--threads N] [--markdown PATH]``."""

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
    """Parses ``argv`` (default: the process arguments), runs the benchmark, prints its report.

    Returns the exit status (0).
    """
    parser = argparse.ArgumentParser(prog="python -m gradvac_dist.bench", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True)
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
