"""Prompt processing: tokenizer, chat template, stop tokens, images, video and audio."""

from .processor import Processor

__all__ = ["Processor"]
