"""The floating dtype of an ONNX artifact and the onnxruntime execution providers it is built for.

float32 artifacts run anywhere. float16 and bfloat16 artifacts are built for CUDAExecutionProvider (tensor-core
kernels); onnxruntime's CPU provider runs float16 graphs of the ops elision emits (with float16 kernels or
inserted casts, slowly) but has no bfloat16 MatMul, so a bfloat16 artifact loaded without CUDA fails with
`cpu_refusal`'s message instead of onnxruntime's.
"""
from __future__ import annotations

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DTYPES = ("float32", "float16", "bfloat16")
CPU_DTYPES = ("float32", "float16")  # what onnxruntime's CPU provider runs; bfloat16 has no MatMul kernel there


def target_providers(dtype: str) -> list[str]:
    """Execution providers an artifact of `dtype` targets, in order of preference (recorded in the manifest)."""
    return [CUDA, CPU] if dtype == "float32" else [CUDA]


def cpu_refusal(dtype: str, providers: list[str], reason: str) -> str | None:
    """The message for an artifact of `dtype` that onnxruntime could not load on `providers` because CUDA is
    missing (None when that is not why: a float32 artifact, or CUDA was among the providers)."""
    if dtype == "float32" or CUDA in providers:
        return None
    return (f"this {dtype} artifact targets {CUDA}, and onnxruntime's CPU provider cannot run it ({reason}); run it "
            f"where onnxruntime-gpu sees a GPU, or compile with --dtype float32 (or float16) for the CPU")
