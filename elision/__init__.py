"""elision: a compiler that makes neural-network inference do less work.

    import elision
    fast = elision.compile(model, example_inputs=(ids,), passes="canonicalize,cse,dce", target="torch")
    fast(ids).logits
"""
__version__ = "0.1.0"


def compile(model, example_inputs=None, passes=None, target="torch", **kwargs):
    """See :func:`elision.apps.compile.api.compile`."""
    # on first use: `import elision` (and so the CLI's --help) must not import torch; apps also import this package
    from elision.apps.compile.api import compile as _compile

    return _compile(model, example_inputs=example_inputs, passes=passes, target=target, **kwargs)


__all__ = ["compile", "__version__"]
