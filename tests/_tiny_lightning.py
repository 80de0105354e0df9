"""A tiny LightningModule and Trainer factory shared by the callback and robustness tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class TinyClassifier(pl.LightningModule):
    """A float64 MLP (net.0, net.2) trained with plain SGD. Batches: (x, y); (ids, (x, y)) from an
    IndexedDataset; or {'idx', 'x', 'y'} dicts."""

    def __init__(self, lr: float = 0.1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict):
            x, y = batch["x"], batch["y"]
        elif isinstance(batch[1], (list, tuple)):
            x, y = batch[1]
        else:
            x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)  # the default query loss must mute this
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_trainer(callbacks, max_epochs: int, root, **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_epochs=max_epochs, callbacks=list(callbacks), logger=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      devices=1, default_root_dir=str(root), **kw)
