"""A tiny real model and data set for testing the training loop (imported by tests and by
`python tests/helpers/tiny.py`, which torchrun and the kill test launch as a separate process)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from xmodal.models.hub import PretrainedModel
from xmodal.models.registry import register_model
from xmodal.training.loop import TrainConfig, Trainer


@dataclass
class TinyConfig:
    dim: int = 8
    hidden: int = 16
    dropout: float = 0.1


@register_model("test-tiny-regressor")
class TinyRegressor(PretrainedModel):
    config_class = TinyConfig
    task = "test"

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.net = nn.Sequential(nn.Linear(config.dim, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                                 nn.Linear(config.hidden, 1))

    def loss(self, batch):
        x, y = batch
        pred = self.net(x).squeeze(-1)
        return nn.functional.mse_loss(pred, y), {"mae": (pred - y).abs().mean().detach()}


class TinyData(Dataset):
    def __init__(self, n: int = 96, dim: int = 8):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, dim) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def make_trainer(out_dir, dropout=0.1, steps=20, init_seed=0, sleep=0.0, **train):
    torch.manual_seed(init_seed)
    model = TinyRegressor(TinyConfig(dropout=dropout))
    config = TrainConfig(out_dir=str(out_dir), steps=steps, batch_size=16, lr=1e-2, checkpoint_every=5,
                         log_every=1, progress=False, device="cpu", **train)
    on_step = (lambda step: time.sleep(sleep)) if sleep else None
    return Trainer(model, TinyData(), config, on_step=on_step)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ema", type=float, default=0.0)
    args = parser.parse_args()
    trainer = make_trainer(Path(args.out), dropout=args.dropout, steps=args.steps, sleep=args.sleep, ema=args.ema)
    if args.resume:
        trainer.resume()
    print(trainer.train(), file=sys.stderr)
