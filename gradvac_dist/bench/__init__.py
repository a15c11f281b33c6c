"""Benchmarks of gradvac_dist, run as ``python -m gradvac_dist.bench <benchmark> [options]``.

- ``core``: the single-process aggregator against a plain per-pair loop, plain summation and
  TorchJD, with the project's performance goals (:mod:`gradvac_dist.bench.core`).

Shared timing and table helpers live in :mod:`gradvac_dist.bench._timing`.
"""
