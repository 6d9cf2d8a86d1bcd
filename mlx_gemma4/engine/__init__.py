"""Continuous batching: many sequences decoded together, one forward per step."""

from .batch import BatchGenerator, BatchResponse
from .generate import BatchResult, batch_generate
from .prefix_pool import PrefixCachePool

__all__ = ["BatchGenerator", "BatchResponse", "BatchResult", "PrefixCachePool", "batch_generate"]
