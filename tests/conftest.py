from tests.settings import DTYPE


def pytest_report_header(config):
    return f"gradvac_dist test dtype: {DTYPE} (set GRADVAC_TEST_DTYPE=float32 or float64)"
