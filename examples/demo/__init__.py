"""The one-command demo: the summed losses, PCGrad and GradVac, multi-process, on bundled real data.

Run it (2 processes, gloo on CPU, NCCL when there is a GPU per process; about a minute on 2 CPU
cores with the defaults: 3 seeds of 300 steps per method)::

    bash launch/demo.sh [options]            # sets up .venv first, then the line below
    python -m examples.demo [options]    # starts the processes itself, through torchrun

or under a launcher of your own (the processes read RANK / WORLD_SIZE from it)::

    torchrun --nproc_per_node 2 -m examples.demo.train [options]
    accelerate launch --multi_gpu --num_processes 2 --main_process_ip 127.0.0.1 \\
        --main_process_port 29500 -m examples.demo.train [options]

(``--multi_gpu`` is how accelerate 1.x starts several processes, on CPU as well; ``--cpu`` is not
needed, the demo picks its backend itself.)

Data (:mod:`examples.demo.data`): pairs of scikit-learn's bundled 8x8 digits side by side;
tasks: left digit, right digit, parity of their sum (a task that conflicts with the other two),
then, with ``--tasks`` up to 6: sum mod 3, left > right, sum >= 10. A fixed train / held-out split,
held-out pairs made of unseen images. Model: a shared two-layer MLP trunk, one linear head per task.

Methods: the plain sum of the task losses (DDP on ``sum(losses).backward()``), PCGrad and GradVac
(both through ``DistributedDataParallel`` with :func:`gradvac_dist.gradvac_hook`; PCGrad is GradVac
with ``beta=0``: its targets stay 0, so it projects out only negative cosines). Each is trained once
per seed (``--seeds N``, default 3); for one seed all three start from the same weights and see the
same batches (a ``DistributedSampler`` with that seed), so the seeds pair the runs.

Outputs (``--out``, default ``runs/demo``): ``metrics.jsonl`` (one line per step, method and seed:
task losses, and for PCGrad and GradVac the per-pair cosines, EMA targets and corrected fractions,
per block too with ``--grouping module`` or ``parameter``; see :mod:`examples.demo.report`),
``summary.json`` (configuration, held-out accuracy per seed with its mean and standard deviation,
time per step) and ``demo.png`` (with ``--grouping module``: the cosine of the task gradients per
layer over training, the GradVac paper's view); the table of held-out accuracy (mean ± std over the
seeds) and wall time per step is printed at the end.
Options: ``python -m examples.demo --help``.
"""
