"""Kernels of the ``dsa`` ops: dense references, memory-bounded implementations, op registration.

Importing this package registers ``torch.ops.dsa.*``.
"""

# Imported as a top-level 'kernels' only when the checkout root is on sys.path (e.g. `python -m`
# run from it) and some library probes for a package of that name (transformers probes
# `kernels`). The module then stays empty: registering the dsa ops a second time under another
# module name corrupts them.
_SHADOW = __name__ != "dsa_compile.kernels"

if not _SHADOW:
    from .checks import DSAInputError
    from .ops import indexer_scores, indexer_topk, sparse_attention

    __all__ = ["DSAInputError", "indexer_scores", "indexer_topk", "sparse_attention"]
