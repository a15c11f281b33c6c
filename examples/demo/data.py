"""The demo's data: scikit-learn's bundled handwritten digits, two side by side, made multi-task.

Each example is two 8x8 digit images placed side by side (an 8x16 image, 128 pixels in [0, 1]).
The tasks read the pair:

====================  =======  ==========================================================
name                  classes  label
====================  =======  ==========================================================
``left``              10       the left digit
``right``             10       the right digit
``parity``            2        parity of left + right (conflicts: it needs both digits,
                               and reads them differently from the digit tasks)
``mod3``              3        (left + right) mod 3
``greater``           2        left > right
``sum_ge_10``         2        left + right >= 10
====================  =======  ==========================================================

``--tasks m`` takes the first m. The split is fixed, whatever ``--seed``: the 1797 images are split
once (stratified, 30 % held out) and pairs are drawn from each side with a fixed generator, so
held-out pairs are made of digit images never seen in training. Nothing is downloaded:
``load_digits`` reads a file inside the scikit-learn package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATA_SEED", "NUM_HELDOUT", "NUM_TRAIN", "TASKS", "Task", "TaskData", "load"]

#: seed of the split and of the pairing (fixed: every run sees the same data)
DATA_SEED = 0
#: number of training pairs and of held-out pairs
NUM_TRAIN = 6000
NUM_HELDOUT = 2000
HELDOUT_FRACTION = 0.3


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    description: str
    label: Callable[[np.ndarray, np.ndarray], np.ndarray]


TASKS: tuple[Task, ...] = (
    Task("left", 10, "left digit", lambda a, b: a),
    Task("right", 10, "right digit", lambda a, b: b),
    Task("parity", 2, "parity of left+right", lambda a, b: (a + b) % 2),
    Task("mod3", 3, "(left+right) mod 3", lambda a, b: (a + b) % 3),
    Task("greater", 2, "left > right", lambda a, b: (a > b).astype(np.int64)),
    Task("sum_ge_10", 2, "left+right >= 10", lambda a, b: (a + b >= 10).astype(np.int64)),
)


@dataclass(frozen=True)
class TaskData:
    """Inputs ``x`` ``[N, 128]`` float32 in [0, 1] and labels ``y`` ``[N, m]`` int64, train and held out."""

    tasks: tuple[Task, ...]
    x_train: Tensor
    y_train: Tensor
    x_heldout: Tensor
    y_heldout: Tensor

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]


def _pairs(
    images: np.ndarray, digits: np.ndarray, count: int, rng: np.random.Generator, tasks
) -> tuple[Tensor, Tensor]:
    left = rng.integers(0, len(images), count)
    right = rng.integers(0, len(images), count)
    x = np.concatenate([images[left], images[right]], axis=2).reshape(count, -1) / 16.0
    a, b = digits[left], digits[right]
    y = np.stack([np.asarray(t.label(a, b), dtype=np.int64) for t in tasks], axis=1)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def load(num_tasks: int, num_train: int = NUM_TRAIN, num_heldout: int = NUM_HELDOUT) -> TaskData:
    """The first ``num_tasks`` tasks on the fixed train / held-out pairs (identical on every call)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 1 <= num_tasks <= len(TASKS):
        raise ValueError(f"num_tasks must be between 1 and {len(TASKS)}, got {num_tasks}.")
    tasks = TASKS[:num_tasks]
    digits = load_digits()
    images, targets = digits.images, digits.target.astype(np.int64)  # [1797, 8, 8] in 0..16
    index = np.arange(len(targets))
    train_ix, heldout_ix = train_test_split(index, test_size=HELDOUT_FRACTION, stratify=targets, random_state=DATA_SEED)
    rng = np.random.default_rng(DATA_SEED)
    x_train, y_train = _pairs(images[train_ix], targets[train_ix], num_train, rng, tasks)
    x_heldout, y_heldout = _pairs(images[heldout_ix], targets[heldout_ix], num_heldout, rng, tasks)
    return TaskData(tasks, x_train, y_train, x_heldout, y_heldout)
