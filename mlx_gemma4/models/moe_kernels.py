"""The expert gather of the MoE block: fused Metal kernels for decode, a pure-MLX twin elsewhere.

Both compute, for each token t with top-k experts e_j and router weights w_j,

    out[t] = sum_j w_j * down[e_j] @ (gelu_tanh(gate[e_j] @ x[t]) * (up[e_j] @ x[t]))

where `gate` and `up` are the first and second halves of the rows of `gate_up_proj`.

The twin is what the model always ran: `gather_qmm` / `gather_mm` per projection, with tokens
sorted by expert for large batches (prefill). It runs off Metal and is the tests' reference.

The Metal path is two kernels launched back to back:

1. `gate_up`: one simdgroup per 4 inner features of one (token, expert) pair. It dequantizes
   the expert's gate and up rows on the fly, dots them with the token, applies GeGLU and writes
   the activated inner vector to a small `[tokens, k, inner]` float32 buffer.
2. `down`: one simdgroup per 4 hidden features of one token. It loops over the token's k
   experts, dots each expert's down rows with that activated vector, weights by the router
   weight and sums in registers, writing only the `[tokens, hidden]` output.

The `[tokens, k, inner]` buffer (22 KB per token at 26B-A4B shapes, against ~27 MB of 4-bit
expert weights read per token) is the only intermediate in device memory; the twin also
materializes `[tokens, k, 2 * inner]` gate/up outputs and `[tokens, k, hidden]` per-expert
outputs. One kernel per (token, expert) holding the inner vector in threadgroup memory would
avoid even that buffer, but it leaves a decode step with only k threadgroups to read all the
weights, far fewer than a GPU's cores, so the split is the faster shape for a bandwidth-bound
step. No atomics are needed: each output element is summed by one simdgroup, in a fixed order.

`MLX_GEMMA4_MOE_KERNEL=auto|metal|twin` picks the path. `auto` (the default) runs the kernels on
Metal for decode-sized batches (fewer than `SORT_THRESHOLD` token-expert pairs) when the
weights are supported, else the twin; `metal` runs the kernels for every batch and fails
clearly where they cannot run; `twin` always runs the twin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import MoEKernelError
from .activations import geglu

KERNEL_ENV = "MLX_GEMMA4_MOE_KERNEL"
CHOICES = ("auto", "metal", "twin")

# Below this many (token, expert) pairs the unsorted gather is faster than sorting by expert.
SORT_THRESHOLD = 64

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)

# Launch shape, shared by both kernels: SIMDGROUPS simdgroups of SIMD_WIDTH lanes per
# threadgroup, each simdgroup producing ROWS output features.
SIMD_WIDTH = 32
SIMDGROUPS = 2
ROWS = 4
# Unquantized weights are read DENSE_CHUNK values per lane per step.
DENSE_CHUNK = 4


# ----------------------------------------------------------------------------- dispatch


def kernel_choice() -> str:
    """The path `MLX_GEMMA4_MOE_KERNEL` asks for (read on every call, so tests can set it)."""
    value = os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise MoEKernelError(f"{KERNEL_ENV}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def experts_forward(
    x: mx.array, indices: mx.array, weights: mx.array, gate_up: nn.Module, down: nn.Module
) -> mx.array:
    """x: [N, hidden]; indices, weights: [N, k] -> [N, hidden], by the path the env var picks."""
    choice = kernel_choice()
    if choice == "twin":
        return experts_twin(x, indices, weights, gate_up, down)
    reason = metal_unsupported_reason(x, gate_up, down)
    if choice == "metal":
        if reason:
            raise MoEKernelError(f"{KERNEL_ENV}=metal, but {reason}")
        return experts_metal(x, indices, weights, gate_up, down)
    if reason is None and indices.size < SORT_THRESHOLD:
        return experts_metal(x, indices, weights, gate_up, down)
    return experts_twin(x, indices, weights, gate_up, down)


def is_quantized(projection: nn.Module) -> bool:
    return "scales" in projection


def metal_unsupported_reason(x: mx.array, gate_up: nn.Module, down: nn.Module) -> str | None:
    """Why the fused kernels cannot run these weights here, or None when they can."""
    if not mx.metal.is_available():
        return f"this MLX has no Metal backend (it runs on {mx.default_device()}); use twin or auto"
    if mx.default_device() != mx.gpu:
        return "the default device is the CPU; the kernels run on the GPU only"
    if x.dtype not in FLOAT_TYPES:
        return f"the activations are {x.dtype}, not a float type"
    quantized = is_quantized(gate_up)
    if quantized != is_quantized(down):
        return "gate_up_proj and down_proj must be both quantized or both unquantized"
    for name, projection in (("gate_up_proj", gate_up), ("down_proj", down)):
        in_dims = projection.weight.shape[-1]
        if not quantized:
            if projection.weight.dtype not in FLOAT_TYPES or in_dims % DENSE_CHUNK:
                return (
                    f"{name} is {projection.weight.dtype} with input size {in_dims}; unquantized "
                    f"weights must be a float type with an input size divisible by {DENSE_CHUNK}"
                )
            continue
        bits, group = projection.bits, projection.group_size
        if projection.mode != "affine" or "biases" not in projection:
            return f"{name} uses {projection.mode} quantization; the kernels support affine only"
        if bits not in SUPPORTED_BITS or group not in SUPPORTED_GROUPS:
            return (
                f"{name} is {bits}-bit with group size {group}; the kernels support bits "
                f"{SUPPORTED_BITS} and group sizes {SUPPORTED_GROUPS}"
            )
    return None


# ----------------------------------------------------------------------------- twin


def experts_twin(
    x: mx.array, indices: mx.array, weights: mx.array, gate_up: nn.Module, down: nn.Module
) -> mx.array:
    """The pure-MLX expert path: gathered matmuls, sorted by expert for large batches.

    `gate_up` and `down` are called as `projection(x, indices, sorted_indices)` (an
    `ExpertLinear` or `QuantizedExpertLinear`).
    """
    n_tokens, k = indices.shape
    by_expert = indices.size >= SORT_THRESHOLD
    if by_expert:
        flat = indices.flatten()
        order = mx.argsort(flat)
        inverse = mx.argsort(order)
        x = x[order // k][:, None, :]
        indices = flat[order]
    else:
        x = x[:, None, None, :]
    gate, up = mx.split(gate_up(x, indices, by_expert), 2, axis=-1)
    y = down(geglu(gate, up), indices, by_expert)
    y = y[inverse].reshape(n_tokens, k, -1) if by_expert else y.squeeze(-2)
    # the routing weights stay float32 and the k experts are summed before one rounding
    return (y * weights[..., None].astype(mx.float32)).sum(axis=1).astype(y.dtype)


# ----------------------------------------------------------------------------- Metal kernels

_HEADER = """
// GELU, tanh approximation (as nn.gelu_approx). The argument is clamped so that tanh never
// sees a huge value, whatever math mode the library is compiled in; tanh(10) is 1.0f.
inline float gelu_tanh(float v) {
  const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
  return 0.5f * v * (1.0f + metal::tanh(metal::clamp(inner, -10.0f, 10.0f)));
}

// One packed uint32 word (32 / BITS values, lowest bits first, as mx.quantize packs them)
// dotted with the matching inputs: scale * sum(q * x) + bias * sum(x).
template <int BITS>
inline float dot_word(uint32_t word, thread const float* xs, float xsum, float scale, float bias) {
  constexpr int PACK = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  float acc = 0.0f;
  for (int j = 0; j < PACK; j++) {
    acc += float((word >> (BITS * j)) & MASK) * xs[j];
  }
  return scale * acc + bias * xsum;
}
"""

# Each lane walks the input dimension one chunk at a time: chunk c is packed word c of a row
# (32 / BITS values) when quantized, values [c * DENSE_CHUNK, (c + 1) * DENSE_CHUNK) when not.
_QUANTIZED = dict(
    constants="""
  constexpr int PACK = 32 / BITS;
  constexpr int CHUNKS = IN_DIMS / PACK;     // words per weight row
  constexpr int GROUPS = IN_DIMS / GROUP;    // scales (and biases) per weight row
""",
    row_dot="""dot_word<BITS>(
            w[row * CHUNKS + c], xs, xsum,
            float(scales[row * GROUPS + c * PACK / GROUP]),
            float(biases[row * GROUPS + c * PACK / GROUP]))""",
    inputs=["w", "scales", "biases"],
)
_DENSE = dict(
    constants=f"""
  constexpr int PACK = {DENSE_CHUNK};
  constexpr int CHUNKS = IN_DIMS / PACK;
""",
    row_dot="""dense_dot(w, row * IN_DIMS + c * PACK, xs)""",
    inputs=["w"],
)
_DENSE_HEADER = f"""
template <typename W>
inline float dense_dot(const device W* w, ulong start, thread const float* xs) {{
  float acc = 0.0f;
  for (int j = 0; j < {DENSE_CHUNK}; j++) {{
    acc += float(w[start + j]) * xs[j];
  }}
  return acc;
}}
"""

# Kernel 1. Grid: x = blocks of ROWS * SIMDGROUPS inner features, y = (token, expert) pairs.
# IN_DIMS = hidden; weight rows [expert * 2 * INNER + i] (gate) and [... + INNER + i] (up).
_GATE_UP_BODY = """
  {constants}
  const int lane = int(thread_index_in_simdgroup);
  const uint pair = threadgroup_position_in_grid.y;
  const int first = int(threadgroup_position_in_grid.x * SIMDGROUPS
                        + simdgroup_index_in_threadgroup) * ROWS;
  const ulong gate_row = ulong(indices[pair]) * (2 * INNER);
  const ulong x_start = ulong(pair / TOP_K) * IN_DIMS;

  float gate[ROWS] = {{0.0f}};
  float up[ROWS] = {{0.0f}};
  for (int c = lane; c < CHUNKS; c += SIMD_WIDTH) {{
    float xs[PACK];
    float xsum = 0.0f;
    for (int j = 0; j < PACK; j++) {{
      xs[j] = float(x[x_start + c * PACK + j]);
      xsum += xs[j];
    }}
    for (int r = 0; r < ROWS; r++) {{
      if (first + r >= INNER) break;  // the same for every lane of the simdgroup
      ulong row = gate_row + first + r;
      gate[r] += {row_dot};
      row += INNER;
      up[r] += {row_dot};
    }}
  }}
  for (int r = 0; r < ROWS; r++) {{
    const float g = simd_sum(gate[r]);
    const float u = simd_sum(up[r]);
    if (lane == 0 && first + r < INNER) {{
      activated[ulong(pair) * INNER + first + r] = gelu_tanh(g) * u;
    }}
  }}
"""

# Kernel 2. Grid: x = blocks of ROWS * SIMDGROUPS hidden features, y = tokens.
# IN_DIMS = inner; weight rows [expert * HIDDEN + h].
_DOWN_BODY = """
  {constants}
  const int lane = int(thread_index_in_simdgroup);
  const uint token = threadgroup_position_in_grid.y;
  const int first = int(threadgroup_position_in_grid.x * SIMDGROUPS
                        + simdgroup_index_in_threadgroup) * ROWS;

  float total[ROWS] = {{0.0f}};
  for (int k = 0; k < TOP_K; k++) {{
    const uint pair = token * TOP_K + k;
    const ulong expert_row = ulong(indices[pair]) * HIDDEN;
    const ulong a_start = ulong(pair) * IN_DIMS;
    float partial[ROWS] = {{0.0f}};
    for (int c = lane; c < CHUNKS; c += SIMD_WIDTH) {{
      float xs[PACK];
      float xsum = 0.0f;
      for (int j = 0; j < PACK; j++) {{
        xs[j] = activated[a_start + c * PACK + j];
        xsum += xs[j];
      }}
      for (int r = 0; r < ROWS; r++) {{
        if (first + r >= HIDDEN) break;  // the same for every lane of the simdgroup
        const ulong row = expert_row + first + r;
        partial[r] += {row_dot};
      }}
    }}
    const float weight = weights[pair];
    for (int r = 0; r < ROWS; r++) {{
      total[r] += weight * partial[r];
    }}
  }}
  for (int r = 0; r < ROWS; r++) {{
    const float sum = simd_sum(total[r]);
    if (lane == 0 && first + r < HIDDEN) {{
      out[ulong(token) * HIDDEN + first + r] = static_cast<T>(sum);
    }}
  }}
"""


def kernel_source(stage: str, quantized: bool) -> str:
    """The Metal body of `stage` ("gate_up" or "down") for quantized or float weights."""
    parts = _QUANTIZED if quantized else _DENSE
    body = _GATE_UP_BODY if stage == "gate_up" else _DOWN_BODY
    return body.format(constants=parts["constants"], row_dot=parts["row_dot"])


def kernel_header(quantized: bool) -> str:
    return _HEADER + ("" if quantized else _DENSE_HEADER)


def kernel_names(stage: str, quantized: bool) -> tuple[list[str], list[str]]:
    """(input names, output names) of `stage`, in the order its inputs are passed."""
    weights = _QUANTIZED["inputs"] if quantized else _DENSE["inputs"]
    if stage == "gate_up":
        return ["x", "indices", *weights], ["activated"]
    return ["activated", "indices", "weights", *weights], ["out"]


@cache
def _kernel(stage: str, quantized: bool):
    input_names, output_names = kernel_names(stage, quantized)
    return mx.fast.metal_kernel(
        name=f"gemma4_moe_{stage}_{'quantized' if quantized else 'dense'}",
        input_names=input_names,
        output_names=output_names,
        source=kernel_source(stage, quantized),
        header=kernel_header(quantized),
    )


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its inputs (None stands for the previous launch's output)."""

    stage: str
    quantized: bool
    inputs: list[mx.array | None]
    template: list[tuple[str, Any]]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shape: tuple[int, ...]
    output_dtype: mx.Dtype


def launch_shape(features: int, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, threadgroup) in threads: x covers `features` in blocks, y is the batch."""
    per_group = ROWS * SIMDGROUPS
    blocks = -(-features // per_group)
    threads = SIMDGROUPS * SIMD_WIDTH
    return (blocks * threads, batch, 1), (threads, 1, 1)


def _weight_inputs(projection: nn.Module) -> list[mx.array]:
    if is_quantized(projection):
        return [projection.weight, projection.scales, projection.biases]
    return [projection.weight]


def _shared_template(projection: nn.Module, in_dims: int) -> list[tuple[str, Any]]:
    template = [("IN_DIMS", in_dims), ("ROWS", ROWS), ("SIMDGROUPS", SIMDGROUPS)]
    template.append(("SIMD_WIDTH", SIMD_WIDTH))
    if is_quantized(projection):
        template += [("BITS", projection.bits), ("GROUP", projection.group_size)]
    return template


def plan_launches(
    x: mx.array, indices: mx.array, weights: mx.array, gate_up: nn.Module, down: nn.Module
) -> tuple[Launch, Launch]:
    """The two launches of the Metal path, with every constant they are compiled with."""
    n_tokens, k = indices.shape
    hidden = x.shape[-1]
    inner = gate_up.weight.shape[-2] // 2
    quantized = is_quantized(gate_up)
    indices = indices.astype(mx.uint32)
    gate_up_launch = Launch(
        "gate_up",
        quantized,
        [x, indices, *_weight_inputs(gate_up)],
        [*_shared_template(gate_up, hidden), ("INNER", inner), ("TOP_K", k)],
        *launch_shape(inner, n_tokens * k),
        (n_tokens, k, inner),
        mx.float32,
    )
    down_launch = Launch(
        "down",
        quantized,
        [None, indices, weights.astype(mx.float32), *_weight_inputs(down)],
        [("T", x.dtype), *_shared_template(down, inner), ("HIDDEN", hidden), ("TOP_K", k)],
        *launch_shape(hidden, n_tokens),
        (n_tokens, hidden),
        x.dtype,
    )
    return gate_up_launch, down_launch


def experts_metal(
    x: mx.array, indices: mx.array, weights: mx.array, gate_up: nn.Module, down: nn.Module
) -> mx.array:
    """The fused Metal path (see the module docstring); call `experts_forward` to dispatch."""
    previous = None
    for launch in plan_launches(x, indices, weights, gate_up, down):
        (previous,) = _kernel(launch.stage, launch.quantized)(
            inputs=[previous if a is None else a for a in launch.inputs],
            template=launch.template,
            grid=launch.grid,
            threadgroup=launch.threadgroup,
            output_shapes=[launch.output_shape],
            output_dtypes=[launch.output_dtype],
        )
    return previous
