"""Tensor and pipeline parallelism for Gemma 4 on `mlx.core.distributed`.

`shard(model, group)` splits every decoder layer across the group's ranks (Megatron style):
query heads, the MLP's inner width and the experts are cut, each attention and feed-forward
block ends in one `all_sum` (MLX's `ShardedToAllLinear`), and the vocabulary tables (token
embeddings, the tied LM head, the per-layer embedding table) are cut by rows: a lookup is one
`all_sum` of the rows a rank owns (zeros elsewhere), the head one `all_gather` of logit slices.
KV heads split when they can; a single KV head (the full-attention layers of the large models)
is replicated, each rank keeping the one its query heads read.

`pipeline(model, group)` gives each rank a contiguous span of layers. Every rank runs the same
loop; a layer held elsewhere passes the hidden state through (keeping its cache's position
bookkeeping), and where the span changes hands the owner's hidden state is broadcast. KV-shared
layers and the layers they read stay on one rank, so no keys or values cross the wire. The
vocabulary tables are cut by rows as in `shard`; the towers' weights stay on rank 0, which
encodes every image, video frame and audio clip and broadcasts the soft tokens (their count
first, so every rank knows the shape before the data arrive).

Both run on any backend `mx.distributed.init` gives (ring over TCP, JACCL over Thunderbolt,
MPI). Quantized weights are cut as stored, without dequantizing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx.utils import tree_flatten, tree_map

from ..cache import FullAttentionCache, SlidingWindowCache
from ..collectives import Collectives, Group
from ..errors import DistributedError
from .layers import CodebookLinear
from .pipeline_media import towers_on_rank_0
from .text import Attention, DecoderLayer, TextModel

MODES = ("tensor", "pipeline")
EXPERT_SPLITS = ("auto", "inside", "across")


# ----------------------------------------------------------------------------- slicing weights

_SLICED = ("weight", "scales", "biases", "bias")  # a codebook or rotation is never cut


def _rows(path: str, weight: mx.array) -> int | None:
    """`shard_inplace`'s rule for cutting by rows: weights, packed or not, and their scales."""
    return 0 if path.split(".")[-1] in _SLICED else None


def _keep_rows(module: nn.Module, start: int, stop: int) -> None:
    """Keep rows [start, stop) of a linear, float or packed."""
    module.update(
        {
            name: module[name][start:stop]
            for name in _SLICED
            if name in module and isinstance(module[name], mx.array)
        }
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DistributedError(message)


def _input_groups(module: nn.Module) -> int | None:
    """How many quantization groups a packed linear's input has (None: a float linear)."""
    return module.scales.shape[-1] if "scales" in module else None


def _inner_splits(down_proj: nn.Module, inner: int, size: int) -> bool:
    """Whether a block whose `down_proj` reads `inner` units can be cut `size` ways: the
    units, and for a packed weight its quantization groups, divide by `size`."""
    groups = _input_groups(down_proj)
    return inner % size == 0 and (groups is None or groups % size == 0)


# ----------------------------------------------------------------------------- tensor parallel


class VocabParallelEmbedding(nn.Module):
    """An embedding table cut by rows: rank r holds tokens [first, first + rows).

    A lookup sums every rank's rows (zeros for tokens it does not hold); `as_linear` (the tied
    LM head) computes this rank's logit slice and gathers the others'.
    """

    def __init__(self, table: nn.Module, first: int, comm: Collectives):
        super().__init__()
        self.table = table
        self.first = first
        self.rows = table.weight.shape[0]
        self.comm = comm

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.first
        held = (local >= 0) & (local < self.rows)
        rows = self.table(mx.where(held, local, 0))
        rows = mx.where(held[..., None], rows, mx.zeros((), dtype=rows.dtype))
        return self.comm.all_sum(rows)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.comm.gather_last_axis(self.table.as_linear(x))


class VocabParallelHead(nn.Module):
    """An untied LM head cut by output rows; the logit slices are gathered."""

    def __init__(self, head: nn.Module, comm: Collectives):
        super().__init__()
        self.head = head
        self.comm = comm

    def __call__(self, x: mx.array) -> mx.array:
        return self.comm.gather_last_axis(self.head(x))


class SummedExperts(nn.Module):
    """Experts cut inside each expert (their inner width): the partial outputs are summed."""

    def __init__(self, experts: nn.Module, comm: Collectives):
        super().__init__()
        self.experts = experts
        self.comm = comm

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        return self.comm.all_sum(self.experts(x, indices, weights))


class ExpertSlice(nn.Module):
    """Experts cut across ranks: rank r holds experts [first, first + count); the choices of
    other ranks' experts get weight zero here, and the outputs are summed."""

    def __init__(self, experts: nn.Module, first: int, count: int, comm: Collectives):
        super().__init__()
        self.experts = experts
        self.first, self.count = first, count
        self.comm = comm

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        local = indices - self.first
        held = (local >= 0) & (local < self.count)
        local = mx.where(held, local, 0).astype(indices.dtype)
        weights = mx.where(held, weights, mx.zeros((), dtype=weights.dtype))
        return self.comm.all_sum(self.experts(x, local, weights))


def kv_heads_of_rank(rank: int, size: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """(first KV head, how many) that rank `rank`'s query heads read: a share of the KV heads
    when they divide by the group size, otherwise the one KV head its query heads share."""
    if kv_heads % size == 0:
        return rank * kv_heads // size, kv_heads // size
    if size % kv_heads == 0:
        return (rank * heads // size) // (heads // kv_heads), 1
    raise DistributedError(
        f"{kv_heads} KV heads can be neither split across nor shared by {size} ranks; "
        "use a group size that divides them or that they divide"
    )


def _check_tensor_plan(model: nn.Module, size: int, experts: str) -> None:
    """Every reason this model cannot be cut `size` ways, before anything is changed."""
    config = model.language_model.config
    _check(experts in EXPERT_SPLITS, f"experts split {experts!r} is not one of {EXPERT_SPLITS}")
    heads = config.num_attention_heads
    _check(
        heads % size == 0,
        f"{heads} attention heads cannot be split across {size} ranks; use a group size that "
        "divides them, or --distributed pipeline",
    )
    for name, module in model.language_model.named_modules():
        where = f"language_model.{name}"
        if isinstance(module, CodebookLinear):
            raise DistributedError(
                f"{where}: codebook-quantized weights cannot be tensor-sharded; use "
                "--distributed pipeline"
            )
        for site in ("output_rotation", "inner_rotation"):
            _check(
                site not in module,
                f"{where}: a turboquant rotation spans the heads / inner width that tensor "
                "parallelism splits; use --distributed pipeline",
            )
    for i, layer in enumerate(model.language_model.layers):
        kv_heads_of_rank(0, size, heads, config.layer_kv_heads(i))
        attn = layer.self_attn
        _check(
            _inner_splits(attn.o_proj, attn.n_heads * attn.head_dim, size),
            f"layer {i} self_attn.o_proj: its quantization groups cannot be split across "
            f"{size} ranks; use --distributed pipeline, or a smaller quantization group size",
        )
        if layer.has_moe:
            expert_split(layer, size, experts)


def expert_split(layer: DecoderLayer, size: int, experts: str = "auto") -> str:
    """How a MoE layer's experts are cut: "inside" each expert (their inner width, the
    default when it and its quantization groups divide), or "across" ranks (whole experts)."""
    inner = layer.experts.gate_up_proj.weight.shape[1] // 2  # gate rows, then up rows
    count = layer.experts.gate_up_proj.weight.shape[0]
    inside = _inner_splits(layer.experts.down_proj, inner, size)
    if experts in ("auto", "inside") and inside:
        return "inside"
    if experts in ("auto", "across") and count % size == 0:
        return "across"
    raise DistributedError(
        f"the experts ({count} of width {inner}) cannot be split {experts} across {size} "
        "ranks; use a group size that divides them, or --distributed pipeline"
    )


def _shard_attention(attn: Attention, group: Group) -> None:
    rank, size = group.rank(), group.size()
    first, count = kv_heads_of_rank(rank, size, attn.n_heads, attn.n_kv_heads)
    attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
    if attn.owns_kv:
        for name in ("k_proj", "v_proj"):
            if name in attn:
                _keep_rows(attn[name], first * attn.head_dim, (first + count) * attn.head_dim)
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    attn.n_heads //= size
    attn.n_kv_heads = count


def _shard_feed_forward(layer: DecoderLayer, group: Group, experts: str) -> None:
    mlp = layer.mlp
    # an MLP whose packed groups do not divide (26B-A4B's 2112-wide one in 64-groups) stays
    # whole on every rank: replicated compute, no collective
    if _inner_splits(mlp.down_proj, mlp.gate_proj.weight.shape[0], group.size()):
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
    if not layer.has_moe:
        return
    # the router stays whole: every rank routes every token the same way
    if expert_split(layer, group.size(), experts) == "across":
        count = layer.experts.gate_up_proj.weight.shape[0] // group.size()
        shard_inplace(layer.experts, _rows, group=group)
        layer.experts = ExpertSlice(layer.experts, group.rank() * count, count, Collectives(group))
    else:
        # gate_up holds gate rows then up rows: cut each half
        shard_inplace(layer.experts.gate_up_proj, "all-to-sharded", segments=2, group=group)
        shard_inplace(layer.experts.down_proj, "sharded-to-all", group=group)
        layer.experts = SummedExperts(layer.experts, Collectives(group))


def _vocab_parallel(model: nn.Module, comm: Collectives) -> None:
    """Cut the token tables and the LM head by rows (all of them 262k wide in real models)."""
    group, size, rank = comm.group, comm.size, comm.rank
    text = model.language_model
    for name in ("embed_tokens", "embed_tokens_per_layer"):
        if name not in text:
            continue
        table = text[name]
        rows = table.weight.shape[0]
        if rows % size:
            continue  # kept whole: uneven slices would need padded gathers
        shard_inplace(table, _rows, group=group)
        text[name] = VocabParallelEmbedding(table, rank * rows // size, comm)
    if "lm_head" in model and model.lm_head.weight.shape[0] % size == 0:
        shard_inplace(model.lm_head, _rows, group=group)
        model.lm_head = VocabParallelHead(model.lm_head, comm)


def shard(model: nn.Module, group: Group, experts: str = "auto") -> nn.Module:
    """Tensor parallelism over `group`, in place; `model(ids)` then gives the full logits on
    every rank. `experts`: "inside" cuts each expert's inner width, "across" gives each rank
    a share of the experts, "auto" the first of those that divides. The modality towers are
    replicated."""
    size = group.size()
    if size == 1:
        return model
    _check_tensor_plan(model, size, experts)
    for layer in model.language_model.layers:
        _shard_attention(layer.self_attn, group)
        _shard_feed_forward(layer, group, experts)
    _vocab_parallel(model, Collectives(group))
    _materialize(model)
    return model


# ----------------------------------------------------------------------------- pipeline


def layer_spans(config: Any, size: int, split: Sequence[int] | None = None) -> list[range]:
    """Contiguous layer spans, rank 0 first: even, except that the KV-shared layers and the
    layers they read stay together on the last rank (the layers before them then spread
    evenly over the other ranks)."""
    n = config.num_hidden_layers
    shared = range(config.first_kv_shared_layer, n)
    lowest = min((config.kv_source(i) for i in shared), default=n)
    if split is None:
        split = _even(n, size)
        if sum(split[:-1]) > lowest:
            _check(
                lowest >= size - 1,
                f"{size} ranks cannot split the {lowest} layers before the KV-shared block "
                f"(layers {lowest}-{n - 1} must stay on one rank); use fewer ranks",
            )
            split = [*_even(lowest, size - 1), n - lowest]
    _check(
        len(split) == size and all(s > 0 for s in split) and sum(split) == n,
        f"layer split {list(split)} must give each of {size} ranks at least one of {n} layers",
    )
    ends = [sum(split[: r + 1]) for r in range(size)]
    _check(
        ends[-2] <= lowest,
        f"layer split {list(split)} separates the KV-shared layers {lowest}-{n - 1} from the "
        "layers they read; keep them on the last rank",
    )
    starts = [0] + ends[:-1]
    return [range(a, b) for a, b in zip(starts, ends, strict=True)]


def _even(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


class ForwardCaches:
    """The caches one pipeline forward pass updated on this rank.

    A prefill chunk evaluates only the caches. Rank 0's caches do not depend on the layers
    after its span, so untied it would leave the broadcasts that hand the hidden state on to
    its next evaluation (the chained order keeps them paired), and its peers would wait that
    long: forever, if it ends after a prefill. Tied to the pass's last broadcast, evaluating
    any cache runs every collective of the pass on every rank.
    """

    def __init__(self):
        self.updated: list[Any] = []

    def tie_to(self, h: mx.array) -> None:
        for cache in self.updated:
            for name in ("keys", "values"):
                stored = getattr(cache, name, None)
                if isinstance(stored, mx.array):
                    setattr(cache, name, mx.depends(stored, h))
        self.updated.clear()


class StageLayer(nn.Module):
    """One decoder layer in a pipeline: run here when this rank holds it, passed through
    otherwise; `receive_from` broadcasts that rank's hidden state before the layer,
    `final_from` after it (the last layer)."""

    def __init__(
        self,
        layer: DecoderLayer | None,
        receive_from: int | None,
        final_from: int | None,
        comm: Collectives,
        caches: ForwardCaches,
    ):
        super().__init__()
        if layer is not None:
            self.layer = layer
        self.receive_from, self.final_from = receive_from, final_from
        self.comm, self.caches = comm, caches

    def __call__(self, h, mask, cache, offset, shared_kv, per_layer_input):
        if self.receive_from is not None:
            h = self.comm.broadcast(h, self.receive_from)
        if "layer" in self:
            h, kv = self.layer(h, mask, cache, offset, shared_kv, per_layer_input)
            if cache is not None:
                self.caches.updated.append(cache)
        else:
            kv = None
            if cache is not None:  # keep positions and windows in step with the owner
                blank = mx.zeros((h.shape[0], 1, h.shape[1], 1), dtype=h.dtype)
                mx.eval(cache.update_and_fetch(blank, blank))
        if self.final_from is not None:
            h = self.comm.broadcast(h, self.final_from)
            self.caches.tie_to(h)
        return h, kv


def _pipeline_caches(text: TextModel, owned: list[bool]) -> Callable[..., list[Any]]:
    make = text.make_cache

    def make_cache(kv_quantization=None):
        config = text.config
        return [
            cache
            if owned[i]
            else (
                SlidingWindowCache(config.sliding_window)
                if config.is_sliding(i)
                else FullAttentionCache()
            )
            for i, cache in enumerate(make(kv_quantization))
        ]

    return make_cache


def pipeline(model: nn.Module, group: Group, split: Sequence[int] | None = None) -> nn.Module:
    """Pipeline parallelism over `group`, in place: rank r keeps `layer_spans(...)[r]`.
    `model(ids)` then gives the full logits on every rank."""
    size, rank = group.size(), group.rank()
    if size == 1:
        return model
    text = model.language_model
    spans = layer_spans(text.config, size, split)
    owner = [r for r, span in enumerate(spans) for _ in span]
    last = len(owner) - 1
    comm = Collectives(group)  # one order for all of this model's collectives
    caches = ForwardCaches()
    for i, layer in enumerate(text.layers):
        text.layers[i] = StageLayer(
            layer if owner[i] == rank else None,
            owner[i - 1] if i and owner[i - 1] != owner[i] else None,
            owner[i] if i == last else None,
            comm,
            caches,
        )
    text.make_cache = _pipeline_caches(text, [o == rank for o in owner])
    towers_on_rank_0(model, comm)
    _vocab_parallel(model, comm)
    _materialize(model)
    return model


# ----------------------------------------------------------------------------- entry points


def parallelize(model: nn.Module, group: Group, mode: str, **options: Any) -> nn.Module:
    """`shard` or `pipeline` by name. On a lazily loaded model a rank never holds more than
    its share plus one checkpoint tensor."""
    if mode not in MODES:
        raise DistributedError(f"distributed mode {mode!r} is not one of {', '.join(MODES)}")
    (shard if mode == "tensor" else pipeline)(model, group, **options)
    return model


def _materialize(model: nn.Module) -> None:
    """Each rank's weights in buffers of their own, one layer at a time: a lazily loaded
    checkpoint tensor is then read, cut and let go before the next layer's are read."""
    model.update(tree_map(_owned, model.parameters()))
    for layer in model.language_model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def _owned(x: mx.array) -> mx.array:
    """`x` in a buffer of its own. A row slice is a view that keeps the whole tensor's buffer
    alive: `mx.contiguous` has nothing to do for it, and an elementwise op may write in place
    into the donated view; a concatenation always writes a new buffer."""
    return mx.concatenate([x, x[:0]]) if x.ndim else x


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights this rank holds."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
