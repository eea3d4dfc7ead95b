"""User-facing errors. The CLI prints their message on one line and exits with ``exit_code``."""
from __future__ import annotations

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
