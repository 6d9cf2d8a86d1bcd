"""LoRA layers: a low-rank update beside a frozen linear (float or quantized) or expert stack.

Conventions follow mlx-lm's tuner: the wrapped module is `linear`, the update is
`scale * (x @ lora_a) @ lora_b` with `lora_a` [in, rank] drawn uniformly in +-1/sqrt(in) and
`lora_b` [rank, out] zero, so a fresh adapter changes nothing. Over a quantized base this is
QLoRA: the packed weight stays packed and frozen, only the float factors train.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import AdapterError
from ..models.layers import ClippableLinear, CodebookLinear, Linear
from ..models.moe import ExpertLinear, Experts, QuantizedExpertLinear
from ..models.moe_kernels import experts_twin

# --targets short names -> the module names they stand for (decoder and vision tower alike)
TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
EXPERTS = "experts"  # the MoE expert stacks (26B-A4B), adapted only when named
DEFAULT_TARGETS = tuple(TARGETS)

TEXT_LAYERS = "language_model.layers."
VISION_TOWER = "vision_tower."


@dataclass(frozen=True)
class LoRASettings:
    """What to adapt and how: rank, alpha (the update is scaled by alpha / rank), dropout on the
    update's input, the target modules, and whether the vision tower is adapted too."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    train_vision: bool = False

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS and t != EXPERTS]
        if unknown or not self.targets:
            raise AdapterError(
                f"unknown LoRA target {', '.join(unknown) or '(none given)'}; choose from "
                f"{','.join([*TARGETS, EXPERTS])}"
            )
        if self.rank < 1:
            raise AdapterError(f"LoRA rank must be at least 1 (got {self.rank})")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1) (got {self.dropout})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        out = asdict(self)
        out["targets"] = list(self.targets)
        out["scale"] = self.scale
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> LoRASettings:
        return cls(
            rank=int(raw["rank"]),
            alpha=float(raw["alpha"]),
            dropout=float(raw.get("dropout", 0.0)),
            targets=tuple(raw["targets"]),
            train_vision=bool(raw.get("train_vision", False)),
        )


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(input, output) sizes of a float, quantized or codebook linear."""
    if "scales" in module:  # packed: the scales hold one column per group of inputs
        out_dims, groups = module.scales.shape
        return groups * module.group_size, out_dims
    out_dims, in_dims = module.weight.shape
    return in_dims, out_dims


def dense_weight(module: nn.Module) -> mx.array:
    """The float weight [out, in] (or [experts, out, in]) a linear or expert stack applies."""
    if isinstance(module, CodebookLinear):
        return module.float_weight()
    if "scales" in module:
        return mx.dequantize(
            module.weight,
            module.scales,
            module.get("biases"),
            group_size=module.group_size,
            bits=module.bits,
            mode=module.mode,
        )
    return module.weight


class LoRALinear(nn.Module):
    """`linear(x) + scale * (dropout(x) @ lora_a) @ lora_b` over a frozen `linear`."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        in_dims, out_dims = linear_dims(linear)
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        update = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return self.linear(x) + (self.scale * update).astype(x.dtype)

    def delta(self) -> mx.array:
        """The update as a weight [out, in]: scale * (lora_a @ lora_b)^T."""
        return self.scale * (self.lora_a @ self.lora_b).T

    def fused(self) -> nn.Module:
        """A float `Linear` whose weight includes the update (quantized bases are dequantized;
        `fuse.py` re-quantizes when asked)."""
        base = self.linear
        weight = dense_weight(base)
        in_dims, out_dims = linear_dims(base)
        out = Linear(in_dims, out_dims, bias="bias" in base)
        dtype = base.scales.dtype if "scales" in base else weight.dtype
        out.weight = (weight.astype(mx.float32) + self.delta()).astype(dtype)
        if "bias" in base:
            out.bias = base.bias
        return out


class LoRAExpertLinear(nn.Module):
    """An expert stack with one low-rank update per expert: `lora_a` [experts, rank, in],
    `lora_b` [experts, out, rank], applied to each token's routed experts by `gather_mm`.

    Called like the stack it wraps: `(x, indices, sorted_indices)`."""

    def __init__(self, linear: nn.Module, rank: int, scale: float):
        super().__init__()
        experts = linear.scales.shape[0] if "scales" in linear else linear.weight.shape[0]
        in_dims, out_dims = linear_dims(_first_expert(linear))
        self.linear = linear
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (experts, rank, in_dims))
        self.lora_b = mx.zeros((experts, out_dims, rank))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        base = self.linear(x, indices, sorted_indices)
        # MLX's CPU gather_mm is float32-only; the factors are float32 anyway
        low = mx.gather_mm(
            x.astype(mx.float32),
            self.lora_a.swapaxes(-1, -2),
            rhs_indices=indices,
            sorted_indices=sorted_indices,
        )
        update = mx.gather_mm(
            low, self.lora_b.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        return base + (self.scale * update).astype(base.dtype)

    def fused(self) -> ExpertLinear:
        weight = dense_weight(self.linear)
        dtype = self.linear.scales.dtype if "scales" in self.linear else weight.dtype
        out = ExpertLinear(*weight.shape[:1], weight.shape[2], weight.shape[1])
        out.weight = (weight.astype(mx.float32) + self.scale * (self.lora_b @ self.lora_a)).astype(
            dtype
        )
        return out


def _first_expert(stack: nn.Module) -> nn.Module:
    """A stand-in exposing one expert's shapes to `linear_dims`."""
    view = nn.Module()
    if "scales" in stack:
        view.scales, view.group_size = stack.scales[0], stack.group_size
    else:
        view.weight = stack.weight[0]
    return view


class LoRAExperts(nn.Module):
    """The MoE experts with LoRA on both projections; always the pure-MLX path (the fused Metal
    kernels have no gradient)."""

    def __init__(self, experts: Experts, rank: int, scale: float):
        super().__init__()
        self.gate_up_proj = LoRAExpertLinear(experts.gate_up_proj, rank, scale)
        self.down_proj = LoRAExpertLinear(experts.down_proj, rank, scale)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        return experts_twin(x, indices, weights, self.gate_up_proj, self.down_proj)

    def fused(self) -> Experts:
        out = Experts.__new__(Experts)
        nn.Module.__init__(out)
        out.gate_up_proj = self.gate_up_proj.fused()
        out.down_proj = self.down_proj.fused()
        return out


LORA_MODULES = (LoRALinear, LoRAExperts)
_LINEARS = (nn.Linear, nn.QuantizedLinear, CodebookLinear)


def _adaptable(path: str, settings: LoRASettings) -> bool:
    # the audio tower, the embedders and the LM head are never adapted
    return path.startswith(TEXT_LAYERS) or (settings.train_vision and path.startswith(VISION_TOWER))


def lora_sites(model: nn.Module, settings: LoRASettings) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module `settings` adapts, in the model's order."""
    names = {TARGETS[t] for t in settings.targets if t in TARGETS}
    sites = []
    for path, module in model.named_modules():
        leaf = path.rpartition(".")[2]
        if not _adaptable(path, settings):
            continue
        if leaf in names and isinstance(module, ClippableLinear):
            sites.append((f"{path}.linear", module.linear))
        elif leaf in names and isinstance(module, _LINEARS):
            sites.append((path, module))
        elif leaf == EXPERTS and EXPERTS in settings.targets and isinstance(module, Experts):
            sites.append((path, module))
    return sites


def apply_lora(model: nn.Module, settings: LoRASettings) -> int:
    """Freeze the whole model, then put LoRA layers on the sites `settings` names; only their
    factors are trainable. Returns the number of adapted modules."""
    model.freeze()
    wrapped = []
    for path, module in lora_sites(model, settings):
        if isinstance(module, Experts):
            if not isinstance(module.gate_up_proj, ExpertLinear | QuantizedExpertLinear):
                raise AdapterError(f"{path}: expert stacks of this kind cannot take LoRA")
            wrapped.append((path, LoRAExperts(module, settings.rank, settings.scale)))
        else:
            wrapped.append(
                (path, LoRALinear(module, settings.rank, settings.scale, settings.dropout))
            )
    if not wrapped:
        raise AdapterError(
            f"no module of this model matches the LoRA targets {','.join(settings.targets)}"
        )
    model.update_modules(tree_unflatten(wrapped))
    return len(wrapped)


def factor_shapes(model: nn.Module, settings: LoRASettings) -> dict[str, tuple[int, ...]]:
    """The LoRA factors `apply_lora(model, settings)` would make, by path, with their shapes."""
    rank, shapes = settings.rank, {}
    for path, module in lora_sites(model, settings):
        if isinstance(module, Experts):
            for name in ("gate_up_proj", "down_proj"):
                stack = getattr(module, name)
                experts = stack.scales.shape[0] if "scales" in stack else stack.weight.shape[0]
                in_dims, out_dims = linear_dims(_first_expert(stack))
                shapes[f"{path}.{name}.lora_a"] = (experts, rank, in_dims)
                shapes[f"{path}.{name}.lora_b"] = (experts, out_dims, rank)
        else:
            in_dims, out_dims = linear_dims(module)
            shapes[f"{path}.lora_a"] = (in_dims, rank)
            shapes[f"{path}.lora_b"] = (rank, out_dims)
    return shapes


def fuse_lora(model: nn.Module) -> int:
    """Replace every LoRA layer by a float module with the update merged in; returns how many."""
    fused = [(path, m.fused()) for path, m in model.named_modules() if isinstance(m, LORA_MODULES)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def lora_parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
