"""Test settings shared by the whole suite (import them from here, not from conftest).

GRADVAC_TEST_DTYPE=float32 runs every test that builds its inputs with :func:`tensor_` /
:func:`randn_` in float32 instead of float64 (tolerances follow :data:`DTYPE`).
"""

from __future__ import annotations

import os

import pytest
import torch

_NAME = os.environ.get("GRADVAC_TEST_DTYPE", "float64")
if _NAME not in ("float64", "float32"):
    raise ValueError(f"GRADVAC_TEST_DTYPE must be float64 or float32, got {_NAME!r}")
DTYPE: torch.dtype = getattr(torch, _NAME)
#: relative tolerance of equivalence tests in the chosen dtype
RTOL = 1e-10 if DTYPE == torch.float64 else 2e-4


def tensor_(data, **kwargs) -> torch.Tensor:
    """``torch.tensor`` in the suite's dtype."""
    return torch.tensor(data, dtype=kwargs.pop("dtype", DTYPE), **kwargs)


def randn_(*shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.randn`` in the suite's dtype."""
    return torch.randn(*shape, generator=generator, dtype=DTYPE)


#: FSDP2 on a CPU mesh (gloo) runs from torch 2.7 (torch.cpu.Stream.record_event); on older releases
#: gradvac_dist refuses it with a clear error, which test_fsdp.py::test_fsdp2_on_cpu_refused_without_cpu_streams
#: checks on every release.
FSDP_ON_CPU = hasattr(torch.cpu.Stream, "record_event")
needs_fsdp_on_cpu = pytest.mark.skipif(
    not FSDP_ON_CPU, reason=f"FSDP2 on a CPU mesh needs torch 2.7 or later (this is {torch.__version__})"
)
