"""Moving recorded tensors to the host without stalling training, and the RNG and AMP state the
recorder must read or leave untouched.

On a GPU, copies go asynchronously into pinned memory and a CUDA event marks when they are
complete; the writer thread waits for the event, never the training thread. On the CPU every
function here is a plain copy (or nothing).
"""

from __future__ import annotations

from typing import Any

import torch


def host_copy(t: Any) -> Any:
    """A GPU tensor copied asynchronously into pinned host memory (valid once the step's event
    has completed); anything else unchanged."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def event_after(t: torch.Tensor) -> Any:
    """A CUDA event recorded after the work queued so far (None on the CPU)."""
    if t.device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def loss_scale(grad_scaler: Any) -> Any:
    """An enabled AMP GradScaler's current scale (a device tensor: dividing by it needs no sync)."""
    if grad_scaler is None or not getattr(grad_scaler, "is_enabled", lambda: True)():
        return None
    scale = getattr(grad_scaler, "_scale", None)
    return scale if scale is not None else grad_scaler.get_scale()


def scaler_found_inf(grad_scaler: Any, optimizer: torch.optim.Optimizer) -> torch.Tensor | None | bool:
    """Whether an AMP GradScaler will skip this step (inf/NaN in the unscaled gradients), as a
    device tensor; None without an enabled scaler; False when it has not unscaled this optimizer
    yet (so it cannot be known)."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    state = getattr(grad_scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    found = state.get("found_inf_per_device") or {}
    if not found:
        return False
    return sum(v.to(next(iter(found.values())).device) for v in found.values()) > 0
