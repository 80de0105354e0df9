"""Trains TinyClassifier with InfluenceCallback under Lightning on the CPU, for test_distributed.py.

    python _ddp_lightning.py RUN_DIR STRATEGY DEVICES BATCH [--kill-rank R --kill-at STEP]

STRATEGY: 'ddp', 'ddp_spawn' or 'single'. The data (48 samples) and the model are fixed and nothing
is shuffled (under DDP each rank's loader gets a DistributedSampler(shuffle=False): rank r takes
samples r, r + 2, ...), so a run on 2 processes with batch b and one on a single process with
batch 2b see the same global batches. With --kill-rank, that rank kills itself (SIGKILL) at the start of step STEP; the
other rank's next collective then fails after the strategy's short timeout.
"""

import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from _tiny_lightning import TinyClassifier  # noqa: E402
from influence_hooks import InfluenceCallback  # noqa: E402

N = 48


class Model(TinyClassifier):
    def __init__(self, dataset, batch: int):
        super().__init__(lr=0.1)
        self.dataset, self.batch = dataset, batch

    def train_dataloader(self):
        distributed = self.trainer.world_size > 1
        sampler = DistributedSampler(self.dataset, shuffle=False) if distributed else None
        return DataLoader(self.dataset, batch_size=self.batch, shuffle=False, sampler=sampler)


class Killer(pl.Callback):
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            # the writer has taken in every step handed over (a shard it finished is on disk), so
            # what the kill leaves does not depend on how busy the machine is
            rec = next(c.recorder for c in trainer.callbacks if isinstance(c, InfluenceCallback))
            rec.writer.drain()
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    run_dir, strategy, devices, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    kill = ({"rank": int(sys.argv[sys.argv.index("--kill-rank") + 1]),
             "step": int(sys.argv[sys.argv.index("--kill-at") + 1])} if "--kill-rank" in sys.argv else None)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 5, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (N,), generator=g)
    q = (torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    model = Model(TensorDataset(X, Y), batch)
    cb = InfluenceCallback(run_dir, projection="none", storage_dtype="float64", queries=q, query_every_n_steps=1,
                           steps_per_shard=2, snapshot_every_n_steps=1, snapshot_scope="model", overwrite=True)
    callbacks = [cb] + ([Killer(**kill)] if kill else [])
    if strategy == "single":
        strat: object = "auto"
    else:
        strat = DDPStrategy(start_method="spawn" if strategy == "ddp_spawn" else "popen",
                            timeout=timedelta(seconds=20))
    trainer = pl.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
                         devices=devices, strategy=strat, default_root_dir=str(Path(run_dir).parent),
                         use_distributed_sampler=False)
    trainer.fit(model)


if __name__ == "__main__":
    main()
