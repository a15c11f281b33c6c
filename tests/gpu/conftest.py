"""GPU tests: collected only where CUDA is available (run them with `pytest tests/gpu` on a GPU
machine); on CPU-only machines they are not collected at all rather than reported as skipped."""

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]
