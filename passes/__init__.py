"""Graph passes that find dense attention in torch.fx graphs and rewrite it to the ``dsa`` ops."""

# Imported as a top-level 'passes' only when the checkout root is on sys.path (e.g. `python -m`
# run from it) and some library probes for a package of that name (transformers probes
# `kernels`). The module then stays empty: registering the dsa ops a second time under another
# module name corrupts them.
_SHADOW = __name__ != "dsa_compile.passes"
