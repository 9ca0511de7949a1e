"""dsa-compile: compile dense attention into DeepSeek-style sparse attention.

The two DSA ops (a lightning indexer that selects top-k keys, and sparse attention over them)
are registered as ``torch.ops.dsa.*`` on import and exposed here as Python functions.
"""

from ._version import __version__
from .api import ExplainReport, compile, explain
from .config import DSAConfig, DSAConfigError
from .export import export
from .kernels import DSAInputError, indexer_scores, indexer_topk, sparse_attention

__all__ = [
    "DSAConfig",
    "DSAConfigError",
    "DSAInputError",
    "ExplainReport",
    "compile",
    "explain",
    "export",
    "__version__",
    "indexer_scores",
    "indexer_topk",
    "sparse_attention",
]
