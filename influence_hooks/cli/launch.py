"""Running a command under torchrun: `torchrun --nproc_per_node 2 -m influence_hooks.cli tracin RUN`.

When the environment says this process is one of several (torchrun sets WORLD_SIZE, RANK and
LOCAL_RANK), the command joins the process group (gloo on the CPU, NCCL with --device cuda, each
process on its own GPU), the aggregators split their work over it, and only rank 0 prints and
writes files.
"""

from __future__ import annotations

import argparse
import os


def join_launched_group(args: argparse.Namespace) -> None:
    """Set args.group (None for one process) and args.rank; fix args.device to this process's GPU."""
    args.group, args.rank = None, 0
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    device = getattr(args, "device", None) or "cpu"
    cuda = device.startswith("cuda")
    if cuda and ":" not in device:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(args.device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    args.group, args.rank = dist.group.WORLD, dist.get_rank()
