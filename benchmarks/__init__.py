"""Benchmarks of gradvac_dist, run as ``python -m benchmarks <benchmark> [options]``.

- ``core``: the single-process aggregator against a plain per-pair loop, plain summation and
  TorchJD, with the project's performance goals (:mod:`benchmarks.core`).
- ``ddp``, ``fsdp``: GradVac-DDP and GradVac-FSDP against their baselines on spawned gloo ranks.
- ``report``: all of them plus sweeps over m, n and W, as markdown and PNG plots
  (:mod:`benchmarks.report`).

Shared timing and table helpers live in :mod:`benchmarks._timing`.
"""
