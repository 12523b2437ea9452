"""``nn.Conv1d`` and ``nn.Conv2d`` with stride, padding (any mode), dilation and groups.

The input is padded as the module pads it, then unfolded into patches
(``F.unfold``): ``P`` output locations share the kernel, and each of the
``groups`` channel groups is a group of the layout, with ``S = C_in/groups ·
prod(kernel)`` inputs (plus the homogeneous coordinate for the bias) and
``O = C_out/groups`` outputs. The patch order (channel, then kernel rows, then
kernel columns) matches the row-major flattening of the weight.
"""

from __future__ import annotations

import math

from typing import Any

import torch
import torch.nn.functional as F

from fprecond.layers import contractions
from fprecond.layers.base import LayerForm, append_homogeneous
from fprecond.layers.contractions import KronApprox
from fprecond.layers.layout import MatrixLayout
from fprecond.modeling import Layer


class ConvForm(LayerForm):
    always_shared = True

    def __init__(self, spatial_dims: int) -> None:
        self.spatial_dims = spatial_dims

    def validate(self, layer: Layer) -> None:
        if layer.weight is None:
            raise ValueError(f"convolution {layer.name!r}: a bias without a weight is not supported")

    def layout(self, layer: Layer) -> MatrixLayout:
        module: Any = layer.module
        shape = tuple(module.weight.shape)
        groups = module.groups
        per_group_inputs = math.prod(shape[1:])
        return MatrixLayout("rows", layer.weight, layer.bias, shape, groups, shape[0] // groups,
                            per_group_inputs + int(layer.bias is not None))

    def features(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        if module.padding_mode == "zeros":
            return F.pad(x, module._reversed_padding_repeated_twice)
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)

    def _patches(self, layer: Layer, features: torch.Tensor) -> torch.Tensor:
        """``(N, C_in·prod(kernel), P)`` patches of the padded input (``F.unfold`` layout)."""
        module: Any = layer.module
        x = features
        kernel: tuple[int, ...] = module.kernel_size
        stride: tuple[int, ...] = module.stride
        dilation: tuple[int, ...] = module.dilation
        if self.spatial_dims == 1:
            x = x.unsqueeze(-2)
            kernel, stride, dilation = (1, kernel[0]), (1, stride[0]), (1, dilation[0])
        return F.unfold(x, kernel, dilation=dilation, padding=0, stride=stride)

    def inputs(self, layer: Layer, features: torch.Tensor) -> torch.Tensor:
        module: Any = layer.module
        patches = self._patches(layer, features)
        n = patches.shape[0]
        patches = patches.transpose(1, 2).reshape(n, patches.shape[2], module.groups, -1)
        return append_homogeneous(patches, layer.bias is not None)

    def kronecker_factors(self, layer: Layer, features: torch.Tensor, grads: torch.Tensor,
                          approx: KronApprox) -> tuple[torch.Tensor, torch.Tensor]:
        # Gram matrices over (example, position) with the long dimension last and
        # contiguous: cheaper than the (N, P, G, S) view, which copies transposed patches.
        module: Any = layer.module
        groups = module.groups
        patches = self._patches(layer, features)  # (N, G·S, P)
        n, _, positions = patches.shape
        patches = patches.reshape(n, groups, -1, positions)
        k = grads.shape[0]
        out_grads = grads.reshape(k, n, groups, -1, positions)  # (K, N, G, O, P)
        if approx == "expand":
            columns = patches.permute(1, 2, 0, 3).reshape(groups, patches.shape[2], n * positions)
            a = contractions.gram_with_bias(columns, layer.bias is not None, n * positions)
            g_columns = out_grads.permute(2, 3, 0, 1, 4).reshape(groups, out_grads.shape[3], -1)
        else:
            columns = patches.mean(dim=-1).permute(1, 2, 0)  # (G, S, N)
            a = contractions.gram_with_bias(columns, layer.bias is not None, n)
            g_columns = out_grads.sum(dim=-1).permute(2, 3, 0, 1).reshape(groups, out_grads.shape[3], -1)
        return a, g_columns @ g_columns.transpose(-1, -2)

    def output_grads(self, layer: Layer, grads: torch.Tensor) -> torch.Tensor:
        k, n, channels = grads.shape[0], grads.shape[1], grads.shape[2]
        groups: int = layer.module.groups  # type: ignore[assignment]
        flat = grads.reshape(k, n, channels, -1).transpose(2, 3)  # (K, N, P, C_out)
        return flat.reshape(k, n, flat.shape[2], groups, channels // groups)
