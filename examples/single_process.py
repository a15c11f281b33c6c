"""Multi-task training on one process with the GradVac aggregator and ``gradvac_dist.backward``.

Launch:
    python examples/single_process.py --steps 200

``gradvac_dist.backward(model, losses, aggregator)`` runs one backward pass per task, combines the
task gradients with GradVac (EMA targets kept in the aggregator) and writes the result into
``.grad``; the optimizer step is yours.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradvac_dist


class MultiTaskNet(nn.Module):
    """A shared encoder and one linear head per task."""

    def __init__(self, in_dim: int, hidden: int, num_tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [head(z).squeeze(-1) for head in self.heads]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--grouping", default="module", choices=gradvac_dist.GROUPINGS)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()

    num_tasks, in_dim = 3, 16
    torch.manual_seed(0)
    teachers = torch.randn(num_tasks, in_dim)
    teachers[1] = -teachers[0] + 0.3 * teachers[1]  # task 1 conflicts with task 0
    model = MultiTaskNet(in_dim, 64, num_tasks)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    # beta: EMA rate of the cosine targets; seed: the visiting orders are drawn from it.
    aggregator = gradvac_dist.GradVac(beta=0.5, eps=1e-8, seed=0)

    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        x = torch.randn(args.batch, in_dim, generator=g)
        ys = torch.tanh(x @ teachers.T).T + 0.1 * torch.randn(num_tasks, args.batch, generator=g)
        losses = [nn.functional.mse_loss(out, y) for out, y in zip(model(x), ys)]
        # GradVac on the encoder, one block per layer ("module" grouping, LibMTL's all_layer);
        # the heads get the plain sum of their task gradients.
        gradvac_dist.backward(
            model, losses, aggregator, grouping=args.grouping, shared_params=list(model.encoder.parameters())
        )
        optimizer.step()
        optimizer.zero_grad()
        if step % args.log_every == 0 or step == args.steps - 1:
            result = aggregator.last_result  # per-block cosines and corrections, for logging
            corrected = int(result.corrected.sum()) if result is not None else 0
            print(f"step {step:4d}  losses {' '.join(f'{v.item():.4f}' for v in losses)}  corrections {corrected}")
    print(f"done: {args.steps} steps, GradVac step {aggregator.step}")


if __name__ == "__main__":
    main()
