"""@verify exported to ONNX runs in onnxruntime and matches the torch function (fp32, <= 1e-5).

(@draft exports the same way, `functions=("verify", "draft")`; it is left out here to keep the suite fast.)
"""
from __future__ import annotations

import numpy as np
import torch

from elision.ir import to_fx
from elision.apps.specdec.compiled_backend import CompiledSpecDec, export_specdec_onnx, model_config
from specdec_compiled_models import VOCAB, compiled, tree_inputs

torch.set_num_threads(1)


def test_verify_step_in_onnxruntime_matches_torch(tmp_path):
    from elision.runtime.artifact import load_artifact

    model, ir = compiled("llama")
    spec = CompiledSpecDec(ir, model_config(model), "canonicalize,cse,kv-cache,tree-verify,layer-skip-draft")
    art = load_artifact(export_specdec_onnx(spec, tmp_path / "specdec", functions=("verify",)))
    a = ir.attrs["specdec"]
    g = torch.Generator().manual_seed(21)
    # shapes other than the export example: batch 1, 5 tree nodes, 9 cached slots
    parents = [-1, 0, 0, 1, 2]
    for fn, layers in (("verify", a["num_layers"]),):
        past = [torch.randn(1, a["kv_heads"], 9, a["head_dim"], generator=g) for _ in range(2 * layers)]
        tokens = torch.randint(0, VOCAB, (1, len(parents)), generator=g)
        positions, bias = tree_inputs(parents, 9, 1)
        ref = to_fx(ir, fn)(tokens, positions, bias, *past)
        names = art.spec(fn).input_names
        out = art.run(fn, **dict(zip(names, [t.numpy() for t in (tokens, positions, bias, *past)])))
        assert list(out)[0] == "logits" and "k_0" in out
        for got, want in zip(out.values(), ref):
            assert np.abs(got - want.numpy()).max() <= 1e-5, fn
