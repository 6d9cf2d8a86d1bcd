"""The MoE expert gather: the twin against a naive loop, the dispatch, and the Metal kernels.

The Metal kernels cannot run off Metal. Their indexing is checked here by `emulate_metal`, a
numpy transcription of the two kernels' loops (threadgroups, simdgroups, lanes, packed words,
scale groups), against the twin; on Metal the real kernels are compared with the twin.
"""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from conftest import relative_error

from mlx_gemma4.models import moe_kernels
from mlx_gemma4.models.moe import ExpertLinear, QuantizedExpertLinear
from mlx_gemma4.models.moe_kernels import (
    DENSE_CHUNK,
    KERNEL_ENV,
    ROWS,
    SIMD_WIDTH,
    SIMDGROUPS,
    SORT_THRESHOLD,
    MoEKernelError,
    experts_forward,
    experts_metal,
    experts_twin,
    launch_shape,
    metal_unsupported_reason,
)

ON_METAL = mx.metal.is_available()
NOT_METAL = "needs MLX's Metal backend (Apple GPU); this machine runs the MLX CPU backend"


def routing(tokens: int, experts: int, k: int, seed: int = 0):
    """k distinct experts per token and positive weights, as the router gives them."""
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)]).astype(np.uint32)
    weights = rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)
    return mx.array(indices), mx.array(weights)


def projections(experts: int, hidden: int, inner: int, quantization=None, seed: int = 0):
    """(gate_up, down) expert linears; quantization: (bits, group_size) or None for float32."""
    mx.random.seed(seed)
    gate_up, down = ExpertLinear(experts, hidden, 2 * inner), ExpertLinear(experts, inner, hidden)
    if quantization is None:
        return gate_up, down
    bits, group = quantization
    return gate_up.to_quantized(group, bits), down.to_quantized(group, bits)


def dense_weight(projection) -> np.ndarray:
    if "scales" not in projection:
        return np.array(projection.weight)
    return np.array(
        mx.dequantize(
            projection.weight,
            projection.scales,
            projection.biases,
            group_size=projection.group_size,
            bits=projection.bits,
        )
    )


def gelu_tanh(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))


def naive(x, indices, weights, gate_up, down) -> np.ndarray:
    """One expert at a time, in float64, on the (dequantized) weights."""
    gate_up_w, down_w = dense_weight(gate_up).astype(np.float64), dense_weight(down)
    x, indices, weights = np.array(x, np.float64), np.array(indices), np.array(weights)
    inner = gate_up_w.shape[1] // 2
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(indices[t]):
            projected = gate_up_w[e] @ x[t]
            activated = gelu_tanh(projected[:inner]) * projected[inner:]
            out[t] += weights[t, j] * (down_w[e].astype(np.float64) @ activated)
    return out


# ----------------------------------------------------------------------------- twin


@pytest.mark.parametrize("tokens", [1, 3, 70])  # 70 tokens: the sorted-by-expert path
@pytest.mark.parametrize("k", [1, 2, 8])
def test_float_twin_matches_naive_loop(tokens, k):
    gate_up, down = projections(12, 48, 40)
    x = mx.random.normal((tokens, 48))
    indices, weights = routing(tokens, 12, k)
    ours = experts_twin(x, indices, weights, gate_up, down)
    assert ours.shape == (tokens, 48) and ours.dtype == mx.float32
    assert relative_error(ours, naive(x, indices, weights, gate_up, down)) < 1e-5


@pytest.mark.parametrize("tokens", [1, 3, 70])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("quantization", [(4, 32), (4, 64), (8, 32), (8, 64)])
def test_quantized_twin_matches_naive_loop_on_dequantized_weights(tokens, k, quantization):
    gate_up, down = projections(12, 128, 64, quantization)
    x = mx.random.normal((tokens, 128))
    indices, weights = routing(tokens, 12, k, seed=tokens + k)
    ours = experts_twin(x, indices, weights, gate_up, down)
    assert relative_error(ours, naive(x, indices, weights, gate_up, down)) < 1e-5


def test_sorted_and_unsorted_twin_paths_agree():
    gate_up, down = projections(8, 64, 32, (4, 32))
    x = mx.random.normal((SORT_THRESHOLD, 64))
    indices, weights = routing(SORT_THRESHOLD, 8, 2)
    together = experts_twin(x, indices, weights, gate_up, down)  # 128 pairs: sorted
    apart = mx.concatenate(
        [
            experts_twin(x[i : i + 1], indices[i : i + 1], weights[i : i + 1], gate_up, down)
            for i in range(0, SORT_THRESHOLD, 16)
        ]
    )  # one token at a time: unsorted
    assert relative_error(together[::16], apart) < 1e-5


# ----------------------------------------------------------------------------- dispatch


def test_env_var_chooses_the_path(monkeypatch):
    gate_up, down = projections(8, 64, 32)
    x = mx.random.normal((2, 64))
    indices, weights = routing(2, 8, 2)
    expected = experts_twin(x, indices, weights, gate_up, down)
    for value in ["twin", " TWIN "]:
        monkeypatch.setenv(KERNEL_ENV, value)
        assert mx.array_equal(experts_forward(x, indices, weights, gate_up, down), expected)
    for value in ["", "auto"]:  # the twin here, the kernels on Metal
        monkeypatch.setenv(KERNEL_ENV, value)
        ours = experts_forward(x, indices, weights, gate_up, down)
        assert relative_error(ours, expected) < 1e-5
    monkeypatch.setenv(KERNEL_ENV, "cuda")
    with pytest.raises(MoEKernelError, match="not one of auto, metal, twin"):
        experts_forward(x, indices, weights, gate_up, down)


def test_forcing_metal_off_metal_raises_one_clear_error(monkeypatch):
    monkeypatch.setattr(moe_kernels.mx.metal, "is_available", lambda: False)  # also on a Mac
    gate_up, down = projections(8, 64, 32, (4, 32))
    indices, weights = routing(1, 8, 2)
    monkeypatch.setenv(KERNEL_ENV, "metal")
    with pytest.raises(MoEKernelError, match="=metal, but this MLX has no Metal backend"):
        experts_forward(mx.random.normal((1, 64)), indices, weights, gate_up, down)


@pytest.fixture
def pretend_metal(monkeypatch):
    """Make the dispatch believe it runs on Metal, and record which path it takes."""
    monkeypatch.setattr(moe_kernels.mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(moe_kernels.mx, "default_device", lambda: mx.gpu)
    taken = []
    monkeypatch.setattr(moe_kernels, "experts_metal", lambda *a: taken.append("metal"))
    monkeypatch.setattr(moe_kernels, "experts_twin", lambda *a: taken.append("twin"))
    return taken


def test_auto_uses_the_kernels_for_decode_batches_only(pretend_metal):
    gate_up, down = projections(8, 64, 32, (4, 32))
    for tokens in (1, SORT_THRESHOLD // 2 - 1, SORT_THRESHOLD // 2):  # k = 2
        indices, weights = routing(tokens, 8, 2)
        experts_forward(mx.zeros((tokens, 64)), indices, weights, gate_up, down)
    assert pretend_metal == ["metal", "metal", "twin"]


def test_kernels_refuse_weights_they_do_not_support(pretend_metal, monkeypatch):
    x = mx.zeros((1, 64))
    assert metal_unsupported_reason(x, *projections(8, 64, 32, (4, 32))) is None
    assert metal_unsupported_reason(x, *projections(8, 64, 64, (8, 64))) is None
    assert metal_unsupported_reason(x.astype(mx.bfloat16), *projections(8, 64, 32)) is None
    gate_up, down = projections(8, 64, 32, (4, 32))
    mixed = metal_unsupported_reason(x, gate_up, ExpertLinear(8, 32, 64))
    assert "both quantized or both unquantized" in mixed
    three_bit = metal_unsupported_reason(x, *projections(8, 64, 32, (3, 32)))
    assert "3-bit with group size 32" in three_bit
    mx.random.seed(0)
    mxfp4 = [QuantizedExpertLinear(mx.random.normal(s), 32, 4, "mxfp4") for s in [(8, 64, 64)] * 2]
    assert "mxfp4 quantization" in metal_unsupported_reason(x, *mxfp4)
    assert "not a float type" in metal_unsupported_reason(x.astype(mx.int32), gate_up, down)
    odd = projections(8, 66, 32)
    assert "input size 66" in metal_unsupported_reason(mx.zeros((1, 66)), *odd)

    monkeypatch.setenv(KERNEL_ENV, "metal")
    indices, weights = routing(1, 8, 2)
    with pytest.raises(MoEKernelError, match="=metal, but gate_up_proj is 3-bit"):
        experts_forward(x, indices, weights, *projections(8, 64, 32, (3, 32)))
    experts_forward(mx.zeros((70, 64)), *routing(70, 8, 2), gate_up, down)  # forced: any batch
    assert pretend_metal == ["metal"]


# ----------------------------------------------------------------------------- kernel logic

# (experts, hidden, inner, k, (bits, group) or None for float32 weights, tokens)
KERNEL_CASES = [
    (8, 96, 64, 2, (4, 32), 3),  # 12 words a row: most lanes idle
    (8, 320, 128, 3, (4, 64), 2),  # 40 words a row: two steps, the second partial
    (6, 256, 128, 2, (8, 128), 1),
    (16, 128, 96, 8, (8, 32), 3),
    (8, 36, 20, 2, None, 3),  # float: 9 chunks a row, a partial block of features
    (5, 64, 44, 1, None, 2),
]


def case_arrays(case):
    experts, hidden, inner, k, quantization, tokens = case
    gate_up, down = projections(experts, hidden, inner, quantization, seed=hidden)
    x = mx.random.normal((tokens, hidden))
    indices, weights = routing(tokens, experts, k, seed=inner)
    return x, indices, weights, gate_up, down


def emulate_metal(x, indices, weights, gate_up, down) -> np.ndarray:
    """The two Metal kernels' arithmetic, transcribed loop for loop (lanes as a numpy axis).

    Inputs are flattened as the kernels see them (row-contiguous buffers), every index is
    computed as the Metal source computes it, and every output element must be written once.
    """
    n_tokens, k = indices.shape
    hidden, inner = x.shape[-1], gate_up.weight.shape[-2] // 2
    flat_indices = np.array(indices).ravel()
    flat_weights = np.array(weights, np.float32).ravel()
    first_lanes = Lanes(gate_up, np.array(x, np.float32).ravel(), in_dims=hidden)
    activated = first_lanes.launch(
        inner,
        n_tokens * k,
        lambda pair, first: gate_up_simdgroup(first_lanes, pair, first, inner, k, flat_indices),
    )
    second_lanes = Lanes(down, activated, in_dims=inner)
    out = second_lanes.launch(
        hidden,
        n_tokens,
        lambda token, first: down_simdgroup(
            second_lanes, token, first, hidden, k, flat_indices, flat_weights
        ),
    )
    return out.reshape(n_tokens, hidden)


class Lanes:
    """The 32 lanes of a simdgroup reading one projection's rows and their input vector."""

    def __init__(self, projection, inputs: np.ndarray, in_dims: int):
        self.quantized = "scales" in projection
        self.inputs, self.in_dims = inputs, in_dims
        self.w = np.array(projection.weight).ravel()
        if self.quantized:
            self.bits, self.group = projection.bits, projection.group_size
            self.scales = np.array(projection.scales, np.float32).ravel()
            self.biases = np.array(projection.biases, np.float32).ravel()
            self.pack, self.groups = 32 // self.bits, in_dims // self.group
        else:
            self.w = self.w.astype(np.float32)
            self.pack = DENSE_CHUNK
        self.chunks = in_dims // self.pack

    def steps(self):
        """Per step of `for (c = lane; c < CHUNKS; c += SIMD_WIDTH)`: each lane's c and mask."""
        for step in range(-(-self.chunks // SIMD_WIDTH)):
            c = np.arange(SIMD_WIDTH) + step * SIMD_WIDTH
            yield np.minimum(c, self.chunks - 1), c < self.chunks

    def read(self, start: int, c, active):
        """xs[j] = inputs[start + c * PACK + j] and their sum, per lane."""
        xs = self.inputs[start + c[:, None] * self.pack + np.arange(self.pack)]
        xs = np.where(active[:, None], xs, 0.0)
        return xs, xs.sum(-1)

    def row_dot(self, row: int, c, xs, xsum, active):
        if not self.quantized:
            values = self.w[row * self.in_dims + c[:, None] * self.pack + np.arange(self.pack)]
            return np.where(active, (values * xs).sum(-1), 0.0)
        word = self.w[row * self.chunks + c].astype(np.uint64)
        shifts = self.bits * np.arange(self.pack, dtype=np.uint64)
        q = (word[:, None] >> shifts) & ((1 << self.bits) - 1)
        g = row * self.groups + c * self.pack // self.group
        return np.where(active, self.scales[g] * (q * xs).sum(-1) + self.biases[g] * xsum, 0.0)

    def launch(self, features: int, batch: int, simdgroup) -> np.ndarray:
        """Run `simdgroup(y, first)` for every simdgroup of the grid; collect its ROWS sums."""
        out = np.full(batch * features, np.nan)
        grid, threadgroup = launch_shape(features, batch)
        assert grid[0] % threadgroup[0] == 0 and threadgroup[0] == SIMDGROUPS * SIMD_WIDTH
        for y in range(grid[1]):
            for block in range(grid[0] // threadgroup[0]):
                for index in range(SIMDGROUPS):
                    first = (block * SIMDGROUPS + index) * ROWS
                    for r, value in enumerate(simdgroup(y, first)):
                        if first + r < features:
                            assert np.isnan(out[y * features + first + r]), "written twice"
                            out[y * features + first + r] = value
        assert not np.isnan(out).any(), "an output element was never written"
        return out


def gate_up_simdgroup(lanes: Lanes, pair, first, inner, top_k, indices):
    gate_row = int(indices[pair]) * 2 * inner
    x_start = (pair // top_k) * lanes.in_dims
    gate, up = np.zeros((ROWS, SIMD_WIDTH)), np.zeros((ROWS, SIMD_WIDTH))
    for c, active in lanes.steps():
        xs, xsum = lanes.read(x_start, c, active)
        for r in range(ROWS):
            if first + r >= inner:
                break
            row = gate_row + first + r
            gate[r] += lanes.row_dot(row, c, xs, xsum, active)
            up[r] += lanes.row_dot(row + inner, c, xs, xsum, active)
    return [gelu_tanh(g.sum()) * u.sum() for g, u in zip(gate, up, strict=True)]


def down_simdgroup(lanes: Lanes, token, first, hidden, top_k, indices, weights):
    total = np.zeros((ROWS, SIMD_WIDTH))
    for k in range(top_k):
        pair = token * top_k + k
        expert_row = int(indices[pair]) * hidden
        partial = np.zeros((ROWS, SIMD_WIDTH))
        for c, active in lanes.steps():
            xs, xsum = lanes.read(pair * lanes.in_dims, c, active)
            for r in range(ROWS):
                if first + r >= hidden:
                    break
                partial[r] += lanes.row_dot(expert_row + first + r, c, xs, xsum, active)
        total += weights[pair] * partial
    return total.sum(-1)


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_emulation_matches_twin(case):
    x, indices, weights, gate_up, down = case_arrays(case)
    expected = experts_twin(x, indices, weights, gate_up, down)
    assert relative_error(emulate_metal(x, indices, weights, gate_up, down), expected) < 1e-5


# The Metal bodies compiled as C++, verbatim, with a shim for the few Metal names they use:
# address-space qualifiers vanish, each simdgroup runs as 32 threads that meet in `simd_sum`,
# and address and undefined-behaviour sanitizers catch any read or write out of bounds.
SHIM = """
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>
#define device
#define constant
#define thread
struct uint3 { uint x, y, z; };
namespace metal {
inline float tanh(float v) { return std::tanh(v); }
inline float clamp(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }
}
struct Simdgroup { std::barrier<> meet{SIMD_WIDTH_}; float lanes[SIMD_WIDTH_]; };
thread_local Simdgroup* simdgroup;
thread_local uint lane_id;
float simd_sum(float v) {
  simdgroup->lanes[lane_id] = v;
  simdgroup->meet.arrive_and_wait();
  float total = 0.0f;
  for (int i = 0; i < SIMD_WIDTH_; i++) total += simdgroup->lanes[i];
  simdgroup->meet.arrive_and_wait();
  return total;
}
"""
HARNESS = """
#undef device
#undef constant
#undef thread
// Every lane walks all the simdgroups in order; the lanes of one simdgroup meet in simd_sum.
template <class F>
void dispatch(uint groups_x, uint groups_y, uint simdgroups, F kernel) {
  Simdgroup group;
  std::vector<std::thread> lanes;
  for (uint lane = 0; lane < SIMD_WIDTH_; lane++)
    lanes.emplace_back([&, lane] {
      simdgroup = &group;
      lane_id = lane;
      for (uint y = 0; y < groups_y; y++)
        for (uint x = 0; x < groups_x; x++)
          for (uint s = 0; s < simdgroups; s++) kernel(uint3{x, y, 0}, s, lane);
    });
  for (auto& t : lanes) t.join();
}
template <class T>
std::vector<T> load(const char* dir, const char* name, size_t size) {
  std::vector<T> data(size);
  std::string path = std::string(dir) + "/" + name;
  FILE* f = fopen(path.c_str(), "rb");
  if (!f || fread(data.data(), sizeof(T), size, f) != size) { perror(name); exit(2); }
  fclose(f);
  return data;
}
void save(const char* dir, const char* name, const std::vector<float>& data) {
  FILE* f = fopen((std::string(dir) + "/" + name).c_str(), "wb");
  fwrite(data.data(), sizeof(float), data.size(), f);
  fclose(f);
}
"""
CPP_TYPES = {mx.float32: "float", mx.uint32: "uint32_t"}


def cpp_function(launch) -> str:
    """The launch's Metal body, verbatim, in a C++ function with MLX's parameter names."""
    names, (output,) = moe_kernels.kernel_names(launch.stage, launch.quantized)
    types = [CPP_TYPES[mx.float32 if a is None else a.dtype] for a in launch.inputs]
    params = [f"const device {t}* {n}" for t, n in zip(types, names, strict=True)]
    params += [
        f"device {CPP_TYPES[launch.output_dtype]}* {output}",
        "uint3 threadgroup_position_in_grid",
        "uint simdgroup_index_in_threadgroup",
        "uint thread_index_in_simdgroup",
    ]
    kinds = [("typename " if isinstance(v, mx.Dtype) else "int ") + n for n, v in launch.template]
    body = moe_kernels.kernel_source(launch.stage, launch.quantized)
    signature = f"void {cpp_name(launch)}({', '.join(params)})"
    return f"template <{', '.join(kinds)}>\n{signature} {{{body}}}\n"


def cpp_name(launch) -> str:
    return f"{launch.stage}_{'quantized' if launch.quantized else 'dense'}"


def cpp_case(number: int, launches, folder) -> str:
    """A C++ function running one case's launches on inputs saved under `folder`."""
    lines = [f"void case_{number}(const char* dir) {{"]
    previous = None
    for i, launch in enumerate(launches):
        args = []
        for j, array in enumerate(launch.inputs):
            if array is None:
                args.append(f"{previous}.data()")
                continue
            file = f"{number}_{i}_{j}.bin"
            np.array(array).tofile(folder / file)
            kind = CPP_TYPES[array.dtype]
            lines.append(f'  auto in_{i}_{j} = load<{kind}>(dir, "{file}", {array.size});')
            args.append(f"in_{i}_{j}.data()")
        previous = f"out_{i}"
        lines.append(f"  std::vector<float> {previous}({int(np.prod(launch.output_shape))});")
        values = [CPP_TYPES[v] if isinstance(v, mx.Dtype) else str(v) for _, v in launch.template]
        call = f"{cpp_name(launch)}<{', '.join(values)}>({', '.join(args)}, {previous}.data()"
        (groups_x, groups_y, _), (threads, _, _) = launch.grid, launch.threadgroup
        shape = f"{groups_x // threads}, {groups_y}, {threads // SIMD_WIDTH}"
        lines.append(f"  dispatch({shape}, [&](uint3 g, uint s, uint l) {{ {call}, g, s, l); }});")
    lines.append(f'  save(dir, "{number}_out.bin", {previous});')
    lines.append("}")
    return "\n".join(lines)


def test_metal_source_compiled_as_cpp_matches_twin(tmp_path):
    compiler = shutil.which("g++") or shutil.which("clang++")
    assert compiler, "this test compiles the Metal source as C++: install g++ or clang++"
    cases = [case_arrays(case) for case in KERNEL_CASES]
    plans = [moe_kernels.plan_launches(*arrays) for arrays in cases]
    functions = {cpp_name(launch): cpp_function(launch) for plan in plans for launch in plan}
    program = [
        SHIM.replace("SIMD_WIDTH_", str(SIMD_WIDTH)),
        moe_kernels.kernel_header(quantized=False),  # the float header extends the quantized one
        *functions.values(),
        HARNESS.replace("SIMD_WIDTH_", str(SIMD_WIDTH)),
        *(cpp_case(i, plan, tmp_path) for i, plan in enumerate(plans)),
        "int main(int argc, char** argv) {",
        *(f"  if (atoi(argv[1]) == {i}) case_{i}(argv[2]);" for i in range(len(plans))),
        "}",
    ]
    (tmp_path / "kernels.cpp").write_text("\n".join(program))
    flags = ["-std=c++20", "-O0", "-pthread", "-fsanitize=address,undefined"]
    flags += ["-fno-sanitize-recover=all", "-Wall", "-Wno-attributes"]
    build = subprocess.run(
        [compiler, *flags, "kernels.cpp", "-o", "kernels"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    for i, (x, indices, weights, gate_up, down) in enumerate(cases):
        run = subprocess.run(
            [str(tmp_path / "kernels"), str(i), str(tmp_path)], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-3000:]
        ours = np.fromfile(tmp_path / f"{i}_out.bin", np.float32).reshape(x.shape)
        expected = experts_twin(x, indices, weights, gate_up, down)
        assert relative_error(ours, expected) < 1e-5, KERNEL_CASES[i]


# ----------------------------------------------------------------------------- Metal


def random_packed(experts: int, out_dims: int, in_dims: int, bits: int, group: int, dtype):
    """A quantized expert linear with random packed words, without a float weight to quantize."""
    layer = QuantizedExpertLinear(mx.zeros((1, 1, group)), group, bits)
    rng = np.random.default_rng(out_dims)
    words = rng.integers(0, 2**32, (experts, out_dims, in_dims * bits // 32), dtype=np.uint32)
    layer.weight = mx.array(words)
    shape = (experts, out_dims, in_dims // group)
    scale = 2.0 / ((1 << bits) - 1) / in_dims**0.5
    layer.scales = mx.array(rng.uniform(0.5, 1.5, shape) * scale).astype(dtype)
    layer.biases = mx.array(-rng.uniform(0.5, 1.5, shape) / in_dims**0.5).astype(dtype)
    return layer


@pytest.mark.skipif(not ON_METAL, reason=NOT_METAL)
@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_metal_kernel_matches_twin_at_26b_a4b_shapes(tokens, dtype):
    experts, hidden, inner, k = 128, 2816, 704, 8
    gate_up = random_packed(experts, 2 * inner, hidden, 4, 64, dtype)
    down = random_packed(experts, hidden, inner, 4, 64, dtype)
    x = mx.random.normal((tokens, hidden)).astype(dtype)
    indices, weights = routing(tokens, experts, k)
    ours = experts_metal(x, indices, weights, gate_up, down)
    expected = experts_twin(x, indices, weights, gate_up, down)
    assert ours.dtype == dtype
    error = relative_error(ours.astype(mx.float32), expected.astype(mx.float32))
    assert error < (1e-4 if dtype == mx.float32 else 2e-2)


@pytest.mark.skipif(not ON_METAL, reason=NOT_METAL)
@pytest.mark.parametrize("case", [*KERNEL_CASES, (16, 128, 96, 8, (8, 32), 70)])
def test_metal_kernel_matches_twin_on_small_shapes(case):
    x, indices, weights, gate_up, down = case_arrays(case)
    ours = experts_metal(x, indices, weights, gate_up, down)
    assert relative_error(ours, experts_twin(x, indices, weights, gate_up, down)) < 1e-4


@pytest.mark.skipif(not ON_METAL, reason=NOT_METAL)
def test_auto_runs_the_kernels_on_metal_for_decode(monkeypatch):
    gate_up, down = projections(8, 64, 64, (4, 32))
    x = mx.random.normal((2, 64))
    indices, weights = routing(2, 8, 2)
    calls = []
    monkeypatch.setattr(
        moe_kernels, "experts_metal", lambda *a: calls.append(a) or experts_metal(*a)
    )
    auto = experts_forward(x, indices, weights, gate_up, down)
    assert len(calls) == 1
    assert relative_error(auto, experts_twin(x, indices, weights, gate_up, down)) < 1e-4
