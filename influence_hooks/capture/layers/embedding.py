"""nn.Embedding: G_n = sum_t onehot(id_t) grad_out_t^T, i.e. L = one-hot(ids) (num_embeddings),
R = grad_out (embedding_dim).

The one-hot factor is never materialised when projected: ``onehot(ids) P_L^T`` is a gather of
columns of ``P_L``. The ``padding_idx`` row gets zero gradient, as in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influence_hooks.capture.rules import (
    BilinearRule,
    UnsupportedModuleError,
    compute_dtype,
    row_projector,
    register_rule,
)


@register_rule(nn.Embedding)
class EmbeddingRule(BilinearRule):
    name = "embedding"
    grad_side = "right"
    param_names = ("weight",)

    def check(self, module: nn.Embedding) -> None:
        if module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                "cannot capture per-sample gradients of Embedding(scale_grad_by_freq=True): its "
                "gradient divides by token counts over the whole batch, so samples are mixed; "
                "use scale_grad_by_freq=False"
            )
        if module.sparse:
            raise UnsupportedModuleError(
                "cannot capture per-sample gradients of Embedding(sparse=True): use sparse=False "
                "(per-sample capture builds dense per-sample gradients or projections anyway)"
            )

    def factor_dims(self, module: nn.Embedding) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def canonical_index(self, module: nn.Embedding) -> Tensor:
        return torch.arange(module.num_embeddings * module.embedding_dim)

    def _ids_and_grads(self, module, inputs, grad_output, dtype) -> tuple[Tensor, Tensor]:
        """ids ``[N, T]`` and grad_out ``[N, T, D]`` in ``dtype``, zero where the id is ``padding_idx``."""
        n = grad_output.shape[0]
        ids = inputs[0].reshape(n, -1).long()
        go = grad_output.reshape(n, -1, module.embedding_dim).to(dtype)
        if module.padding_idx is not None:
            go = go.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
        return ids, go

    def exact(self, module, inputs, output, grad_output):
        ids, go = self._ids_and_grads(module, inputs, grad_output, compute_dtype(module, grad_output))
        n, d = go.shape[0], module.embedding_dim
        g = go.new_zeros(n, module.num_embeddings, d)
        g.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, d), go)
        return g.reshape(n, -1)

    def bind(self, module, p_left, p_right, dtype):
        rows_of = None if p_left is None else p_left.T.contiguous()  # onehot(i) P_L^T is row i of P_L^T
        right = row_projector(p_right)

        def factors(inputs, grad_output):
            ids, go = self._ids_and_grads(module, inputs, grad_output, dtype)
            left = F.one_hot(ids, module.num_embeddings).to(dtype) if rows_of is None else rows_of[ids]
            return left, right(go)

        return factors
