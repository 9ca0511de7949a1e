"""dsa-compile: compile dense attention into DeepSeek-style sparse attention.

The two DSA ops (a lightning indexer that selects top-k keys, and sparse attention over them)
are registered as ``torch.ops.dsa.*`` on import and exposed here as Python functions.
"""

from ._version import __version__
from .adapter import load_adapter, save_adapter
from .api import ExplainReport, compile, explain
from .calibrate import CalibrationResult, calibrate, measure_recall
from .config import DSAConfig, DSAConfigError
from .export import export
from .hf import configure
from .hf import install as _install_hf
from .kernels import DSAInputError, indexer_scores, indexer_topk, sparse_attention
from .key_cache import index_cache
from .onnx_export import OnnxExport, export_onnx
from .ownership import DSAAdapterError, attach, detach
from .passes.indexers import DSAIndexer

__all__ = [
    "DSAAdapterError",
    "DSAConfig",
    "DSAConfigError",
    "CalibrationResult",
    "DSAIndexer",
    "DSAInputError",
    "ExplainReport",
    "attach",
    "calibrate",
    "compile",
    "configure",
    "index_cache",
    "detach",
    "explain",
    "export",
    "export_onnx",
    "OnnxExport",
    "load_adapter",
    "measure_recall",
    "save_adapter",
    "__version__",
    "indexer_scores",
    "indexer_topk",
    "sparse_attention",
]

_install_hf()  # attn_implementation="dsa" in transformers
