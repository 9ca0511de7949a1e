"""Export plugins: ONNX translation of the ``dsa`` ops and TensorRT plugins."""

# Imported as a top-level 'plugins' only when the checkout root is on sys.path (e.g. `python -m`
# run from it) and some library probes for a package of that name (transformers probes
# `kernels`). The module then stays empty: registering the dsa ops a second time under another
# module name corrupts them.
_SHADOW = __name__ != "dsa_compile.plugins"
