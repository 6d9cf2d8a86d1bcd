"""Activations and softmax shared by the towers and the decoder.

MLX's CPU backend evaluates `exp` and `tanh` one scalar at a time, several times slower than
the fused multiply-adds around them; on the CPU these functions use rational / polynomial forms
compiled into one pass (float32 error about 1e-6). On a GPU the exact MLX ops are used.

They are compiled per shape, not shapeless: MLX's shapeless CPU kernels read each constant as a
broadcast array and run several times slower (`benchmarks/` measures the towers that use them).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .layers import on_cpu

# tanh(x) ~ x P(x^2) / Q(x^2) on [-c, c], +-1 beyond: a minimax rational (Eigen's float
# coefficients), max error 3.5e-7 against float64.
_TANH_P = (
    4.89352455891786e-03,
    6.37261928875436e-04,
    1.48572235717979e-05,
    5.12229709037114e-08,
    -8.60467152213735e-11,
    2.00018790482477e-13,
    -2.76076847742355e-16,
)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_TANH_CLAMP = 7.90531110763549805

# exp(x) for x in [-80, 0] as p(x / 64) ** 64: p is a degree-8 least-squares fit of exp on
# [-88/64, 0] (Chebyshev nodes, relative error 7e-10); six squarings bring the float32 error
# to ~1e-6 relative. Below -80 the result is 0 (true value < 2e-35): staying clear of float32
# denormals, whose arithmetic is ~100x slower on x86, matters for masked attention scores.
_EXP_SQUARINGS = 6
_EXP_FLOOR = -80.0
_EXP_AT_FLOOR = 1.81e-35  # just above what the polynomial gives at the floor
_EXP_P = (
    0.9999999998054048,
    0.9999999768827164,
    0.4999995469781607,
    0.1666632383270814,
    0.041653610498584154,
    0.008305196575420271,
    0.001352807793522243,
    0.00017074801513820674,
    1.2635728415886912e-05,
)
_SQRT_2_OVER_PI = 0.7978845608028654


def _polynomial(x: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    out = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        out = out * x + c
    return out


@mx.compile
def fast_tanh(x: mx.array) -> mx.array:
    """tanh in float32 (whatever the input dtype: the coefficients underflow in float16)."""
    x = mx.clip(x.astype(mx.float32), -_TANH_CLAMP, _TANH_CLAMP)
    squared = x * x
    return x * _polynomial(squared, _TANH_P) / _polynomial(squared, _TANH_Q)


@mx.compile
def _exp_nonpositive(x: mx.array) -> mx.array:
    out = _polynomial(mx.maximum(x, _EXP_FLOOR) * (1.0 / 2**_EXP_SQUARINGS), _EXP_P)
    for _ in range(_EXP_SQUARINGS):
        out = out * out
    # exactly 0 at and below the floor (where the polynomial gives 1.8048e-35); a select here
    # would cost as much as the polynomial in MLX's compiled CPU kernels
    return mx.maximum(out - _EXP_AT_FLOOR, 0.0)


def _fast_softmax(x: mx.array) -> mx.array:
    # the max and the sum stay outside the compiled exp, whose input is then contiguous
    x = x.astype(mx.float32)
    e = _exp_nonpositive(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# Gradients (LoRA training) of the fast forms are written out: differentiated op by op, the
# polynomial forms would keep a dozen full-size intermediates alive for the backward pass.


@mx.custom_function
def _trainable_fast_softmax(x: mx.array) -> mx.array:
    return _fast_softmax(x)


@_trainable_fast_softmax.vjp
def _fast_softmax_vjp(primals, cotangent, output):
    cotangent = cotangent.astype(mx.float32)
    grad = output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))
    return (grad.astype(primals[0].dtype),)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, in float32."""
    if on_cpu():
        return _trainable_fast_softmax(x)
    return mx.softmax(x.astype(mx.float32), axis=-1)


@mx.compile
def _softcap_fast(x: mx.array, cap: mx.array) -> mx.array:
    return (fast_tanh(x / cap) * cap).astype(x.dtype)


@mx.custom_function
def _trainable_softcap(x: mx.array, cap: mx.array) -> mx.array:
    return _softcap_fast(x, cap)


@_trainable_softcap.vjp
def _softcap_vjp(primals, cotangent, output):
    x, cap = primals
    squashed = output.astype(mx.float32) / cap
    grad = cotangent.astype(mx.float32) * (1.0 - squashed * squashed)
    return grad.astype(x.dtype), mx.zeros_like(cap)


def softcap(x: mx.array, cap: float) -> mx.array:
    """cap * tanh(x / cap): one fused pass on the CPU, where `mx.tanh` over a 262k-wide row of
    logits is a visible part of a decode step."""
    if on_cpu():
        return _trainable_softcap(x, mx.array(cap, dtype=mx.float32))
    return mx.tanh(x / cap) * cap


@mx.compile
def _geglu_exact(gate: mx.array, up: mx.array) -> mx.array:
    # fused into one kernel, so float32 costs no memory traffic and rounds once
    return (nn.gelu_approx(gate.astype(mx.float32)) * up.astype(mx.float32)).astype(up.dtype)


@mx.compile
def _geglu_fast(gate: mx.array, up: mx.array) -> mx.array:
    g = gate.astype(mx.float32)
    inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
    return (0.5 * g * (1.0 + fast_tanh(inner)) * up).astype(up.dtype)


@mx.compile
def _geglu_grads(gate: mx.array, up: mx.array, cotangent: mx.array) -> tuple[mx.array, mx.array]:
    g, c = gate.astype(mx.float32), cotangent.astype(mx.float32)
    t = fast_tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g))
    slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (
        1.0 + 3 * 0.044715 * g * g
    )
    d_gate = c * up.astype(mx.float32) * slope
    return d_gate.astype(gate.dtype), (c * 0.5 * g * (1.0 + t)).astype(up.dtype)


@mx.custom_function
def _trainable_geglu_fast(gate: mx.array, up: mx.array) -> mx.array:
    return _geglu_fast(gate, up)


@_trainable_geglu_fast.vjp
def _geglu_fast_vjp(primals, cotangent, output):
    return _geglu_grads(*primals, cotangent)


def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """tanh-approximate GELU of `gate` times `up`, in one fused pass."""
    return _trainable_geglu_fast(gate, up) if on_cpu() else _geglu_exact(gate, up)


@mx.compile
def fast_silu(x: mx.array) -> mx.array:
    return (x * (0.5 + 0.5 * fast_tanh(0.5 * x))).astype(x.dtype)


@mx.compile
def _gated(values: mx.array, gates: mx.array) -> mx.array:
    return (values * (0.5 + 0.5 * fast_tanh(0.5 * gates))).astype(values.dtype)


def fast_glu(x: mx.array) -> mx.array:
    """GLU over the last axis: first half times the sigmoid of the second half."""
    values, gates = mx.split(x, 2, axis=-1)
    return _gated(values, gates)
