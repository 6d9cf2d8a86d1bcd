"""Prompt processing: tokenizer, chat template, stop tokens."""

from .processor import Processor

__all__ = ["Processor"]
