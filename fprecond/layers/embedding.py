"""``nn.Embedding``: a linear map of one-hot token vectors, shared over positions.

The weight ``(V, D)`` is the transposed matrix of the layout (``O = D``,
``S = V``). The one-hot row of ``padding_idx`` is zero, as the gradient of that
row is. ``max_norm`` (which rewrites the weight in the forward pass) and
``scale_grad_by_freq`` (which changes the gradient) are rejected. The one-hot
inputs take ``N·P·V`` memory: fine for the vocabularies this code targets.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fprecond.layers.base import LayerForm
from fprecond.layers.layout import MatrixLayout
from fprecond.modeling import Layer


class EmbeddingForm(LayerForm):
    def validate(self, layer: Layer) -> None:
        module: Any = layer.module
        if module.max_norm is not None:
            raise ValueError(f"embedding {layer.name!r}: max_norm renormalises the weight in place; not supported")
        if module.scale_grad_by_freq:
            raise ValueError(f"embedding {layer.name!r}: scale_grad_by_freq changes the gradient; not supported")

    def layout(self, layer: Layer) -> MatrixLayout:
        module: Any = layer.module
        vocab, dim = module.weight.shape
        return MatrixLayout("columns", layer.weight, None, (vocab, dim), 1, dim, vocab)

    def features(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        return x

    def inputs(self, layer: Layer, features: torch.Tensor) -> torch.Tensor:
        module: Any = layer.module
        n = features.shape[0]
        one_hot = F.one_hot(features.reshape(n, -1).long(), module.num_embeddings).to(module.weight.dtype)
        if module.padding_idx is not None:
            keep = torch.ones(module.num_embeddings, dtype=one_hot.dtype, device=one_hot.device)
            one_hot = one_hot * keep.index_fill(0, torch.tensor([module.padding_idx], device=keep.device), 0.0)
        return one_hot.unsqueeze(2)

    def output_grads(self, layer: Layer, grads: torch.Tensor) -> torch.Tensor:
        k, n, d = grads.shape[0], grads.shape[1], grads.shape[-1]
        return grads.reshape(k, n, -1, 1, d)
