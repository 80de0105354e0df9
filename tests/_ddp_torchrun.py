"""GradientRecorder in a hand-written DistributedDataParallel loop, for test_distributed.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 _ddp_torchrun.py RUN_DIR BATCH

The same data, model and optimizer as _ddp_lightning.py (2 epochs of 48 samples, no shuffling),
so it must record the run a single process records with batch 2 * BATCH.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from _tiny_lightning import TinyClassifier  # noqa: E402
from influence_hooks import GradientRecorder  # noqa: E402


def main() -> None:
    run_dir, batch = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(48, 5, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (48,), generator=g)
    q = (torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    model = DistributedDataParallel(TinyClassifier(lr=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # the wrapped model is fine: the recorder hooks the module DDP runs
    rec = GradientRecorder(run_dir, model, projection="none", storage_dtype="float64", queries=q,
                           query_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), query_every_n_steps=1,
                           overwrite=True, verbose=False)
    ds = TensorDataset(torch.arange(48), X, Y)
    sampler = DistributedSampler(ds, shuffle=False)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler)
    for epoch in range(2):
        for k, (ids, x, y) in enumerate(loader):
            rec.begin_micro_batch(ids)
            F.cross_entropy(model(x), y).backward()
            rec.end_step(opt, epoch=epoch, epoch_end=k == len(loader) - 1)
            opt.step()
            opt.zero_grad()
    rec.finish()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
