"""Kernels of the ``dsa`` ops: dense references, memory-bounded implementations, op registration.

Importing this package registers ``torch.ops.dsa.*``.
"""

from .checks import DSAInputError
from .ops import indexer_scores, indexer_topk, sparse_attention

__all__ = ["DSAInputError", "indexer_scores", "indexer_topk", "sparse_attention"]
