"""The LoRA training loop: mlx optimizers, `nn.value_and_grad`, validation, checkpoints, resume.

An output folder holds the adapter (`adapters.safetensors` + `adapter_config.json`), a
numbered copy every `save_every` steps (`0000100_adapters.safetensors`, as mlx-lm names them)
and the optimizer's state (`optimizer.safetensors`). `resume=True` reloads all three and skips
the batches already seen, so a resumed run continues the same loss curve.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import AdapterError, TrainingDataError
from ..files import atomic_file
from .adapters import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from .data import Batch, Example, iterate_batches, validation_batches
from .forward import batch_loss
from .lora import LoRASettings, apply_lora, lora_parameter_count

OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class TrainingOptions:
    iters: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-5
    optimizer: str = "adam"
    val_every: int = 50  # 0: no validation
    val_batches: int = 0  # 0: the whole validation set
    save_every: int = 100  # 0: only at the end
    report_every: int = 10
    grad_checkpoint: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.iters < 1 or self.batch_size < 1:
            raise TrainingDataError("--iters and --batch-size must be at least 1")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise TrainingDataError(
                f"the learning rate must be positive (got {self.learning_rate})"
            )
        if self.optimizer not in OPTIMIZERS:
            raise TrainingDataError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")


@dataclass
class Report:
    """One line of progress: the step, the mean training loss since the last report (or the
    validation loss), trained tokens (the model's turns) per second, as mlx-lm counts them,
    peak memory in GB, the trained tokens and all tokens the steps read."""

    step: int
    kind: str  # "train" or "valid"
    loss: float
    tokens_per_second: float = 0.0
    peak_memory_gb: float = 0.0
    trained_tokens: int = 0
    tokens: int = 0


@dataclass
class TrainingResult:
    reports: list[Report] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # every step's loss, from the first run
    adapter: Path | None = None
    start_step: int = 0


def make_optimizer(options: TrainingOptions) -> optim.Optimizer:
    if options.optimizer == "sgd":
        return optim.SGD(learning_rate=options.learning_rate)
    if options.optimizer == "adamw":
        return optim.AdamW(learning_rate=options.learning_rate)
    return optim.Adam(learning_rate=options.learning_rate)


# ----------------------------------------------------------------------------- checkpointing


class _CheckpointedLayer:
    """Mixed into a decoder layer's class: its activations are recomputed in the backward pass
    instead of kept (`mx.checkpoint`), trading compute for memory."""

    def __call__(self, *args, **kwargs):
        plain = type(self).__mro__[2].__call__

        def run(params, *inner_args, **inner_kwargs):
            self.update(params)
            return plain(self, *inner_args, **inner_kwargs)

        return mx.checkpoint(run)(self.trainable_parameters(), *args, **kwargs)


def checkpoint_layers(model: nn.Module, on: bool = True) -> None:
    """Give (or take back from) each decoder layer `mx.checkpoint`: per instance, so other
    models in the process are not touched."""
    for layer in model.language_model.layers:
        cls = type(layer)
        if on and not issubclass(cls, _CheckpointedLayer):
            layer.__class__ = type(f"Checkpointed{cls.__name__}", (_CheckpointedLayer, cls), {})
        elif not on and issubclass(cls, _CheckpointedLayer):
            layer.__class__ = cls.__mro__[2]


def _save_optimizer(optimizer: optim.Optimizer, folder: Path) -> None:
    with atomic_file(folder / OPTIMIZER_FILE) as temporary, temporary.open("wb") as handle:
        mx.save_safetensors(handle, dict(tree_flatten(optimizer.state)))


def _load_optimizer(optimizer: optim.Optimizer, model: nn.Module, folder: Path) -> None:
    file = folder / OPTIMIZER_FILE
    if not file.is_file():
        raise AdapterError(f"{folder}: no {OPTIMIZER_FILE}; cannot resume this run")
    optimizer.init(model.trainable_parameters())
    saved = mx.load(str(file))
    mine = dict(tree_flatten(optimizer.state))
    if set(saved) != set(mine):
        raise AdapterError(f"{file}: optimizer state of another run (other settings or model)")
    optimizer.state = tree_unflatten(list(saved.items()))


def _training_state(folder: Path) -> dict:
    try:
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("training", {})
    except (OSError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------- the loop


def evaluate(model: nn.Module, batches: list[Batch], train_vision: bool = False) -> float:
    """Token-weighted mean loss over `batches`."""
    total, tokens = 0.0, 0
    for batch in batches:
        loss = batch_loss(model, batch, train_vision)
        total += loss.item() * batch.tokens
        tokens += batch.tokens
    return total / max(tokens, 1)


def train(
    model: nn.Module,
    train_set: list[Example],
    valid_set: list[Example],
    out: str | Path,
    settings: LoRASettings | None = None,
    options: TrainingOptions | None = None,
    *,
    resume: bool = False,
    pad_id: int = 0,
    on_report: Callable[[Report], None] | None = None,
    progress: bool | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on `model` (in place) and write it to `out`.

    `resume` continues the run whose checkpoint is in `out`: its adapter, optimizer state and
    step, with the settings it was started with. `progress` shows a progress bar (default: on
    a terminal); `on_report` receives every training and validation report.
    """
    options = options or TrainingOptions()
    out = Path(out)
    start = 0
    if resume:
        state = _training_state(out)
        if not state:
            raise AdapterError(f"{out}: no training checkpoint to resume from")
        settings = load_adapter(model, out)["settings"]
        model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
        start = int(state["step"])
    else:
        settings = settings or LoRASettings()
        apply_lora(model, settings)
    if options.grad_checkpoint:
        checkpoint_layers(model)
    model.train()

    optimizer = make_optimizer(options)
    if resume:
        _load_optimizer(optimizer, model, out)
    loss_and_grad = nn.value_and_grad(
        model, lambda m, batch: batch_loss(m, batch, settings.train_vision)
    )
    batches = iterate_batches(train_set, options.batch_size, options.seed, pad_id)
    for _ in range(start):  # the batches the resumed run has seen
        next(batches)
    valid = validation_batches(valid_set, options.batch_size, pad_id)
    if options.val_batches:
        valid = valid[: options.val_batches]

    result = TrainingResult(start_step=start)
    extra = lambda step: {  # noqa: E731
        "training": {"step": step, "options": asdict(options), "trainable": n_params}
    }
    n_params = lora_parameter_count(model)
    show = _progress(options.iters - start, progress)

    def report(r: Report) -> None:
        result.reports.append(r)
        show.report(r)
        if on_report:
            on_report(r)

    window_loss, window_tokens, window_trained, window_steps = 0.0, 0, 0, 0
    window_start = time.perf_counter()
    mx.reset_peak_memory()
    try:
        for step in range(start + 1, options.iters + 1):
            batch = next(batches)
            mx.random.seed(options.seed * 1_000_003 + step)  # the same dropout when resumed
            loss, grads = loss_and_grad(model, batch)
            optimizer.update(model, grads)
            mx.eval(loss, model.trainable_parameters(), optimizer.state)
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDataError(
                    f"the loss became {value} at step {step}; lower --learning-rate"
                )
            result.losses.append(value)
            window_loss += value
            window_tokens += sum(batch.lengths)
            window_trained += batch.tokens
            window_steps += 1
            show.advance(value)
            if step % options.report_every == 0 or step == options.iters:
                elapsed = time.perf_counter() - window_start
                report(
                    Report(
                        step,
                        "train",
                        window_loss / window_steps,
                        window_trained / elapsed,
                        mx.get_peak_memory() / 1e9,
                        window_trained,
                        window_tokens,
                    )
                )
                window_loss, window_tokens, window_trained, window_steps = 0.0, 0, 0, 0
                window_start = time.perf_counter()
            if (
                valid
                and options.val_every
                and (step % options.val_every == 0 or step == options.iters)
            ):
                model.eval()
                report(Report(step, "valid", evaluate(model, valid, settings.train_vision)))
                model.train()
                window_start = time.perf_counter()
            if options.save_every and step % options.save_every == 0:
                save_adapter(model, out, settings, f"{step:07d}_{WEIGHTS_FILE}", extra(step))
                _save_optimizer(optimizer, out)
                save_adapter(model, out, settings, WEIGHTS_FILE, extra(step))
    finally:
        show.close()
        if options.grad_checkpoint:
            checkpoint_layers(model, on=False)
        model.eval()
    result.adapter = save_adapter(model, out, settings, WEIGHTS_FILE, extra(options.iters))
    _save_optimizer(optimizer, out)
    return result


class _progress:
    """A rich progress bar with the last loss, tokens/s and peak memory (or nothing)."""

    def __init__(self, total: int, enabled: bool | None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("training"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, status="")
            self.bar.start()
        self.status = ""

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, status=f"loss {loss:.3f} {self.status}")

    def report(self, r: Report) -> None:
        if r.kind == "train":
            self.status = f"{r.tokens_per_second:.0f} tok/s, peak {r.peak_memory_gb:.2f} GB"
            line = (
                f"step {r.step}: train loss {r.loss:.4f}, {r.tokens_per_second:.1f} tok/s, "
                f"peak {r.peak_memory_gb:.2f} GB"
            )
        else:
            line = f"step {r.step}: validation loss {r.loss:.4f}"
        if self.bar is not None:
            self.bar.console.print(line, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
