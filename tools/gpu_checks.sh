#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (CI has no GPU; run this on a GPU machine by hand):
#   1. the compiled Triton kernels against their torch references (tests/kernels/test_kernels_triton.py runs its
#      hypothesis shape tests on CUDA when TRITON_INTERPRET=0, plus the CUDA-only tests of the ops,
#      torch.compile, adaptive-KV attention and volume decoding);
#   2. tools/bench_kernels.py (Triton kernels vs the PyTorch ops they replace) -> kernels_cuda.md/png;
#   3. tools/bench_volume.py --device cuda (dense vs hierarchical vs adaptive KV, full-size adaptive-KV
#      speed) -> volume_cuda.md/json/png.
# Results go to $OUT (default gpu-out/). Missing pure-Python packages (trimesh) can be put in .whl/ as wheels.
#   OUT=gpu-out bash tools/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/elision-site .whl/*.whl \
        && export PYTHONPATH=/tmp/elision-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/pytest_cuda.log"

status=0
timeout "${PYTEST_TIMEOUT:-220}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/kernels/test_kernels_cuda.py tests/kernels/test_kernels_triton.py \
    tests/apps/volume/test_adaptive_kv.py::test_adaptive_attention_on_cuda_uses_the_triton_kernel_and_matches_cpu \
    tests/apps/volume/test_volume_decode.py::test_decode_on_cuda_matches_cpu 2>&1 | tee -a "$OUT/pytest_cuda.log" || status=1

timeout "${KERNELS_TIMEOUT:-90}" python3 tools/bench_kernels.py --repeats 50 --out "$OUT" 2>&1 | tail -25 || status=1

timeout "${VOLUME_TIMEOUT:-300}" python3 tools/bench_volume.py --device cuda --dtype float16 \
    --resolutions 128 256 384 --repeats 3 --fixtures-resolution 256 \
    --kv-queries 262144 --kv-topk 64 128 256 1024 --threads 8 --out "$OUT" 2>&1 | tee "$OUT/volume_cuda.log" \
    | grep -v "^r=\|^fixture\|^kv-speed" | tail -60 || status=1
# keep one mesh preview (the sparse decode at the largest resolution): the device tool returns 8 files at most
find "$OUT" -name 'volume_cuda_*_dense.png' -delete
find "$OUT" -name 'volume_cuda_*_sparse_kv.png' -delete
ls -la "$OUT"
exit $status
