"""Training-step time with InfluenceCallback versus without, measured in one process.

For each model (an MLP, a small CNN, a tiny GPT-2 built from a config with random weights) the
same Lightning training runs alternately with and without the callback (default projection),
several rounds, and the ratio of median step times is printed. Target: <= 1.15 on a CPU.

    python benchmarks/overhead.py            # all three models
    python benchmarks/overhead.py --quick    # fewer steps, for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from influence_hooks import InfluenceCallback

warnings.filterwarnings("ignore")


class StepTimer(L.Callback):
    """Wall time of each training batch: forward, backward, hooks, optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class LanguageModel(L.LightningModule):
    def __init__(self, config):
        super().__init__()
        from transformers import GPT2LMHeadModel
        self.net = GPT2LMHeadModel(config)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.net(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def mlp_setup(n: int):
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                        nn.Linear(1024, 10))
    data = TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
    return (lambda: Classifier(net_copy(net))), data, 128


def cnn_setup(n: int):
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))
    data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    return (lambda: Classifier(net_copy(net))), data, 64


def gpt2_setup(n: int):
    from transformers import GPT2Config
    cfg = GPT2Config(vocab_size=2048, n_positions=64, n_embd=128, n_layer=2, n_head=4,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    data = TensorDataset(torch.randint(0, 2048, (n, 64)))
    return (lambda: LanguageModel(cfg)), data, 16


def net_copy(net: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(net)


def time_training(make_module, data, batch_size: int, steps: int, record: bool, run_dir: str) -> list[float]:
    torch.manual_seed(0)
    timer = StepTimer()
    callbacks: list = [timer]
    if record:
        callbacks.append(InfluenceCallback(run_dir, projection=1024, overwrite=True))
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        num_sanity_val_steps=0)
    trainer.fit(make_module(), DataLoader(data, batch_size=batch_size, shuffle=True))
    return timer.times[3:]  # the first steps warm up allocators and caches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    ap.add_argument("--models", default="mlp,cnn,gpt2", help="comma list of mlp, cnn, gpt2")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    steps = 15 if args.quick else 40
    rounds = args.rounds or (2 if args.quick else 3)
    setups = {"mlp": mlp_setup, "cnn": cnn_setup, "gpt2": gpt2_setup}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {steps} steps x {rounds} rounds "
          "per configuration, alternating without/with the callback (projection=1024)\n")
    print(f"{'model':<6} {'step ms (without)':>18} {'step ms (with)':>15} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            make_module, data, bs = setups[name](4096)
            without, with_cb = [], []
            for _ in range(rounds):
                without += time_training(make_module, data, bs, steps, False, tmp)
                with_cb += time_training(make_module, data, bs, steps, True, f"{tmp}/{name}")
            a, b = statistics.median(without), statistics.median(with_cb)
            print(f"{name:<6} {1000 * a:>18.2f} {1000 * b:>15.2f} {b / a:>7.3f}")
    print("\nratio = median step time with the callback / without; target <= 1.15")


if __name__ == "__main__":
    main()
