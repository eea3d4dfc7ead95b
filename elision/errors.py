"""User-facing errors. The CLI prints their message on one line and exits with ``exit_code``."""
from __future__ import annotations

INTERRUPTED_EXIT_CODE = 130  # Ctrl-C: what shells report for a process ended by SIGINT


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
