import zlib

import pytest
import torch

from tests.settings import DTYPE


def pytest_report_header(config):
    return f"gradvac_dist test dtype: {DTYPE} (set GRADVAC_TEST_DTYPE=float32 or float64)"


@pytest.fixture(autouse=True)
def _seeded_global_rng(request):
    """Seeds torch's global generator before every test, from the test's id alone.

    Tests that draw from the global generator (``randn_(...)`` without a generator, models'
    default initialisation) then see the same numbers whatever ran before them on the same xdist
    worker: an input that breaks a test breaks it on every run, never one run in forty.
    """
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
