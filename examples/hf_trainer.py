"""Multi-task training with the Hugging Face ``Trainer`` and exact GradVac under DDP.

Launch (CPU, 2 gloo processes on this machine):
    torchrun --nproc_per_node 2 examples/hf_trainer.py --output-dir runs/hf
    torchrun --nproc_per_node 2 examples/hf_trainer.py --output-dir runs/hf --resume     # from the latest
Launch (every GPU of this machine, NCCL): the same with ``--nproc_per_node $(nvidia-smi -L | wc -l)``.
One process (``python examples/hf_trainer.py``): no DDP; the GradVac aggregator does the same job.

The model is built from a ``transformers`` config (a 2-layer BERT encoder, nothing downloaded)
with one classification head per task; each synthetic sequence has a label for every task, and
task 1 conflicts with task 0. The recipe, in a ``Trainer`` subclass:

1. ``training_step`` computes the m task losses and calls ``gradvac_dist.backward(model, losses)``
   instead of ``accelerator.backward(loss)``: one backward pass per task. ``model`` is the
   DistributedDataParallel module the Trainer built (through accelerate, with
   ``ddp_find_unused_parameters=True``: each task's pass reaches only its own head);
   ``gradvac_dist.register_ddp`` attaches the GradVac hook to it at the first step (later calls
   are no-ops). The Trainer's gradient accumulation wraps every micro-batch but the last in
   ``no_sync``; GradVac then acts once per optimizer step, on the rank-mean task gradients
   summed over the micro-batches (each loss divided by the accumulation steps, as the Trainer does).
2. The Trainer then clips (``max_grad_norm``), steps the optimizer and the schedule as usual.
3. ``GradVacCheckpoint`` (a ``TrainerCallback``) writes the GradVac state (EMA targets, shuffle
   generator, step; identical on every rank) into each ``checkpoint-N`` folder as
   ``gradvac.pt``; ``train(resume_from_checkpoint=...)`` loads it back on every rank, so a resumed
   run continues the same trajectory.

``transformers`` comes with the optional extra ``pip install gradvac_dist[transformers]``; the
library itself never imports it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import gradvac_dist

NUM_TASKS, VOCAB, SEQ_LEN = 3, 48, 12
GRADVAC_FILE = "gradvac.pt"  # in every checkpoint-N folder


class MultiTaskBert(nn.Module):
    """A small BERT encoder (from a config: random weights, no download) and one head per task."""

    def __init__(self, hidden: int = 32, layers: int = 2) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=SEQ_LEN, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.heads = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(NUM_TASKS))

    def forward(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(input_ids=input_ids).last_hidden_state.mean(1)
        return [head(z) for head in self.heads]


def make_model(hidden: int = 32, layers: int = 2, float64: bool = False) -> MultiTaskBert:
    """The same initial weights on every rank (and in a test's reference copy)."""
    torch.manual_seed(0)
    model = MultiTaskBert(hidden, layers)
    return model.double() if float64 else model


class SyntheticTasks(torch.utils.data.Dataset):
    """Token sequences labelled by three bag-of-words teachers; teacher 1 mostly opposes teacher 0."""

    def __init__(self, size: int) -> None:
        g = torch.Generator().manual_seed(2)
        self.input_ids = torch.randint(0, VOCAB, (size, SEQ_LEN), generator=g)
        teachers = torch.randn(NUM_TASKS, VOCAB, generator=g)
        teachers[1] = -teachers[0] + 0.3 * teachers[1]
        counts = torch.zeros(size, VOCAB).scatter_add_(1, self.input_ids, torch.ones(size, SEQ_LEN))
        scores = counts @ teachers.T
        self.labels = (scores > scores.median(0).values).long()  # [size, m]: balanced classes

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def task_losses(outs: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy per task."""
    return [nn.functional.cross_entropy(out, labels[:, i]) for i, out in enumerate(outs)]


class GradVacCheckpoint(TrainerCallback):
    """Writes the GradVac state into each ``checkpoint-N`` folder (rank 0; the state is identical on all ranks)."""

    def __init__(self, gradvac) -> None:
        self.gradvac = gradvac

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            torch.save(self.gradvac.state_dict(), os.path.join(folder, GRADVAC_FILE))


class GradVacTrainer(Trainer):
    """A ``Trainer`` whose backward is GradVac: one backward pass per task (module docstring, steps 1-3).

    Args:
        *args, **kwargs: what ``Trainer`` takes; ``args.ddp_find_unused_parameters`` must be True
            when several processes train (each task's pass leaves the other heads unused).
        beta, seed, grouping: GradVac's EMA rate, shuffle seed and block grouping (every rank
            uses the same).
    """

    def __init__(self, *args, beta: float = 0.5, seed: int = 0, grouping: str = "module", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            if self.args.ddp_find_unused_parameters is not True:
                raise ValueError(
                    "GradVacTrainer on several processes needs TrainingArguments(ddp_find_unused_parameters=True): "
                    "each task's backward pass reaches only its own head"
                )
            # shared_params names parameters of the module DDP wraps (this script's MultiTaskBert)
            self.gradvac = gradvac_dist.GradVacState(
                num_tasks=NUM_TASKS, beta=beta, seed=seed, grouping=grouping, shared_params=["encoder"]
            )
        else:
            self.gradvac = gradvac_dist.GradVac(beta=beta, seed=seed)
        self.grouping = grouping
        self.add_callback(GradVacCheckpoint(self.gradvac))

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            losses = task_losses(model(inputs["input_ids"]), inputs["labels"])
        losses = [loss / self.current_gradient_accumulation_steps for loss in losses]
        if isinstance(model, DistributedDataParallel):
            gradvac_dist.register_ddp(model, self.gradvac)  # once; a no-op afterwards
            gradvac_dist.backward(model, losses)
        else:
            shared = list(self.accelerator.unwrap_model(model).encoder.parameters())
            gradvac_dist.backward(model, losses, self.gradvac, grouping=self.grouping, shared_params=shared)
        return torch.stack([loss.detach() for loss in losses]).sum()

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``, first loading the GradVac state of the checkpoint it resumes from."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
            if folder is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir} holds no checkpoint-N folder"
                )
        if folder:
            path = os.path.join(folder, GRADVAC_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: that checkpoint was not written by GradVacTrainer, so GradVac's EMA targets "
                    "cannot be restored; resume from a checkpoint it saved, or start afresh"
                )
            self.gradvac.load_state_dict(torch.load(path, weights_only=True))
        return super().train(resume_from_checkpoint=folder, **kwargs)


def training_arguments(output_dir: str, **overrides) -> TrainingArguments:
    """The Trainer settings this recipe needs (on CPU: gloo), and the example's defaults."""
    kwargs = dict(
        output_dir=output_dir, per_device_train_batch_size=8, learning_rate=1e-3, max_steps=100,
        lr_scheduler_type="linear", logging_steps=10, save_steps=50, report_to="none",
        ddp_find_unused_parameters=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        seed=0, disable_tqdm=True, remove_unused_columns=False,  # "labels" is not an argument of forward
    )  # fmt: skip
    if kwargs["use_cpu"] and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        kwargs["ddp_backend"] = "gloo"
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="runs/hf_trainer", help="where the Trainer writes checkpoint-N folders")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps (TrainingArguments.max_steps)")
    ap.add_argument("--batch", type=int, default=8, help="batch size per process")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--save-steps", type=int, default=50)
    ap.add_argument("--log-steps", type=int, default=10)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --output-dir")
    args = ap.parse_args()
    targs = training_arguments(
        args.output_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps, save_steps=args.save_steps, logging_steps=args.log_steps,
    )  # fmt: skip
    if targs.use_cpu:  # share the cores between this machine's processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    trainer = GradVacTrainer(model=make_model(), args=targs, train_dataset=SyntheticTasks(64 * args.batch))
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if trainer.is_world_process_zero():
        print(
            f"done: {trainer.state.global_step} steps on {targs.world_size} process(es), "
            f"GradVac step {trainer.gradvac.step}",
            flush=True,
        )
    if targs.world_size > 1:
        torch.distributed.barrier()
    # Leave without freeing the process group: with gloo, its destructor can deadlock at exit (pytorch#56297).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
