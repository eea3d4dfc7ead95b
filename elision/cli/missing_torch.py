"""One clear line when a command that compiles meets a Python where PyTorch cannot be imported.

`elision run` needs only numpy and onnxruntime (the artifact runtime); every other command traces or runs PyTorch
models.
"""
from __future__ import annotations


def names_torch(error: ImportError) -> bool:
    """Whether ``error`` is PyTorch (or one of its modules) failing to import."""
    if error.name is not None:
        return error.name.split(".")[0] == "torch"
    return "torch" in str(error)


def message(error: ImportError) -> str:
    return (f"this command needs PyTorch, which cannot be imported here ({error}); `elision run` runs compiled "
            f"artifacts without it")
