"""Options several commands share, defined once so that they read the same everywhere."""
from __future__ import annotations

import typer

from elision.errors import PlacementError
from elision.runtime.precision import CPU, CUDA, DTYPES

# package.module:factory specs import a module and call a function in it: arbitrary code, so only on request
TRUST_CODE = typer.Option(
    False, "--trust-code",
    help="allow a package.module:factory MODEL: elision imports that module and calls the factory, which runs "
         "arbitrary Python code (like Hugging Face's trust_remote_code); off by default")

# Where a model runs. Plain strings checked by `Placement` (one error line, exit 2), not typer enums, so the
# Python API and the command line share one list of names and one message.
DTYPE = typer.Option("float32", "--dtype", help="weights and activations: float32 | float16 | bfloat16")
DEVICE = typer.Option(None, "--device", help="cpu | cuda (default: cpu for torch models; onnxruntime artifacts run "
                                             "on the providers their manifest lists: CUDA first when onnxruntime-gpu "
                                             "sees a GPU, unless compiled --for generate with --device cpu)")
THREADS = typer.Option(None, "--threads", help="intra-op threads (default: torch's or onnxruntime's own count; "
                                               "for generation artifacts the count calibrated as fastest here)")


def placement(dtype: str = "float32", device: str | None = None, threads: int | None = None):
    """The checked `Placement` of --dtype/--device/--threads for a torch model: an unknown name, threads < 1 or
    --device cuda without CUDA raise PlacementError (one line, exit 2) before anything is loaded."""
    from elision.frontend.placement import Placement  # lazy: torch, which `elision --help` must not pay for

    return Placement(dtype, device or "cpu", threads).check_available()


def check_dtype(dtype: str) -> str:
    """--dtype checked by name without importing torch (the onnxruntime routes); PlacementError (exit 2) if unknown."""
    if dtype not in DTYPES:
        raise PlacementError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def check_device(device: str | None) -> str | None:
    """--device checked by name alone (None stays None: the command's own default); PlacementError if unknown."""
    if device is not None and device not in ("cpu", "cuda"):
        raise PlacementError(f"device must be one of cpu, cuda, got {device!r}")
    return device


def ort_providers(device: str | None) -> list[str] | None:
    """onnxruntime execution providers for --device (None: the artifact's own order, see `load_artifact`), checked
    without importing torch: cpu forces the CPU provider; cuda needs onnxruntime-gpu's CUDA provider, and its absence
    is one line saying what to install (the `gpu` extra) before anything slow starts."""
    if check_device(device) is None:
        return None
    from elision.runtime.artifact import select_providers  # lazy: onnxruntime, only for commands that run artifacts

    if device == "cpu":
        return select_providers([CPU])
    import onnxruntime  # lazy: installed with elision; imported here for the same reason as select_providers

    available = onnxruntime.get_available_providers()
    if CUDA not in available:
        raise PlacementError(f"--device cuda needs onnxruntime's {CUDA}: install the gpu extra in place of the CPU "
                             f"wheel (pip uninstall -y onnxruntime && pip install 'elision[gpu]', i.e. "
                             f"onnxruntime-gpu) on a machine with an NVIDIA GPU, or use --device cpu (this onnxruntime "
                             f"{onnxruntime.__version__} has {', '.join(available)})")
    return select_providers([CUDA, CPU])  # CPU after CUDA: the nodes CUDA has no kernel for
