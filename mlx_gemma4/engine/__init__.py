"""Continuous batching: many sequences decoded together, one forward per step."""

from .batch import BatchGenerator, BatchResponse, BatchResult, batch_generate

__all__ = ["BatchGenerator", "BatchResponse", "BatchResult", "batch_generate"]
