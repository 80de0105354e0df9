"""Recording under torch.distributed data parallelism (Lightning's ddp / ddp_spawn, or a torchrun
script with DistributedDataParallel).

Every rank records its own micro-batches into its own shards of the one run directory. Rank 0
creates the run and tells the other ranks its id before they join; what is the same on every rank
(query gradients, parameter snapshots, checkpoints: DDP keeps the parameters identical) is written
by rank 0 alone. Sharded-parameter strategies (FSDP, DeepSpeed ZeRO) are refused: their ranks hold
only part of each parameter, so no rank sees a layer's whole per-sample gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import ConfigurationError, RunDirectoryError

SUPPORTED = "one process, or data parallelism with full parameter copies (Lightning's 'ddp', 'ddp_spawn', " \
            "'ddp_find_unused_parameters_true', or DistributedDataParallel under torchrun)"
_SHARDED = ("FSDP", "FullyShardedDataParallel", "DeepSpeed", "ModelParallel", "XLAFSDP")


def process_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else from an initialized torch.distributed, else (0, 1)."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (int(torch.distributed.get_rank()) if rank is None else int(rank),
                int(torch.distributed.get_world_size()) if world_size is None else int(world_size))
    return int(rank or 0), int(world_size or 1)


def refuse_sharded(what: Any) -> None:
    """ConfigurationError for a sharded strategy or model wrapper (by class name, so that neither
    Lightning nor DeepSpeed is imported)."""
    names = [cls.__name__ for cls in type(what).__mro__]
    hit = next((n for n in names if any(s in n for s in _SHARDED)), None)
    if hit is not None:
        raise ConfigurationError(
            f"influence_hooks does not record under {hit}: its ranks hold shards of each parameter, so no "
            f"rank sees a layer's whole per-sample gradient. Supported: {SUPPORTED}.")


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_text(text: str | None, max_bytes: int = 1024) -> str:
    """Rank 0's `text` on every rank (a fixed-size byte tensor: nothing is pickled)."""
    buf = torch.zeros(max_bytes + 1, dtype=torch.uint8, device=_device())
    if torch.distributed.get_rank() == 0:
        data = (text or "").encode()[:max_bytes]
        buf[0] = 1
        buf[1:1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    torch.distributed.broadcast(buf, src=0)
    data = bytes(buf[1:].cpu().tolist()).rstrip(b"\0")
    return data.decode(errors="replace")


def open_on_every_rank(rank: int, open_rank0: Callable[[], Any], join: Callable[[str], Any]) -> Any:
    """Rank 0 opens the run (open_rank0() -> a writer with .manifest['run_id']); the other ranks
    wait for its id, then join(run_id). A failure on rank 0 fails every rank with its message."""
    writer, failure = None, None
    if rank == 0:
        try:
            writer = open_rank0()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = e
    message = broadcast_text("!" + f"{type(failure).__name__}: {failure}" if failure is not None
                             else writer.manifest["run_id"] if rank == 0 else None)
    if failure is not None:
        raise failure
    if message.startswith("!"):
        raise RunDirectoryError(f"rank 0 could not open the run directory, so rank {rank} records nothing: "
                                f"{message[1:]}")
    return writer if rank == 0 else join(message)
