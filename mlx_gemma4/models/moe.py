"""Mixture of experts (26B-A4B): the router and the expert projections, gathered per token."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import TextConfig
from .layers import Linear, on_cpu
from .moe_kernels import SORT_THRESHOLD, experts_forward

__all__ = ["SORT_THRESHOLD", "ExpertLinear", "Experts", "QuantizedExpertLinear", "Router"]


class Router(nn.Module):
    """Scores experts on the un-normed residual; returns top-k indices and their weights."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.top_k = config.top_k_experts
        self.eps = config.rms_norm_eps
        self.root_size = config.hidden_size**-0.5
        self.proj = Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = mx.ones((config.hidden_size,))
        self.per_expert_scale = mx.ones((config.num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        # in float32 end to end (a float32 input promotes the projection): in bfloat16 close
        # scores round to ties and flip which experts a token reaches
        scale = self.scale.astype(mx.float32) * self.root_size
        x = mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps)
        scores = self.proj(x).astype(mx.float32)
        indices = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        indices = mx.stop_gradient(indices)  # a choice, not a value: training differentiates
        # through the chosen experts' weights, and MLX refuses a gradient through gather indices
        # softmax over the top-k scores == softmax over all, renormalized over the top k
        weights = mx.softmax(mx.take_along_axis(scores, indices, axis=-1), axis=-1)
        weights = weights * self.per_expert_scale[indices].astype(mx.float32)
        return indices, weights


def _gather_matmul_cpu_fallback(
    x: mx.array, weight: mx.array, indices: mx.array, sorted_indices: bool
) -> mx.array:
    """gather_mm for weights MLX's CPU backend cannot gather (it is float32-only there).

    Only the experts the batch uses are cast to float32, so a bfloat16 model never holds a
    float32 copy of all its experts.
    """
    used, remapped = np.unique(np.array(indices), return_inverse=True)
    local_weight = weight[mx.array(used)].astype(mx.float32)
    local_indices = mx.array(remapped.reshape(indices.shape).astype(np.uint32))
    out = mx.gather_mm(
        x.astype(mx.float32),
        local_weight.swapaxes(-1, -2),
        rhs_indices=local_indices,
        sorted_indices=sorted_indices,
    )
    return out.astype(x.dtype)


class ExpertLinear(nn.Module):
    """`num_experts` bias-free linears stored as one `[experts, out, in]` weight."""

    def __init__(self, num_experts: int, input_dims: int, output_dims: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if on_cpu() and self.weight.dtype != mx.float32:
            return _gather_matmul_cpu_fallback(x, self.weight, indices, sorted_indices)
        return mx.gather_mm(
            x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )

    def to_quantized(
        self, group_size: int = 64, bits: int = 4, mode: str = "affine"
    ) -> QuantizedExpertLinear:
        return QuantizedExpertLinear(self.weight, group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    """An `ExpertLinear` with its weight packed by `mx.quantize`, applied with `gather_qmm`."""

    def __init__(self, weight: mx.array, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        packed = mx.quantize(weight, group_size=group_size, bits=bits, mode=mode)
        self.weight, self.scales = packed[0], packed[1]
        if len(packed) > 2:
            self.biases = packed[2]
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


class Experts(nn.Module):
    """GeGLU experts; `gate_up_proj` holds gate then up rows, as the checkpoint stores them."""

    def __init__(self, config: TextConfig):
        super().__init__()
        experts, hidden, inner = (
            config.num_experts,
            config.hidden_size,
            config.moe_intermediate_size,
        )
        self.gate_up_proj = ExpertLinear(experts, hidden, 2 * inner)
        self.down_proj = ExpertLinear(experts, inner, hidden)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x: [N, hidden]; indices, weights: [N, k] -> [N, hidden].

        Fused Metal kernels for decode on Metal, the pure-MLX twin elsewhere (moe_kernels.py).
        """
        return experts_forward(x, indices, weights, self.gate_up_proj, self.down_proj)
