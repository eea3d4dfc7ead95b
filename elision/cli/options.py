"""Options several commands share, defined once so that they read the same everywhere."""
from __future__ import annotations

import typer

from elision.errors import PlacementError

# package.module:factory specs import a module and call a function in it: arbitrary code, so only on request
TRUST_CODE = typer.Option(
    False, "--trust-code",
    help="allow a package.module:factory MODEL: elision imports that module and calls the factory, which runs "
         "arbitrary Python code (like Hugging Face's trust_remote_code); off by default")

# Where a model runs. Plain strings checked by `Placement` (one error line, exit 2), not typer enums, so the
# Python API and the command line share one list of names and one message.
DTYPE = typer.Option("float32", "--dtype", help="weights and activations: float32 | float16 | bfloat16")
DEVICE = typer.Option(None, "--device", help="cpu | cuda (default: cpu for torch models; onnxruntime artifacts use "
                                             "CUDA when onnxruntime-gpu sees a GPU, else the CPU)")
THREADS = typer.Option(None, "--threads", help="intra-op threads (default: torch's or onnxruntime's own count; "
                                               "for generation artifacts the count calibrated as fastest here)")


def placement(dtype: str = "float32", device: str | None = None, threads: int | None = None):
    """The checked `Placement` of --dtype/--device/--threads for a torch model: an unknown name, threads < 1 or
    --device cuda without CUDA raise PlacementError (one line, exit 2) before anything is loaded."""
    from elision.frontend.placement import Placement  # lazy: torch, which `elision --help` must not pay for

    return Placement(dtype, device or "cpu", threads).check_available()


def ort_providers(device: str | None, dtype: str = "float32") -> list[str] | None:
    """onnxruntime execution providers for --device (None: the artifact loader's own choice), checked without
    importing torch; an onnxruntime artifact runs in the dtype it was compiled in (`elision compile --dtype`), so
    any other --dtype is refused."""
    if dtype != "float32":
        raise PlacementError(f"--dtype {dtype} does not apply here: an onnxruntime artifact keeps the dtype it was "
                             f"compiled in (`elision compile MODEL --emit onnx --dtype {dtype}`)")
    if device is None:
        return None
    if device not in ("cpu", "cuda"):
        raise PlacementError(f"device must be one of cpu, cuda, got {device!r}")
    from elision.runtime.artifact import select_providers  # lazy: onnxruntime, only commands that run artifacts

    # checked now, before a possibly long compile: a missing provider is one line naming the installed ones
    return select_providers(["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"])
