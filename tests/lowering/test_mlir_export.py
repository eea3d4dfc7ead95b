"""--emit mlir: torch-mlir FX importer output parses and holds the expected ops."""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("torch_mlir", reason="torch-mlir is the optional [mlir] extra")

from _lowering_models import PrimaryOutput, tiny_llama, token_ids  # noqa: E402
from elision.lowering.mlir_export import MlirExportError, export_mlir, parse_mlir  # noqa: E402


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


def test_linalg_output_parses_and_has_matmuls(tmp_path):
    path = export_mlir(_mlp(), (torch.randn(3, 8),), tmp_path / "mlp.mlir")
    text = path.read_text()
    module = parse_mlir(text)  # every dialect in this output is registered: full verification
    assert module.operation.name == "builtin.module"
    assert "func.func @main(%arg0: tensor<3x8xf32>) -> tensor<3x4xf32>" in text
    assert text.count("linalg.matmul") == 2
    assert "torch." not in re.sub(r"torch_tensor_\w+", "", text)  # fully lowered out of the torch dialect


def test_stablehlo_output(tmp_path):
    text = export_mlir(_mlp(), (torch.randn(3, 8),), tmp_path / "mlp.shlo.mlir", output_type="stablehlo").read_text()
    assert text.count("stablehlo.dot_general") == 2 and "stablehlo.maximum" in text


def test_llama_with_non_persistent_buffers(tmp_path):
    lm = tiny_llama(layers=1)
    model = PrimaryOutput(lm, use_cache=False).eval()
    rotary = lm.model.rotary_emb
    assert "inv_freq" in rotary._non_persistent_buffers_set
    text = export_mlir(model, (token_ids(2, 5),), tmp_path / "llama.mlir").read_text()
    assert "inv_freq" in rotary._non_persistent_buffers_set  # the caller's module is left as it was
    assert "linalg.matmul" in text or "linalg.batch_matmul" in text
    assert "math.rsqrt" in text  # RMSNorm
    assert "tensor<2x5x256xf32>" in text  # logits


def test_optimized_graph_with_fused_elision_ops(tmp_path):
    """The graph after elision's default pipeline: fused elision ops decompose to their ATen reference."""
    from elision.apps.compile.api import default_pipeline
    from elision.frontend.trace import export_to_ir
    from elision.ir import to_fx
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    ir = export_to_ir(model, (x,))
    PassManager(parse_pipeline(default_pipeline())).run(ir)
    gm = to_fx(ir, "forward")
    text = export_mlir(gm, (x,), tmp_path / "opt.mlir").read_text()
    parse_mlir(text)
    assert text.count("linalg.matmul") == 2 and "math.rsqrt" in text  # layer norm: rsqrt of the variance


def test_bad_output_type_is_a_clear_error(tmp_path):
    with pytest.raises(MlirExportError, match=r"unknown MLIR output type 'llvm'; choose one of linalg-on-tensors"):
        export_mlir(_mlp(), (torch.randn(3, 8),), tmp_path / "x.mlir", output_type="llvm")
