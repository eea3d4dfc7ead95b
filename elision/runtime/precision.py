"""The floating dtype of an ONNX artifact and the onnxruntime execution providers it is built for.

float32 and float16 artifacts run on both providers: CUDAExecutionProvider (tensor-core kernels in half precision)
and onnxruntime's CPU provider (float16 graphs of the ops elision emits run there with float16 kernels or inserted
casts, slowly). The CPU provider has no bfloat16 MatMul, so bfloat16 artifacts are built for CUDA alone, and one
loaded without CUDA fails with `cpu_refusal`'s message instead of onnxruntime's. The manifest lists the providers
in order of preference (`target_providers`); `load_artifact` follows that order when no providers are asked for.
"""
from __future__ import annotations

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DTYPES = ("float32", "float16", "bfloat16")
CPU_DTYPES = ("float32", "float16")  # what onnxruntime's CPU provider runs; bfloat16 has no MatMul kernel there


def target_providers(dtype: str, device: str | None = None) -> list[str]:
    """Execution providers an artifact of `dtype` runs on, in order of preference (recorded in the manifest): CUDA
    first (where onnxruntime-gpu sees a GPU) unless it was compiled with `device` "cpu"; bfloat16 on CUDA alone."""
    if dtype not in CPU_DTYPES:
        return [CUDA]
    return [CPU, CUDA] if device == "cpu" else [CUDA, CPU]


def cpu_refusal(dtype: str, providers: list[str], reason: str) -> str | None:
    """The message for an artifact of `dtype` that onnxruntime could not load on `providers` because CUDA is
    missing (None when that is not why: a float32 artifact, or CUDA was among the providers)."""
    if dtype == "float32" or CUDA in providers:
        return None
    return (f"this {dtype} artifact targets {CUDA}, and onnxruntime's CPU provider cannot run it ({reason}); run it "
            f"where onnxruntime-gpu sees a GPU, or compile with --dtype float32 (or float16) for the CPU")
