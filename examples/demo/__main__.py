"""``python -m examples.demo [options]``: the one-command demo (see :mod:`examples.demo`).

Started by hand, it launches the training processes through torchrun; started by a launcher
(``RANK`` is set: ``torchrun -m examples.demo``, ``accelerate launch -m examples.demo``),
it is one of those processes.
"""

from .train import run_as_script

if __name__ == "__main__":
    run_as_script()
