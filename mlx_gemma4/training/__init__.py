"""Fine-tuning: LoRA / QLoRA layers, chat data with loss masks, the trainer, and fusing."""

from .adapters import load_adapter, save_adapter
from .data import Batch, Example, iterate_batches, load_dataset, make_batch
from .forward import batch_loss, training_logits
from .fuse import fuse, fuse_model
from .lora import LoRALinear, LoRASettings, apply_lora, fuse_lora
from .trainer import Report, TrainingOptions, TrainingResult, evaluate, train

__all__ = [
    "Batch",
    "Example",
    "LoRALinear",
    "LoRASettings",
    "Report",
    "TrainingOptions",
    "TrainingResult",
    "apply_lora",
    "batch_loss",
    "evaluate",
    "fuse",
    "fuse_lora",
    "fuse_model",
    "iterate_batches",
    "load_adapter",
    "load_dataset",
    "make_batch",
    "save_adapter",
    "train",
    "training_logits",
]
