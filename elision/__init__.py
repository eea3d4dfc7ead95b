"""elision: a compiler that makes neural-network inference do less work.

    import elision
    fast = elision.compile(model, example_inputs=(ids,), passes="canonicalize,cse,dce", target="torch")
    fast(ids).logits
    out = elision.generate(hf_model, input_ids, max_new_tokens=32)   # like hf_model.generate, speculatively
"""
__version__ = "0.1.0"


def compile(model, example_inputs=None, passes=None, target="torch", **kwargs):
    """See :func:`elision.apps.compile.api.compile`."""
    # on first use: `import elision` (and so the CLI's --help) must not import torch; apps also import this package
    from elision.apps.compile.api import compile as _compile

    return _compile(model, example_inputs=example_inputs, passes=passes, target=target, **kwargs)


def generate(model, input_ids=None, generation_config=None, **kwargs):
    """See :func:`elision.apps.specdec.hf_generate.generate`."""
    # imported on call: `import elision` stays light (the torch-free runtime and the CLI's --help import the package)
    from elision.apps.specdec.hf_generate import generate as _generate

    return _generate(model, input_ids, generation_config, **kwargs)


__all__ = ["compile", "generate", "__version__"]
