"""Every aggregator with a process group, for test_distributed.py. Run under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 _dist_aggregate.py RUN EXACT_RUN OUT

RUN: a recorded run (tests/helpers_runs.record_run); EXACT_RUN: a run with snapshots recorded as in
test_exact.py. Every rank computes everything with group=WORLD; rank 0 writes the results to OUT
(HDF5) for the test to compare with one process. Each rank also checks that it got the whole result.
"""

import sys
from pathlib import Path

import h5py
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from dist_cases import cases  # noqa: E402


def main() -> None:
    run_dir, exact_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    results = cases(run_dir, exact_dir, group=group, dvemb_dir=Path(out).parent)
    # every rank holds the whole result: compare rank 1's with rank 0's
    for name, t in results.items():
        other = t.clone()
        dist.broadcast(other, src=0)
        assert torch.equal(other, t), f"{name} differs between ranks"
    if dist.get_rank() == 0:
        with h5py.File(out, "w") as f:
            for name, t in results.items():
                f[name] = t.numpy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
