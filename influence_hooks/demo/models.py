"""Small models and data for the demo, the example configs and the tests.

Everything here runs on a CPU in seconds and downloads nothing:

- `DigitsDataModule` + `DigitsMLP`: scikit-learn's bundled 8x8 handwritten digits (1797 images),
  a two-layer MLP.
- `ShapesDataModule` + `SmallCNN`: generated 1x16x16 images of four shapes (horizontal bar,
  vertical bar, diagonal, box) at random positions with pixel noise, a two-conv CNN.

Both data modules flip a fraction `label_noise` of the training labels at random (fixed seed), keep
a clean validation split, and name a clean subset of it as the influence queries
(`query_dataset()`). Sample ids are positions in the training split, so `corrupted_mask()` lines
up with the ids the recorder stores.

In a YAML config, `InfluenceCallback(queries_from="query_dataset")` fetches the queries from the
data module when training starts, and stores its `influence_metadata()` (including the ids of the
flipped labels) in the run's metadata, where `influence-hooks compare` finds them.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..errors import ConfigurationError


# ---------------------------------------------------------------------- data
class LabelNoiseDataModule(pl.LightningDataModule):
    """A classification data set split into train / validation, with label noise on train only.

    Args:
        n_train: training samples (None: everything not in validation).
        n_val: clean validation samples.
        n_queries: the first n_queries validation samples are the influence queries.
        label_noise: fraction of training labels replaced by a different, random class.
        batch_size: training batch size (validation uses one batch).
        seed: seeds the split, the noise and the shuffling of the training loader.

    Subclasses implement `make_data() -> (x [N, ...] float32, y [N] int64, n_classes)`.
    """

    def __init__(self, n_train: int | None = None, n_val: int = 300, n_queries: int = 150,
                 label_noise: float = 0.1, batch_size: int = 32, seed: int = 0):
        super().__init__()
        if not 0.0 <= label_noise < 1.0:
            raise ConfigurationError(f"label_noise must be in [0, 1), got {label_noise}")
        if n_queries > n_val:
            raise ConfigurationError(f"n_queries ({n_queries}) cannot exceed n_val ({n_val})")
        self.n_train, self.n_val, self.n_queries = n_train, n_val, n_queries
        self.label_noise, self.batch_size, self.seed = label_noise, batch_size, seed
        self._ready = False

    def make_data(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        x, y, self.n_classes = self.make_data()
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(y))
        val_idx = order[:self.n_val]
        rest = order[self.n_val:]
        if self.n_train is not None:
            if self.n_train > len(rest):
                raise ConfigurationError(f"n_train={self.n_train} but only {len(rest)} samples remain "
                                         f"after {self.n_val} validation samples")
            rest = rest[:self.n_train]
        self.x_train, self.clean_labels = x[rest], y[rest].clone()
        self.x_val, self.y_val = x[val_idx], y[val_idx]
        n = len(rest)
        flipped = np.sort(rng.choice(n, size=int(round(self.label_noise * n)), replace=False))
        shift = torch.from_numpy(rng.integers(1, self.n_classes, size=len(flipped)))
        self.y_train = self.clean_labels.clone()
        self.y_train[flipped] = (self.clean_labels[flipped] + shift) % self.n_classes  # always a wrong class
        self.flipped_ids = flipped.astype(np.int64)
        self.train_set = TensorDataset(self.x_train, self.y_train)
        self.val_set = TensorDataset(self.x_val, self.y_val)
        self._ready = True

    def corrupted_mask(self, ids: Any = None) -> np.ndarray:
        """[len(ids)] bool: whether training sample id (position in the training split) has a
        flipped label. ids=None: every training sample in order."""
        self.setup()
        mask = np.zeros(len(self.y_train), bool)
        mask[self.flipped_ids] = True
        return mask if ids is None else mask[np.asarray(ids, np.int64)]

    def query_dataset(self) -> Dataset:
        """The influence queries: the first n_queries clean validation samples (a Subset, whose
        indices become the recorded query ids)."""
        self.setup()
        return Subset(self.val_set, list(range(self.n_queries)))

    def influence_metadata(self) -> dict[str, Any]:
        """What a recorded run should remember about its data (JSON-serialisable)."""
        self.setup()
        return {"dataset": type(self).__name__, "n_train": len(self.y_train), "n_val": self.n_val,
                "label_noise": self.label_noise, "seed": self.seed,
                "corrupted_ids": self.flipped_ids.tolist()}

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))


class DigitsDataModule(LabelNoiseDataModule):
    """scikit-learn's 8x8 digits (bundled, no download): x [N, 64] in [0, 1], y [N] in 0..9."""

    def make_data(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        return x, torch.tensor(d.target, dtype=torch.int64), 10


SHAPES = ("horizontal bar", "vertical bar", "diagonal", "box")


class ShapesDataModule(LabelNoiseDataModule):
    """Generated 1 x size x size images of the four SHAPES at random positions, plus pixel noise."""

    def __init__(self, n_samples: int = 1600, size: int = 16, pixel_noise: float = 0.3,
                 n_train: int | None = None, n_val: int = 300, n_queries: int = 150,
                 label_noise: float = 0.1, batch_size: int = 32, seed: int = 0):
        super().__init__(n_train=n_train, n_val=n_val, n_queries=n_queries, label_noise=label_noise,
                         batch_size=batch_size, seed=seed)
        self.n_samples, self.size, self.pixel_noise = n_samples, size, pixel_noise

    def make_data(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed + 1)
        n, s = self.n_samples, self.size
        y = torch.arange(n) % len(SHAPES)
        x = torch.zeros(n, 1, s, s)
        lo = torch.randint(0, s // 2, (n, 2), generator=g)
        length = torch.randint(s // 3, s // 2 + 1, (n,), generator=g)
        for i in range(n):
            r, c, L = int(lo[i, 0]), int(lo[i, 1]), int(length[i])
            img = x[i, 0]
            if y[i] == 0:
                img[r, c:c + L] = 1
            elif y[i] == 1:
                img[r:r + L, c] = 1
            elif y[i] == 2:
                k = torch.arange(L)
                img[r + k, c + k] = 1
            else:
                img[r, c:c + L] = 1
                img[r + L - 1, c:c + L] = 1
                img[r:r + L, c] = 1
                img[r:r + L, c + L - 1] = 1
        x += self.pixel_noise * torch.randn(x.shape, generator=g)
        return x, y, len(SHAPES)


# ---------------------------------------------------------------------- models
class _Classifier(pl.LightningModule):
    """Cross-entropy classifier trained with plain SGD (the estimators' assumption)."""

    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DigitsMLP(_Classifier):
    """64 -> hidden (tanh) -> 10. Modules `hidden` and `out` are nn.Linear."""

    def __init__(self, hidden: int = 64, lr: float = 0.3):
        super().__init__(lr)
        self.save_hyperparameters()
        self.hidden = nn.Linear(64, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


class SmallCNN(_Classifier):
    """conv(1->c, 3x3) relu maxpool -> conv(c->2c, 3x3) relu -> global max -> linear(2c -> classes)."""

    def __init__(self, channels: int = 8, n_classes: int = len(SHAPES), lr: float = 0.1):
        super().__init__(lr)
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.relu(self.conv2(h))
        return self.head(h.amax(dim=(2, 3)))
