"""``python -m gradvac_dist.demo [options]``: the one-command demo (see :mod:`gradvac_dist.demo`).

Started by hand, it launches the training processes through torchrun; started by a launcher
(``RANK`` is set: ``torchrun -m gradvac_dist.demo``, ``accelerate launch -m gradvac_dist.demo``),
it is one of those processes.
"""

from .train import run_as_script

if __name__ == "__main__":
    run_as_script()
