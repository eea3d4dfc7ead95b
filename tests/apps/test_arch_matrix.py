"""A representative slice of the architecture coverage matrix (`tools/arch_matrix.py`), through the same code.

Each model type is built tiny with random weights from its transformers config class, saved like a user's HF
directory and run through the real CLI in-process (`tools/arch_checks.py`): `elision inspect`, `elision compile
--verify --verify-ir` to fx and onnx (compiled == eager on fresh inputs), and for causal LMs `elision generate` and
the ONNX Runtime `--for generate` artifact, token-identical to Hugging Face greedy `generate`.
"""
from __future__ import annotations

import pytest

from tools.arch_checks import OK, check_inspect, check_specdec_ort, check_specdec_torch, check_verify, hf_greedy
from tools.arch_zoo import BY_TYPE, save_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# diverse: GQA + RoPE, packed qkv + partial rotary + parallel residual, learned positions + Conv1D, a BERT encoder
# (position table sliced by a bounded dim: the dim_ranges fix), a causal text tower with argmax pooling, a ViT
COMPILE_TYPES = ("llama", "gpt_neox", "gpt2", "bert", "clip_text_model", "vit")
# the step form (GroupQueryAttention, in-place KV, q/k/v biases) and GPT-2 (learned positions)
SPECDEC_TYPES = ("qwen2", "gpt2")
# (status, start of the detail): GPT-NeoX (packed, head-interleaved qkv, partial rotary, parallel attention + MLP)
# maps as a decoder; CLIP's text tower is causal, so it maps as a decoder too
EXPECTED_INSPECT = {"llama": (OK, "decoder"), "gpt_neox": (OK, "decoder, 1 layers"), "gpt2": (OK, "decoder"),
                    "bert": (OK, "encoder"), "clip_text_model": (OK, "decoder"), "vit": (OK, "vision")}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    made = {}

    def get(model_type: str):
        if model_type not in made:
            made[model_type] = save_model_dir(BY_TYPE[model_type], tmp_path_factory.mktemp(model_type))
        return made[model_type]

    return get


@pytest.mark.parametrize("model_type", COMPILE_TYPES)
def test_inspect_and_verify(model_type, model_dirs, tmp_path):
    model_dir = model_dirs(model_type)
    inspected = check_inspect(model_dir)
    status, detail = EXPECTED_INSPECT[model_type]
    assert (inspected.status, inspected.detail[:len(detail)]) == (status, detail), inspected.detail
    for emit in ("fx", "onnx"):
        verified = check_verify(model_dir, emit, tmp_path)
        assert verified.status == OK, f"{emit}: {verified.detail}"


@pytest.mark.parametrize("model_type", SPECDEC_TYPES)
def test_speculative_generation_matches_hf_greedy(model_type, model_dirs, tmp_path):
    model_dir = model_dirs(model_type)
    want = hf_greedy(model_dir)
    assert len(want) > 0
    torch_route = check_specdec_torch(model_dir, want)
    assert torch_route.status == OK, torch_route.detail
    ort_route = check_specdec_ort(model_dir, want, tmp_path)
    assert ort_route.status == OK, ort_route.detail
