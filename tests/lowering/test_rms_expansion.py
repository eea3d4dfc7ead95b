"""The standard-opset form of ORT's RMSNorm that artifacts store (`onnx_export._standardize_default_domain`):
it passes onnx.checker, computes what ORT's own `SimplifiedLayerNormalization` kernel computes, and is the
pattern ORT's optimizer fuses back into that kernel when a session is created (else every RMSNorm that does not
follow a residual add runs as seven kernels per step)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from elision.lowering.onnx_export import _standardize_default_domain


def _rms_model(dtype: int, typed: bool = True) -> onnx.ModelProto:
    """x [2, 3, 16] -> SimplifiedLayerNormalization (the default domain, as onnxscript emits it) -> Relu."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    scale = numpy_helper.from_array(np.random.RandomState(1).uniform(0.5, 1.5, 16).astype(np_dtype), "scale")
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["normed"], axis=-1, epsilon=1e-6,
                              stash_type=1),
             helper.make_node("Relu", ["normed"], ["y"])]
    value_info = [helper.make_tensor_value_info("normed", dtype, [2, 3, 16])] if typed else []
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", dtype if typed else 0, [2, 3, 16])],
                              [helper.make_tensor_value_info("y", dtype, [2, 3, 16])], [scale], value_info=value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _session(model: onnx.ModelProto, optimized_path=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_float32_rmsnorm_expands_to_the_pattern_ort_fuses_back(tmp_path):
    fused = _rms_model(TensorProto.FLOAT)
    x = np.random.RandomState(0).randn(2, 3, 16).astype(np.float32) * 3
    expected = _session(fused).run(None, {"x": x})[0]  # ORT's own kernel on the unexpanded node
    expanded = _rms_model(TensorProto.FLOAT)
    _standardize_default_domain(expanded)
    onnx.checker.check_model(expanded)
    ops = Counter(n.op_type for n in expanded.graph.node)
    assert not ops["SimplifiedLayerNormalization"] and ops["Pow"] == 1 and not ops["Cast"] and not ops["CastLike"]
    got = _session(expanded, tmp_path / "optimized.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    optimized = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert optimized["SimplifiedLayerNormalization"] == 1 and not optimized["ReduceMean"] and not optimized["Pow"]


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "untyped"])
def test_float16_rmsnorm_normalizes_in_float32_and_casts_back(typed):
    x = (np.random.RandomState(0).randn(2, 3, 16) * 3).astype(np.float16)
    reference = _rms_model(TensorProto.FLOAT)  # the same weights in float32: the float16 result must be its rounding
    reference.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(_rms_model(TensorProto.FLOAT16).graph.initializer[0]).astype(np.float32), "scale"))
    expected = _session(reference).run(None, {"x": x.astype(np.float32)})[0]
    expanded = _rms_model(TensorProto.FLOAT16, typed=typed)
    _standardize_default_domain(expanded)
    casts = Counter(n.op_type for n in expanded.graph.node)
    # the input type known: Cast back to it (ORT's fusable form); unknown: CastLike, still correct
    assert (casts["Cast"], casts["CastLike"]) == ((2, 0) if typed else (1, 1))
    if not typed:
        expanded.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(expanded)
    got = _session(expanded).run(None, {"x": x})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
