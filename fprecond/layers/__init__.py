"""Per-layer-type curvature math (one module per layer type) on a shared grouped-matrix view."""

from __future__ import annotations

from fprecond.layers.base import LayerForm
from fprecond.layers.batchnorm import BatchNormForm
from fprecond.layers.conv import ConvForm
from fprecond.layers.embedding import EmbeddingForm
from fprecond.layers.layernorm import LayerNormForm
from fprecond.layers.layout import MatrixLayout, flat_index_matrix, from_matrix, to_matrix
from fprecond.layers.linear import LinearForm
from fprecond.modeling import Layer

__all__ = ["LayerForm", "MatrixLayout", "form_of", "flat_index_matrix", "from_matrix", "to_matrix"]

_FORMS: dict[str, LayerForm] = {
    "linear": LinearForm(),
    "conv1d": ConvForm(1),
    "conv2d": ConvForm(2),
    "embedding": EmbeddingForm(),
    "layernorm": LayerNormForm(),
    "batchnorm": BatchNormForm(),
}


def form_of(layer: Layer) -> LayerForm:
    """The math of ``layer``'s type."""
    return _FORMS[layer.kind]
