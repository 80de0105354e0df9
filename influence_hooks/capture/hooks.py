"""Per-sample gradients from the real backward pass, through module hooks.

A forward hook on every selected module saves the module's inputs and puts a hook on its output
tensor; when the backward pass reaches that output, the layer's projector turns (inputs,
grad_output) into one projected gradient per sample. No extra forward or backward pass is run for
training samples, and nothing here synchronises with the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from ..errors import SampleIdError
from .projection import LayerProjector, ProjectionSpec
from .rules import LayerRule, compute_dtype


@dataclass
class CapturedLayer:
    """A selected layer: its columns are [offset, offset + spec.out_dim) of a gradient row."""

    name: str
    module: nn.Module
    rule: LayerRule
    spec: ProjectionSpec
    projector: LayerProjector
    offset: int


class _MicroBatch:
    """What the hooks collected for one micro-batch: one ``[rows, K]`` block, each layer writing
    its columns in place (no per-layer tensors to concatenate at the end of the step)."""

    __slots__ = ("rows", "block", "written")

    def __init__(self, rows: int):
        self.rows = rows
        self.block: torch.Tensor | None = None  # allocated by the first layer's gradient
        self.written: set[int] = set()  # layers whose columns hold data

    def filled(self, layers: list[CapturedLayer], dim: int, dtype: torch.dtype | None,
               device: torch.device) -> torch.Tensor:
        """The block, zeros in the columns of layers that got no gradient."""
        if self.block is None:
            return torch.zeros(self.rows, dim, dtype=dtype or torch.float32, device=device)
        if len(self.written) < len(layers):
            for i, l in enumerate(layers):
                if i not in self.written:
                    self.block[:, l.offset:l.offset + l.spec.out_dim].zero_()
        return self.block

    def select(self, keep: list[int], layers: list[CapturedLayer]) -> "_MicroBatch":
        """The same micro-batch with only the layers `keep` (old indices), in that order."""
        out = _MicroBatch(self.rows)
        if self.block is not None:
            out.block = torch.cat([self.block[:, layers[i].offset:layers[i].offset + layers[i].spec.out_dim]
                                   for i in keep], dim=1)
        out.written = {new for new, old in enumerate(keep) if old in self.written}
        return out


class GradientCapture:
    """Collects per-sample projected gradients of `layers` during backward passes.

    Contributions are grouped by micro-batch: `begin_micro_batch()` starts a new group. A module
    called several times in one forward pass (shared weights) contributes the sum of its calls,
    as its true per-sample gradient does.
    """

    def __init__(self, layers: list[CapturedLayer]):
        self.layers = layers
        self.dim = sum(l.spec.out_dim for l in layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._enabled = False
        self._current: _MicroBatch | None = None
        self._finished: list[_MicroBatch] = []
        self._current_rows = 0
        self.seen_layers: set[int] = set()
        # layers whose hook saw a different batch size than the micro-batch: {layer: rows seen}
        self.batch_mismatch: dict[int, int] = {}
        # the same, seen by the forward hooks of the current micro-batch
        self.forward_mismatch: dict[int, int] = {}
        # called once, at the first gradient, before anything is computed: the recorder may then
        # re-plan the layers (replace_layers) from what the forward pass showed
        self.before_first_gradient: Callable[[], None] | None = None
        self._index_of = {l.name: i for i, l in enumerate(layers)}  # see replace_layers
        self.seconds = 0.0  # spent inside the hooks (on a GPU: launching their work)

    # hooks ----------------------------------------------------------------
    def attach(self) -> None:
        if not self._handles:
            self._handles = [l.module.register_forward_hook(partial(self._forward_hook, i))
                             for i, l in enumerate(self.layers)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def set_enabled(self, on: bool) -> None:
        self._enabled = on

    def _forward_hook(self, index: int, module: nn.Module, inputs: tuple, output) -> None:
        if not self._enabled or not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        t0 = time.perf_counter()
        if self._current_rows and output.shape[0] != self._current_rows:
            self.forward_mismatch[index] = output.shape[0]
        saved = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)
        out = output.detach()
        output.register_hook(partial(self._on_grad, self.layers, index, module, saved, out))
        self.seconds += time.perf_counter() - t0

    def _on_grad(self, layers: list[CapturedLayer], index: int, module: nn.Module, inputs: tuple,
                 output: torch.Tensor, grad: torch.Tensor) -> None:
        if self.before_first_gradient is not None:
            hook, self.before_first_gradient = self.before_first_gradient, None
            hook()
        if layers is not self.layers:  # registered before the layers were re-planned
            index = self._index_of.get(layers[index].name)
            if index is None:  # left out
                return
        if self._current_rows and grad.shape[0] != self._current_rows:
            # e.g. a position embedding applied to a [1, T] input broadcast over the batch: its
            # output gradient is already summed over samples, per-sample values are lost
            self.batch_mismatch[index] = grad.shape[0]
            self.seen_layers.add(index)
            return
        t0 = time.perf_counter()
        layer, mb = self.layers[index], self._current
        if mb is None:
            mb = self._current = _MicroBatch(self._current_rows)
        if mb.block is None:  # the first layer to arrive sets the block's dtype and device
            mb.block = torch.empty(grad.shape[0], self.dim, dtype=compute_dtype(module, grad), device=grad.device)
        cols = mb.block[:, layer.offset:layer.offset + layer.spec.out_dim]  # the layer projects into these
        if index in mb.written:  # a module called again in the same forward pass: sum
            cols.add_(layer.projector.per_sample(module, inputs, output, grad))
        else:
            layer.projector.per_sample(module, inputs, output, grad, out=cols)
            mb.written.add(index)
        self.seen_layers.add(index)
        self.seconds += time.perf_counter() - t0

    # micro-batches ---------------------------------------------------------
    def begin_micro_batch(self, rows: int) -> None:
        """Start collecting a micro-batch of `rows` samples (closing the previous one)."""
        self._close_micro_batch()
        self._current_rows = rows

    def _close_micro_batch(self) -> None:
        if self._current is not None:
            self._finished.append(self._current)
        elif self._current_rows:
            self._finished.append(_MicroBatch(self._current_rows))
        self._current, self._current_rows = None, 0
        self.forward_mismatch = {}

    @property
    def current_rows(self) -> int:
        """Rows of the micro-batch being collected (0 between micro-batches)."""
        return self._current_rows

    def take_state(self) -> tuple:
        """Set aside what was collected so far (to capture something else in between)."""
        state = (self._current, self._finished, self._current_rows)
        self._current, self._finished, self._current_rows = None, [], 0
        return state

    def restore_state(self, state: tuple) -> None:
        self._current, self._finished, self._current_rows = state

    def discard(self) -> None:
        """Drop everything collected since the last `collect`."""
        self._current, self._finished, self._current_rows = None, [], 0
        self.batch_mismatch = {}

    def replace_layers(self, layers: list[CapturedLayer]) -> None:
        """Capture `layers` (some of the current ones, planned anew) instead, before any gradient
        was taken in (from `before_first_gradient`). A hook registered with the previous list finds
        its layer in the new one by name, or is ignored if the layer is not there."""
        if self._current is not None or any(mb.block is not None for mb in self._finished):
            raise RuntimeError("replace_layers after gradients were collected")
        self._use(layers)

    def _use(self, layers: list[CapturedLayer]) -> None:
        """Hook `layers` (their offsets set) from now on, instead of the current ones."""
        self.detach()
        self.layers, self._index_of = layers, {l.name: i for i, l in enumerate(layers)}
        self.dim = sum(l.spec.out_dim for l in layers)
        self.attach()

    def drop_layers(self, names: set[str]) -> None:
        """Stop recording `names`; what the other layers collected is kept, offsets recomputed."""
        keep = [i for i, l in enumerate(self.layers) if l.name not in names]
        new_index = {old: new for new, old in enumerate(keep)}
        if self._current is not None:
            self._current = self._current.select(keep, self.layers)
        self._finished = [mb.select(keep, self.layers) for mb in self._finished]
        self.seen_layers = {new_index[i] for i in self.seen_layers if i in new_index}
        self.batch_mismatch = {}
        kept = [self.layers[i] for i in keep]
        offset = 0
        for l in kept:
            l.offset = offset
            offset += l.spec.out_dim
        self._use(kept)

    def collect(self, row_scales: list[float | torch.Tensor] | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """Per-sample gradients of everything captured since the last collect.

        Returns grads [N, K], micro-batches in order, in `dtype` (default: that of the layers'
        gradients). `row_scales[j]` multiplies micro-batch j (it undoes loss averaging and loss
        scaling), before the cast to `dtype`. A layer that got no gradient in a micro-batch (unused
        in that forward pass) contributes zeros.
        """
        self._close_micro_batch()
        finished, self._finished = self._finished, []
        if self.batch_mismatch:
            i, seen = next(iter(self.batch_mismatch.items()))
            self.batch_mismatch = {}
            raise SampleIdError(
                f"layer {self.layers[i].name!r} saw a batch of {seen} samples, but {finished[-1].rows} "
                "sample ids were given for this micro-batch. The ids must be those of the samples in "
                "the batch, in order (dim 0 of the layer's input).")
        if not finished:
            return torch.zeros(0, self.dim, dtype=dtype or torch.float32)
        ref = next((mb.block for mb in finished if mb.block is not None), None)
        device = ref.device if ref is not None else next(self.layers[0].module.parameters()).device
        blocks = [mb.filled(self.layers, self.dim, dtype, device) for mb in finished]
        if row_scales is not None:
            # in place, in the gradients' dtype: the blocks are this capture's own, made for this
            # step, so no second [N, K] tensor is allocated for the scaled values
            for b, scale in zip(blocks, row_scales, strict=True):
                b.mul_(scale)
        dtype = dtype or blocks[0].dtype
        if len(blocks) == 1:
            return blocks[0].to(dtype)
        # one pass per block: cast into its rows of the result
        out = torch.empty(sum(len(b) for b in blocks), self.dim, dtype=dtype, device=device)
        start = 0
        for b in blocks:
            out[start:start + len(b)].copy_(b)
            start += len(b)
        return out
